"""The `shardflow` CLI: help, every command on a small demo, one-line errors, --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = Path(sys.executable).parent / "shardflow"
COMMANDS = ["demo", "run", "view", "query", "tail", "inspect", "holds", "compact", "gc", "fsck"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo (20 ticks), run once for the module through the console script."""
    d = tmp_path_factory.mktemp("cli") / "data"
    r = subprocess.run(
        [str(CONSOLE), "demo", "--data", str(d), "--ticks", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "committed" in r.stdout and "top bid per auction" in r.stdout and "bids_per_band" in r.stdout
    return d


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("shardflow: error: ") and "Traceback" not in err, err
    return err[len("shardflow: error: ") : -1]


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help(cmd: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if cmd is None else [cmd, "--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: shardflow")
    if cmd is None:
        for c in COMMANDS:
            assert c in out
    else:
        # Every subcommand says what it does, beyond its usage line.
        sub = build_parser()._subparsers._group_actions[0].choices[cmd]  # type: ignore[union-attr]
        assert sub.description or "help" in out
        assert len(out.splitlines()) > 4
    assert "--process-id" not in out and "--summary-file" not in out  # internal options stay hidden


def test_help_console_script() -> None:
    r = subprocess.run([str(CONSOLE), "run", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--processes" in r.stdout and "--workers" in r.stdout


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


# ---------------------------------------------------------------- commands on the demo data


def test_query_formats(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT band, count(*) AS n FROM bids GROUP BY band ORDER BY band"
    rc, out, _ = run(capsys, "query", "--data", str(data), sql)
    assert rc == 0 and "band" in out and "high" in out
    rc, csv, _ = run(capsys, "query", "--data", str(data), "--format", "csv", sql)
    assert rc == 0 and csv.splitlines()[0] == '"band","n"'
    rows = [line.split(",") for line in csv.splitlines()[1:]]
    rc, js, _ = run(capsys, "query", "--data", str(data), "--format", "json", sql)
    assert rc == 0
    objs = [json.loads(line) for line in js.splitlines()]
    assert [o["band"] for o in objs] == [r[0].strip('"') for r in rows]
    assert sum(o["n"] for o in objs) == sum(int(r[1]) for r in rows) > 0
    out_file = tmp_path / "bands.parquet"
    rc, out, _ = run(
        capsys, "query", "--data", str(data), "--format", "parquet", "-o", str(out_file), sql
    )
    assert rc == 0 and out == ""
    assert pq.read_table(out_file).to_pylist() == objs
    csv_file = tmp_path / "bands.csv"
    rc, _, _ = run(
        capsys, "query", "--data", str(data), "--format", "csv", "-o", str(csv_file), sql
    )
    assert rc == 0 and csv_file.read_text() == csv
    rc, _, err = run(capsys, "query", "--data", str(data), "--format", "parquet", sql)
    assert rc == 1 and "--output" in one_error(err)


def test_query_as_of(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, now, _ = run(
        capsys, "query", "--data", str(data), "--format", "csv", "SELECT count(*) FROM bids"
    )
    rc2, early, _ = run(
        capsys,
        "query",
        "--data",
        str(data),
        "--format",
        "csv",
        "--as-of",
        "3000",
        "SELECT count(*) FROM bids",
    )
    assert rc == rc2 == 0
    assert 0 < int(early.splitlines()[1]) < int(now.splitlines()[1])


def test_inspect(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "inspect", "--data", str(data))
    assert rc == 0
    for name in ("auctions", "bids", "users"):
        assert name in out
    assert "system." not in out
    rc, out, _ = run(capsys, "inspect", "--data", str(data), "--json")
    info = json.loads(out)
    assert set(info) == {"auctions", "bids", "users", "top_bids", "bids_per_band"}
    assert info["bids"]["rows"] > 0 and info["bids"]["upper"]
    rc, out, _ = run(capsys, "inspect", "--data", str(data), "bids")
    assert rc == 0 and "batches of bids" in out
    rc, out, _ = run(capsys, "inspect", "--data", str(data), "--json", "--system")
    assert any(n.startswith("system.") for n in json.loads(out))


def test_tail(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "tail", "--data", str(data), "users", "--timeout", "0.5")
    assert rc == 0
    lines = out.splitlines()
    updates = [ln for ln in lines if not ln.startswith("#")]
    assert updates and all(
        ln.split("\t")[1] in ("+1", "-1") or ln.split("\t")[1].lstrip("+-").isdigit()
        for ln in updates
    )
    assert "name=" in updates[0]
    assert any(ln.startswith("# progress ") for ln in lines)


def test_compact_gc_fsck(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, before, _ = run(
        capsys, "query", "--data", str(data), "--format", "csv", "SELECT * FROM bids ORDER BY ALL"
    )
    rc, out, _ = run(capsys, "compact", "--data", str(data))
    assert rc == 0 and "bids:" in out and "batches" in out
    rc, out, _ = run(capsys, "compact", "--data", str(data), "bids")
    assert rc == 0 and out.startswith("bids: ")
    rc, out, _ = run(capsys, "gc", "--data", str(data))
    assert rc == 0 and "bids:" in out
    rc, out, _ = run(capsys, "fsck", "--data", str(data))
    assert rc == 0 and "FAILED" not in out and "bids: ok" in out
    rc, after, _ = run(
        capsys, "query", "--data", str(data), "--format", "csv", "SELECT * FROM bids ORDER BY ALL"
    )
    assert after == before


# ---------------------------------------------------------------- errors


def test_errors_are_one_line(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, "query", "--data", str(data), "SELECT * FROM nope_such_table")
    msg = one_error(err)
    assert rc == 1 and "nope_such_table" in msg and "(collections: auctions, bids, bids_per_band, top_bids, users)" in msg
    rc, _, err = run(capsys, "tail", "--data", str(data), "nope", "--timeout", "0.1")
    assert rc == 1 and "'nope' does not exist" in one_error(err)
    rc, _, err = run(capsys, "inspect", "--data", str(data), "nope")
    assert rc == 1 and "'nope' does not exist" in one_error(err)
    rc, _, err = run(capsys, "query", "--data", str(data), "SELEC 1 FROM bids")
    assert rc == 1 and one_error(err).startswith("query: ")
    rc, _, err = run(capsys, "query", "--data", str(tmp_path / "empty"), "SELECT 1")
    assert rc == 1 and "no shardflow data here" in one_error(err)
    assert not (tmp_path / "empty").exists()  # a read command creates nothing
    rc, _, err = run(capsys, "run", "--data", str(tmp_path / "d"), str(tmp_path / "missing.py"))
    assert rc == 1 and "missing.py" in one_error(err) and "does not exist" in err
    bad = tmp_path / "bad_name.py"
    bad.write_text(
        "import pyarrow as pa\n"
        "def build(ctx):\n"
        "    ctx.collection('Bad Name!', pa.schema([('x', pa.int64())]))\n"
    )
    rc, _, err = run(capsys, "run", "--data", str(tmp_path / "d"), str(bad))
    assert rc == 1 and "Bad Name!" in one_error(err)
    rc, _, err = run(capsys, "run", "--data", str(tmp_path / "d"), str(bad), "-w", "0")
    assert rc == 1 and "--workers" in one_error(err)


def test_debug_shows_traceback(data: Path) -> None:
    r = subprocess.run(
        [str(CONSOLE), "query", "--data", str(data), "SELECT * FROM nope_such_table"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (
        r.returncode == 1
        and r.stderr.startswith("shardflow: error: ")
        and r.stderr.count("\n") == 1
    )
    r = subprocess.run(
        [str(CONSOLE), "query", "--debug", "--data", str(data), "SELECT * FROM nope_such_table"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_closed_pipe_is_not_an_error(data: Path) -> None:
    """`shardflow query ... | head -1`: the reader leaving is no error (was: BrokenPipeError)."""
    p = subprocess.Popen(
        [
            str(CONSOLE),
            "query",
            "--data",
            str(data),
            "--format",
            "csv",
            "SELECT * FROM bids, range(20)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stdout.readline()
    p.stdout.close()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and err == b""


def test_demo_twice_is_exactly_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "demo"
    env_before = {k: os.environ.get(k) for k in ("SHARDFLOW_DEMO_TICKS", "SHARDFLOW_DEMO_SEED")}
    try:
        rc, out1, _ = run(capsys, "demo", "--data", str(d), "--ticks", "20")
        assert rc == 0 and "committed 0 rows" not in out1
        _, counts1, _ = run(
            capsys,
            "query",
            "--data",
            str(d),
            "--format",
            "csv",
            "SELECT (SELECT count(*) FROM bids), (SELECT count(*) FROM users)",
        )
        rc, out2, _ = run(capsys, "demo", "--data", str(d), "--ticks", "20")
        assert rc == 0 and "committed 0 rows in 0 batches" in out2, out2
        _, counts2, _ = run(
            capsys,
            "query",
            "--data",
            str(d),
            "--format",
            "csv",
            "SELECT (SELECT count(*) FROM bids), (SELECT count(*) FROM users)",
        )
        assert counts1 == counts2
    finally:
        for k, v in env_before.items():  # run_demo exports its settings for the flow file
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

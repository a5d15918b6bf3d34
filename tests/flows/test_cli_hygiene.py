"""CLI arguments and the consensus file (issue 14, item 11).

Before: a negative --tick was a busy loop and a negative --timeout was taken;
`shardflow run /etc/passwd` printed `AssertionError:` and nothing else; SQLite errors
did not name the file; `query`, `inspect` and `fsck` failed on a read-only data
directory instead of reading it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from flows.cli import main
from storage.controller import CollectionDesc, StorageController

ROOT = Path(__file__).resolve().parents[2]
COUNTER = str(ROOT / "examples" / "loadgen_counter.py")
K = pa.schema([("k", pa.int64())])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("shardflow: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv", [
    ["run", COUNTER, "--tick", "-1"],
    ["run", COUNTER, "--tick", "0"],
    ["run", COUNTER, "--tick", "nan"],
    ["view", "v", "SELECT 1", "--tick", "-0.5"],
    ["query", "--timeout", "-5", "SELECT 1"],
    ["query", "--timeout", "nan", "SELECT 1"],
    ["query", "--as-of", "-1", "SELECT 1"],
    ["tail", "x", "--timeout", "-1"],
])
def test_negative_numbers_are_refused_in_one_line(capsys, tmp_path, argv):
    rc, out, err = run(capsys, *argv[:1], "--data", str(tmp_path / "d"), *argv[1:])
    flag = next(a for a in argv if a.startswith("--"))
    assert rc == 2 and flag in one_line(err), err
    assert not (tmp_path / "d").exists()  # refused before anything ran


def test_run_of_a_file_that_is_not_a_flow_names_it(capsys, tmp_path):
    txt = tmp_path / "passwd"
    txt.write_text("root:x:0:0:root:/root:/bin/bash\n")
    rc, out, err = run(capsys, "run", str(txt), "--data", str(tmp_path / "d"))
    assert rc == 1 and str(txt) in one_line(err) and "not a Python file" in err and "AssertionError" not in err
    py = tmp_path / "bad.py"
    py.write_text("root:x:0:0:root:/root:/bin/bash\n")
    rc, out, err = run(capsys, "run", str(py), "--data", str(tmp_path / "d"))
    assert rc == 1 and str(py) in one_line(err) and "line 1" in err


@pytest.mark.parametrize("command", [["inspect"], ["query", "SELECT 1"], ["fsck"], ["compact"]])
def test_a_broken_consensus_file_is_named(capsys, tmp_path, command):
    d = tmp_path / "d"
    d.mkdir()
    (d / "consensus.sqlite").write_bytes(b"this is not a database, not at all, no" * 100)
    rc, out, err = run(capsys, command[0], "--data", str(d), *command[1:])
    assert rc == 1 and str(d / "consensus.sqlite") in one_line(err), err
    with pytest.raises(storage.StateCorrupt, match="consensus.sqlite: file is not a database"):
        storage.open(d)


def _read_only(data: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` (sh) with `data` read-only: by file modes, or for root (who ignores
    them) on a read-only bind mount in a private mount namespace."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(data)], check=True)
        try:
            return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(data)], check=True)
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: cannot make a directory read-only")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a directory read-only")
    mount = f"mount --bind {data} {data} && mount -o remount,ro,bind {data} && touch {data}/x 2>/dev/null && exit 99; "
    return subprocess.run(["unshare", "-m", "sh", "-c", mount + script], capture_output=True, text=True, env=env,
                          timeout=120)


def test_query_inspect_fsck_tail_work_on_a_read_only_data_dir(tmp_path):
    data = tmp_path / "data"
    client = storage.open(data, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc("c", K, data_source="other")])
    shard = ctl.collections()["c"].shard_id
    up = client.state(shard).upper.time
    client.open_writer(shard, schema=K).compare_and_append(
        pa.table({"k": [1, 2, 3], "_time": [up] * 3, "_diff": [1] * 3}), up, up + 10)
    ctl.close()
    client.close()
    cli = f"{sys.executable} -m flows.cli"
    d = f"--data {data}"
    script = (f"{cli} query {d} --format csv 'SELECT sum(k) AS s FROM c' && echo == && {cli} inspect {d} && "
              f"echo == && {cli} fsck {d} && echo == && {cli} tail c {d} --timeout 0.2 && echo == && "
              f"{cli} run {COUNTER} {d} --no-progress")
    p = _read_only(data, script)
    assert p.returncode != 99, "the directory is still writable"
    parts = p.stdout.split("==\n")
    assert len(parts) == 5, (p.stdout, p.stderr)
    q, inspect, fsck, tail, _ = parts
    assert q == '"s"\n6\n'
    assert "collections in" in inspect and "│ c " in inspect
    assert "c: ok (" in fsck
    assert tail.count("\t+1\t") == 3
    # A command that writes says so, in one line naming the directory.
    assert p.stderr == f"shardflow: error: --data {data}: this process cannot write there (a read-only directory?), " \
        "and `shardflow run` writes; query, tail, inspect, holds list and fsck read it as it is\n", p.stderr

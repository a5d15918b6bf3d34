"""`FileSource(partitions=N)` through `shardflow run`: every row committed once, for N x workers x processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "tests" / "connectors" / "files_flow.py"
SHARDFLOW = [sys.executable, "-m", "flows.cli"]
SIZES = [1, 1000, 3000, 200, 59]  # plus an empty and a header-only file


def make_files(d: Path, fmt: str, sizes: list[int] = SIZES, start: int = 0, prefix: str = "f") -> list[int]:
    """Files of consecutive ids under `d`; returns the ids."""
    d.mkdir(parents=True, exist_ok=True)
    n = start
    for i, k in enumerate(sizes):
        ids = list(range(n, n + k))
        n += k
        p = d / f"{prefix}{i}.{fmt}"
        if fmt == "csv":
            p.write_text("id,name\n" + "".join(f"{j},n{j}\n" for j in ids))
        elif fmt == "jsonl":
            p.write_text("".join(f'{{"id": {j}, "name": "n{j}"}}\n' for j in ids))
        else:
            pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "name": [f"n{j}" for j in ids]}), p)
    if fmt == "csv":
        (d / f"{prefix}_empty.csv").write_text("")
        (d / f"{prefix}_header.csv").write_text("id,name\n")
    elif fmt == "jsonl":
        (d / f"{prefix}_empty.jsonl").write_text("")
    return list(range(start, n))


def shardflow(data: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*SHARDFLOW, *argv, "--data", str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr
    return r


def query(data: Path, sql: str) -> list[dict[str, Any]]:
    """`shardflow query ... --format json`, in this process (the runs are real processes)."""
    buf = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with contextlib.redirect_stdout(buf):
        rc = main(["query", "--data", str(data), sql, "--format", "json"])
    assert rc == 0
    buf.flush()
    return [json.loads(x) for x in buf.buffer.getvalue().decode().splitlines() if x.strip()]


def ids(data: Path, table: str = "rows") -> list[int]:
    return [r["id"] for r in query(data, f"SELECT id FROM {table} ORDER BY id")]


def count(data: Path, table: str) -> int:
    return int(query(data, f"SELECT count(*) AS n FROM {table}")[0]["n"])


def check_run(
    tmp_path: Path, fmt: str, parts: int, par: list[str], sink: str = "persist", block: int | None = None, rerun: bool = True
) -> None:
    src, data = tmp_path / "in", tmp_path / "d"
    want = make_files(src, fmt)
    env = {"FILES_GLOB": str(src / f"*.{fmt}"), "FILES_FORMAT": fmt, "FILES_PARTITIONS": str(parts), "FILES_SINK": sink}
    if block:
        env["FILES_BLOCK"] = str(block)
    shardflow(data, "run", str(FLOW), *par, env=env)
    assert ids(data) == want, "every row once"
    assert count(data, "rows_errors") == 0
    if not rerun:
        return
    # A rerun adds nothing; new files then arrive once.
    shardflow(data, "run", str(FLOW), *par, env=env)
    more = make_files(src, fmt, sizes=[7, 300], start=want[-1] + 1, prefix="g")
    shardflow(data, "run", str(FLOW), *par, env=env)
    assert ids(data) == want + more


@pytest.mark.parametrize(
    ("fmt", "parts", "par", "sink", "rerun"),
    [
        ("csv", 2, ["-w", "1"], "persist", True),
        ("csv", 4, ["-w", "2"], "persist", False),
        ("csv", 2, ["-p", "2"], "persist", False),
        ("jsonl", 2, ["-w", "1"], "append", False),
        ("csv", 3, ["-w", "1"], "append", False),
        ("parquet", 2, ["-w", "2"], "persist", False),
    ],
)
def test_partitions_commit_every_row(tmp_path: Path, fmt: str, parts: int, par: list[str], sink: str, rerun: bool) -> None:
    check_run(tmp_path, fmt, parts, par, sink, block=4096, rerun=rerun)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("par", [["-w", "1"], ["-w", "2"], ["-p", "2"]], ids=["w1", "w2", "p2"])
@pytest.mark.parametrize("sink", ["persist", "append"])
def test_partitions_matrix(tmp_path: Path, fmt: str, parts: int, par: list[str], sink: str) -> None:
    check_run(tmp_path, fmt, parts, par, sink)


def test_continuous_partitions_commit_while_some_are_idle(tmp_path: Path) -> None:
    """Continuous mode with partitions=3: rows commit even though some partitions see no files."""
    src, data = tmp_path / "in", tmp_path / "d"
    src.mkdir()
    env = {"FILES_GLOB": str(src / "*.csv"), "FILES_PARTITIONS": "3"}
    p = subprocess.Popen(
        [*SHARDFLOW, "run", str(FLOW), "--data", str(data), "--mode", "continuous", "-w", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    want: list[int] = []
    try:
        time.sleep(1.0)
        want = make_files(src, "csv", sizes=[50])  # one file: one busy partition, two idle ones
        deadline = time.monotonic() + 30
        got: list[int] = []
        while time.monotonic() < deadline:
            if data.exists():
                try:
                    got = ids(data)
                except Exception:
                    got = []  # the collection is not created yet
            if got == want:
                break
            time.sleep(0.5)
        assert got == want, "committed while running"
        more = make_files(src, "csv", sizes=[20, 30], start=50, prefix="g")
        time.sleep(1.5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    # Whatever the stop left uncommitted, a batch run finishes: every row exactly once.
    shardflow(data, "run", str(FLOW), env=env)
    assert ids(data) == want + more




def test_partitioned_resume_without_resume_upper_stops(tmp_path: Path) -> None:
    """A partitioned source resumed without `resume_upper` would start its shared time below
    the last run's upper, and the persist sink would drop the new rows as history. It stops
    with one line instead."""
    src, data = tmp_path / "in", tmp_path / "d"
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW.read_text().replace('resume_upper=ctx.upper("rows"),', ""))
    want = make_files(src, "csv", sizes=[50, 60])
    env = {"FILES_GLOB": str(src / "*.csv"), "FILES_PARTITIONS": "2"}
    shardflow(data, "run", str(flow), env=env)
    assert ids(data) == want
    make_files(src, "csv", sizes=[7], start=want[-1] + 1, prefix="g")
    r = subprocess.run([*SHARDFLOW, "run", str(flow), "--data", str(data)], cwd=ROOT, capture_output=True,
                       text=True, timeout=180, env={**os.environ, **env})
    assert r.returncode != 0, "a resumed partitioned run without resume_upper must not go on"
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "partitions > 1 resumes need resume_upper=" in err[0], r.stderr
    assert ids(data) == want, "nothing half-written"

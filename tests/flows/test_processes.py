"""`shardflow run -p N`: N local bytewax processes of one flow (process 0 is the CLI process).

Every run is a real subprocess of the console script: a multi-process run may
end its process with os._exit when a child dies before connecting (see
flows/cli.py), which must never happen inside pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHARDFLOW = [sys.executable, "-m", "flows.cli"]

FLOW = """
import os, threading
import bytewax.operators as op
from bytewax.dataflow import Dataflow
from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate

def build(ctx):
    fail = os.environ.get("TEST_FAIL", "")
    if fail == "build" and ctx.process_id == 1:
        raise RuntimeError("boom in process 1")
    if fail == "run" and ctx.process_id == 1:
        threading.Timer(1.0, os._exit, (3,)).start()
    flow = Dataflow("multi")
    for i, name in enumerate(["c_a", "c_b", "c_c"]):
        gen = Counter(seed=i, rows_per_tick=5 + i, max_cardinality=40)
        ctx.collection(name, gen.schemas()["counter"])
        src = LoadgenSource(gen, "counter", ticks=None if ctx.continuous else 30,
                            rate=20.0 if ctx.continuous else None, resume=ctx.resume_offsets(name))
        ctx.persist(f"{name}_sink", consolidate(f"{name}_cons", op.input(name, flow, src)), name)
    return flow
"""


@pytest.fixture
def flow_file(tmp_path: Path) -> Path:
    p = tmp_path / "multi_flow.py"
    p.write_text(FLOW)
    return p


def shardflow(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [*SHARDFLOW, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout
    )


def contents(data: Path, capsys: pytest.CaptureFixture[str], name: str) -> tuple[str, str]:
    """(sorted snapshot as CSV, upper) of collection `name`."""
    capsys.readouterr()
    assert (
        main(
            ["query", "--data", str(data), "--format", "csv", f"SELECT * FROM {name} ORDER BY ALL"]
        )
        == 0
    )
    rows = capsys.readouterr().out
    assert main(["inspect", "--data", str(data), "--json", name]) == 0
    import json

    info = json.loads(capsys.readouterr().out)[name]
    return rows, str(info["upper"])


def test_two_processes_equal_one(
    tmp_path: Path, flow_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = shardflow("run", str(flow_file), "--data", str(one), "-p", "1")
    assert r1.returncode == 0, r1.stderr
    r2 = shardflow("run", str(flow_file), "--data", str(two), "-p", "2", "-w", "2")
    assert r2.returncode == 0, r2.stderr
    # One summary line, naming every collection, whichever process committed it.
    lines = r2.stdout.strip().splitlines()
    assert len(lines) == 1 and "(2 processes x 2 workers)" in lines[0], r2.stdout
    for name in ("c_a", "c_b", "c_c"):
        assert f"{name}=" in lines[0]
    for name in ("c_a", "c_b", "c_c"):
        a, b = contents(one, capsys, name), contents(two, capsys, name)
        assert a == b, name
        assert a[0].count("\n") > 1  # not trivially equal
    # Exactly-once across processes: a rerun with -p 2 resumes and commits nothing.
    r3 = shardflow("run", str(flow_file), "--data", str(two), "-p", "2")
    assert r3.returncode == 0, r3.stderr
    assert ": 0 rows in 0 batches" in r3.stdout, r3.stdout
    for name in ("c_a", "c_b", "c_c"):
        assert contents(one, capsys, name) == contents(two, capsys, name)


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_child_failing_to_build_fails_the_run(tmp_path: Path, flow_file: Path) -> None:
    t0 = time.monotonic()
    r = shardflow(
        "run", str(flow_file), "--data", str(tmp_path / "d"), "-p", "2", env={"TEST_FAIL": "build"}
    )
    assert r.returncode == 1
    assert (
        _one_error_line(r)
        == "shardflow: error: process 1 of 2 failed (exit 1): RuntimeError: boom in process 1"
    )
    assert time.monotonic() - t0 < 20


def test_child_dying_mid_run_fails_the_run(tmp_path: Path, flow_file: Path) -> None:
    r = shardflow(
        "run",
        str(flow_file),
        "--data",
        str(tmp_path / "d"),
        "-p",
        "2",
        "--mode",
        "continuous",
        env={"TEST_FAIL": "run"},
    )
    assert r.returncode == 1
    assert _one_error_line(r) == "shardflow: error: process 1 of 2 failed (exit 3)"


def test_sigterm_stops_every_process(tmp_path: Path, flow_file: Path) -> None:
    p = subprocess.Popen(
        [
            *SHARDFLOW,
            "run",
            str(flow_file),
            "--data",
            str(tmp_path / "d"),
            "-p",
            "2",
            "--mode",
            "continuous",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "continuous run of" in out and "(2 processes x 1 workers)" in out
    # The child stopped too: nothing of this run is left.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(flow_file) not in ps


def test_bad_process_count(
    tmp_path: Path, flow_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(flow_file), "--data", str(tmp_path / "d"), "-p", "0"]) == 1
    assert capsys.readouterr().err == "shardflow: error: --processes must be >= 1, got 0\n"

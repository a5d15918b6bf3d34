"""Faults around a running job, through the CLI: a locked consensus file, a full disk.

Every run is a real subprocess of the CLI; the lock is held by a real second
process; the full disk is a real (tiny) tmpfs. Afterwards the collection is
checked: nothing lost, nothing doubled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_util import (
    FLOW,
    ROOT,
    SHARDFLOW,
    counter_values,
    one_error_line,
    shardflow,
)

# ------------------------------------------------------------------ item 8: locked consensus

LOCKER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("LOCKED", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin
con.execute("ROLLBACK")
"""


@pytest.fixture
def locker() -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def lock(path: Path) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "LOCKED"
        return p

    yield lock
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def release(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    assert p.wait(timeout=10) == 0


def test_locked_consensus_stops_with_one_line(tmp_path: Path, locker) -> None:  # noqa: ANN001
    data = tmp_path / "d"
    env = {"COUNTER_TICKS": "5"}
    r = shardflow("run", FLOW, "--data", str(data), env=env)
    assert r.returncode == 0, r.stderr
    db = data / "consensus.sqlite"
    holder = locker(db)
    env = {"COUNTER_TICKS": "10", "SHARDFLOW_CONSENSUS_TIMEOUT": "2"}
    t0 = time.monotonic()
    r = shardflow("run", FLOW, "--data", str(data), env=env, timeout=90)
    took = time.monotonic() - t0
    assert r.returncode == 1, (r.stdout, r.stderr)
    line = one_error_line(r)
    assert line == (
        f"sqlite consensus {db}: database is locked by another process; waited 2s "
        "(set $SHARDFLOW_CONSENSUS_TIMEOUT to wait longer)"
    )
    assert took < 30, took
    # Once the other process lets go, the same run goes through: nothing lost, nothing doubled.
    release(holder)
    r = shardflow("run", FLOW, "--data", str(data), env=env)
    assert r.returncode == 0, r.stderr
    assert counter_values(data) == list(range(1, 101))


def test_locked_consensus_default_wait_is_bounded(tmp_path: Path, locker) -> None:  # noqa: ANN001
    """Without the variable the wait is the documented default (10 s), not minutes."""
    data = tmp_path / "d"
    assert shardflow("run", FLOW, "--data", str(data), env={"COUNTER_TICKS": "1"}).returncode == 0
    holder = locker(data / "consensus.sqlite")
    env = {k: v for k, v in os.environ.items() if k != "SHARDFLOW_CONSENSUS_TIMEOUT"}
    t0 = time.monotonic()
    r = subprocess.run(
        [*SHARDFLOW, "run", FLOW, "--data", str(data)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    took = time.monotonic() - t0
    assert r.returncode == 1 and "database is locked by another process; waited 10s" in one_error_line(r)
    assert 9 < took < 40, took
    release(holder)

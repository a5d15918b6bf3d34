"""A continuous job with consensus on PostgreSQL survives a restart of the server.

Real processes throughout: a throwaway PostgreSQL server of its own (so the
restart disturbs no other test), `shardflow run --mode continuous` of a loadgen
COUNTER flow, the server stopped and started again on the same port and data
directory in the middle of the run, then SIGINT. The collection must be exactly
`1 .. N` (nothing lost, nothing doubled) and N must have grown after the restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults_util import (
    FLOW,
    ROOT,
    SHARDFLOW,
    assert_exact,
    counter_values,
    one_error_line,
    shardflow,
)

try:
    from pgserver import PgServer, pg_available
except ImportError:  # tests/ imported as a package
    from tests.pgserver import PgServer, pg_available

pytestmark = pytest.mark.postgres

ROWS = 10


def _pg_ctl(pg: PgServer, *args: str) -> None:
    assert pg.pg_ctl is not None
    rc, out = pg._run([pg.pg_ctl, "-D", str(pg.data_dir), "-w", "-t", "30", *args])
    assert rc == 0, out


@pytest.fixture
def pg() -> PgServer:
    if not pg_available():
        pytest.skip("PostgreSQL not available (initdb/pg_ctl)")
    with PgServer() as server:
        yield server


def _wait_for_rows(data: Path, dsn: str, at_least: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        r = shardflow("query", "--data", str(data), "--consensus", dsn, "--format", "csv",
                      "SELECT counter FROM counter ORDER BY 1")
        if r.returncode == 0:
            values = [int(x) for x in r.stdout.split()[1:]]
            if len(values) >= at_least:
                return values
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.5)


def test_continuous_job_survives_postgres_restart(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.create_database("restart")
    data = tmp_path / "d"
    env = {**os.environ, "COUNTER_ROWS": str(ROWS), "COUNTER_RATE": "20"}
    p = subprocess.Popen(
        [*SHARDFLOW, "run", FLOW, "--data", str(data), "--consensus", dsn, "--mode", "continuous", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        before = _wait_for_rows(data, dsn, 5 * ROWS)
        # A real outage: fast shutdown (sessions get AdminShutdown), down for a while
        # (connections refused), then up again on the same port and data directory.
        _pg_ctl(pg, "-m", "fast", "stop")
        time.sleep(2.0)
        assert p.poll() is None, p.communicate()
        pg._pg_ctl_start()
        after = _wait_for_rows(data, dsn, len(before) + 20 * ROWS)
        time.sleep(1.0)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "panicked" not in err, err
    assert "continuous run of" in out
    final = counter_values(data, "--consensus", dsn)
    assert_exact(final, ROWS)
    assert len(final) >= len(after) > len(before)
    # A rerun resumes where the job stopped: still exact.
    env2 = {"COUNTER_ROWS": str(ROWS), "COUNTER_TICKS": str(len(final) // ROWS + 5)}
    r = shardflow("run", FLOW, "--data", str(data), "--consensus", dsn, env=env2)
    assert r.returncode == 0, r.stderr
    assert counter_values(data, "--consensus", dsn) == list(range(1, len(final) + 5 * ROWS + 1))


def test_unreachable_postgres_is_one_line(tmp_path: Path, pg: PgServer) -> None:
    """The database stays down: bounded retries, then one line naming the database."""
    dsn = pg.create_database("down")
    data = tmp_path / "d"
    r = shardflow("run", FLOW, "--data", str(data), "--consensus", dsn, env={"COUNTER_TICKS": "3"})
    assert r.returncode == 0, r.stderr
    _pg_ctl(pg, "-m", "fast", "stop")
    t0 = time.monotonic()
    r = shardflow("run", FLOW, "--data", str(data), "--consensus", dsn,
                  env={"COUNTER_TICKS": "6", "SHARDFLOW_CONSENSUS_TIMEOUT": "3"}, timeout=90)
    took = time.monotonic() - t0
    assert r.returncode == 1
    line = one_error_line(r)
    assert line.startswith(f"postgres consensus postgresql://127.0.0.1:{pg.port}/down: connect failed for "), line
    assert "OperationalError" in line and "Traceback" not in r.stderr
    assert took < 30, took
    pg._pg_ctl_start()
    r = shardflow("run", FLOW, "--data", str(data), "--consensus", dsn, env={"COUNTER_TICKS": "6"})
    assert r.returncode == 0, r.stderr
    assert counter_values(data, "--consensus", dsn) == list(range(1, 61))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_postgres_consensus_waits_once_per_outage(pg: PgServer) -> None:
    """Public API: retries for `timeout`, then one clear error; later calls in the same outage
    fail at once instead of waiting again; the first call after the restart succeeds."""
    import storage
    from storage.consensus import PostgresConsensus, VersionedData

    c = PostgresConsensus(pg.create_database("outage"), timeout=3)
    assert c.compare_and_set("k", None, VersionedData(0, b"v0"))
    _pg_ctl(pg, "-m", "fast", "stop")
    waits = []
    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises(storage.ConsensusUnavailable, match=f"postgresql://127.0.0.1:{pg.port}/outage"):
            c.compare_and_set("k", 0, VersionedData(1, b"v1"))
        waits.append(time.monotonic() - t0)
    # The first call retries for most of the 3 s (it stops early when the next backoff would
    # pass the deadline); the later ones only get what is left of that one wait, so the whole
    # outage costs about one timeout. Waiting a full timeout each would take 9 s or more.
    assert waits[0] > 1, waits
    assert sum(waits) < 3 + 2, waits
    pg._pg_ctl_start()
    assert c.compare_and_set("k", 0, VersionedData(1, b"v1"))
    assert [v.data for v in c.scan("k", 0)] == [b"v0", b"v1"]
    c.close()

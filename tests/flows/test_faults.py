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
    assert_exact,
    counter_values,
    one_error_line,
    shardflow,
    upper,
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
    assert took < 15, took  # one wait for the whole failing run (plus start-up), not one per write
    # Once the other process lets go, the same run goes through: nothing lost, nothing doubled.
    release(holder)
    r = shardflow("run", FLOW, "--data", str(data), env=env)
    assert r.returncode == 0, r.stderr
    assert counter_values(data) == list(range(1, 101))


def test_locked_sqlite_consensus_waits_once_per_outage(
    tmp_path: Path, locker, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """Public API: a bounded wait, then `ConsensusUnavailable`; the writes after it (a failing
    job's clean-up) do not each wait again; the first write after the lock is gone succeeds."""
    import storage
    from storage.consensus import SqliteConsensus, VersionedData

    path = tmp_path / "c.sqlite"
    c = SqliteConsensus(path, timeout=1.0)
    assert c.compare_and_set("k", None, VersionedData(0, b"v0"))
    holder = locker(path)
    waits = []
    for i in range(3):
        t0 = time.monotonic()
        with pytest.raises(storage.ConsensusUnavailable, match="database is locked by another process"):
            c.compare_and_set("k", 0, VersionedData(1, b"v%d" % i))
        waits.append(time.monotonic() - t0)
    assert 0.9 < waits[0] < 5 and waits[1] < 0.5 and waits[2] < 0.5, waits
    assert c.head("k") == VersionedData(0, b"v0")  # reads still work under the writer's lock (WAL)
    release(holder)
    assert c.compare_and_set("k", 0, VersionedData(1, b"v1"))
    holder = locker(path)  # a new outage gets the full wait again
    t0 = time.monotonic()
    with pytest.raises(storage.ConsensusUnavailable):
        c.compare_and_set("k", 1, VersionedData(2, b"v2"))
    assert time.monotonic() - t0 > 0.9
    release(holder)
    assert [v.data for v in c.scan("k", 0)] == [b"v0", b"v1"]
    c.close()
    monkeypatch.delenv("SHARDFLOW_CONSENSUS_TIMEOUT", raising=False)
    assert SqliteConsensus(tmp_path / "d.sqlite").timeout == 10.0
    monkeypatch.setenv("SHARDFLOW_CONSENSUS_TIMEOUT", "2.5")
    assert SqliteConsensus(tmp_path / "d.sqlite").timeout == 2.5


@pytest.mark.slow  # waits the default 10 s by design
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
    assert 9 < took < 25, took
    release(holder)


# ------------------------------------------------------------------ item 11: a full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs); `grow(small_fs)` frees space by resizing it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def grow(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)


def leftovers(data: Path) -> list[str]:
    """Half-written files a reader could trip over: put temporaries."""
    return sorted(str(p) for p in data.rglob(".tmp-*"))


def test_full_disk_stops_with_one_line_and_rerun_matches_clean(tmp_path: Path, small_fs: Path) -> None:
    env = {"COUNTER_ROWS": "2000", "COUNTER_TICKS": "100"}
    clean = tmp_path / "clean"
    r = shardflow("run", FLOW, "--data", str(clean), env=env)
    assert r.returncode == 0, r.stderr

    data = small_fs / "d"
    r = shardflow("run", FLOW, "--data", str(data), env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    # KNOWN LEFTOVER (flows/job.py, not this module): closing the job's controller after the
    # failure tries to flush its status row to the same full disk and logs one warning line
    # ("controller close: flushing system.sink_status_history failed: <the same cause>").
    r.stderr = "".join(ln for ln in r.stderr.splitlines(True) if not ln.startswith("controller close: "))
    line = one_error_line(r)
    assert str(data) in line, line
    assert line.endswith(": no space left on device") or line.endswith(
        ": database or disk is full"
    ), line
    assert leftovers(data) == []

    grow(small_fs)  # (reading registers a reader in consensus: a write, so space first)
    # What did land is whole ticks, no gaps, no half-written part.
    partial = counter_values(data)
    assert_exact(partial, 2000)
    assert len(partial) < 200_000
    r = shardflow("run", FLOW, "--data", str(data), env=env)
    assert r.returncode == 0, r.stderr
    assert counter_values(data) == counter_values(clean) == list(range(1, 200_001))
    assert upper(data) == upper(clean)
    assert leftovers(data) == []
    r = shardflow("fsck", "--data", str(data))
    assert r.returncode == 0 and "FAILED" not in r.stdout, r.stdout


def test_full_disk_under_sqlite_consensus_is_one_error(tmp_path: Path, small_fs: Path) -> None:
    """Consensus alone on the small filesystem (parts elsewhere): SQLite's "disk is full"."""
    import pyarrow as pa

    import storage
    from storage.consensus import SqliteConsensus

    path = small_fs / "consensus.sqlite"
    client = storage.open(tmp_path / "s", consensus=SqliteConsensus(path), blob=storage.LocalBlob(tmp_path / "blob"))
    try:
        w = client.open_writer(storage.ShardId.new(), pa.schema([("k", pa.string())]), compact=False)
        acked: list[str] = []
        t = 0
        with pytest.raises(storage.OutOfSpace) as e:
            while t < 100_000:
                keys = [f"k{t}-{j}-" + "x" * 200 for j in range(5)]
                tbl = pa.table({"k": keys, "_time": pa.array([t] * 5, pa.int64()), "_diff": pa.array([1] * 5, pa.int64())})
                w.compare_and_append(tbl, t, t + 1)
                acked += keys
                t += 1
        assert str(e.value) == f"sqlite consensus {path}: database or disk is full"
        assert t > 3  # some appends were acknowledged first
        assert w.upper == storage.Frontier(t)  # the failed append is not visible
        grow(small_fs)  # (a leased reader registers itself: that is a write, too)
        r = client.open_leased_reader(w.shard_id, heartbeat=False)
        assert sorted(r.snapshot(t - 1).column("k").to_pylist()) == sorted(acked)
        # The same append, retried after freeing space, lands once.
        keys = [f"k{t}-{j}-" + "x" * 200 for j in range(5)]
        tbl = pa.table({"k": keys, "_time": pa.array([t] * 5, pa.int64()), "_diff": pa.array([1] * 5, pa.int64())})
        w.compare_and_append(tbl, t, t + 1)
        assert sorted(r.snapshot(t).column("k").to_pylist()) == sorted(acked + keys)
        r.expire()
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["local", "arrowfs"])
def test_blob_put_on_full_disk_leaves_nothing(small_fs: Path, kind: str) -> None:
    import pyarrow.fs as pafs

    import storage

    blob = storage.LocalBlob(small_fs / "b") if kind == "local" else storage.ArrowFsBlob(pafs.LocalFileSystem(), str(small_fs / "b"))
    blob.put("s/small", b"x" * 1000)
    with pytest.raises(storage.OutOfSpace) as e:
        blob.put("s/big", os.urandom(2 << 20))
    assert str(e.value) == f"blob {small_fs / 'b' / 's' / 'big'}: no space left on device"
    assert blob.get("s/big") is None and blob.get("s/small") == b"x" * 1000
    assert leftovers(small_fs) == [] and sorted(m.key for m in blob.list()) == ["s/small"]

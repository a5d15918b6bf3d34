"""gc, finalize and verify: what is deleted, what never is, tombstones, integrity."""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pytest

import storage
from storage import state as st
from storage.gc import GcReport, finalize, gc, verify

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


class FakeClock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now




def _rows(i: int, n: int = 3) -> pa.Table:
    return pa.table({
        "k": [f"k{i}-{j}" for j in range(n)], "v": [j for j in range(n)],
        "_time": [i] * n, "_diff": [1] * n,
    })


def _fill(client: storage.Client, shard: str, n: int) -> storage.WriteHandle:
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    for i in range(n):
        w.compare_and_append(_rows(i), i, i + 1)
    return w


def _blob_keys(client: storage.Client, shard: str) -> set[str]:
    return {m.key for m in client.blob.list(f"{shard}/")}


def _live_keys(client: storage.Client, shard: str) -> set[str]:
    return {p.key for b in client.state(shard).batches for p in b.parts}


def _snap(r: storage.ReadHandle, as_of: int) -> list[tuple[str, int, int]]:
    return sorted((x["k"], x["v"], x["_diff"]) for x in r.snapshot(as_of).to_pylist())


def _expected(upto: int, n: int = 3) -> list[tuple[str, int, int]]:
    return sorted((f"k{i}-{j}", j, 1) for i in range(upto + 1) for j in range(n))


# ---------------------------------------------------------------- gc


def test_gc_deletes_replaced_parts_and_truncates(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 12)
    before = _blob_keys(client, shard)
    client.compact(shard)
    head = client.state(shard)
    rep = gc(client, shard)
    assert isinstance(rep, GcReport)
    assert _blob_keys(client, shard) == _live_keys(client, shard)
    assert rep.parts_deleted == len(before - _live_keys(client, shard)) > 0
    assert rep.bytes_deleted > 0 and rep.orphans_deleted == 0
    # Consensus keeps only the head (no reader pins anything older).
    assert rep.pinned_seqno == head.seqno
    assert [v.seqno for v in client.consensus.scan(f"shard/{shard}", 0)] == [head.seqno]
    assert rep.versions_truncated == head.seqno
    again = gc(client, shard)
    assert (again.parts_deleted, again.versions_truncated) == (0, 0)
    with client.open_leased_reader(shard) as r:
        assert _snap(r, 11) == _expected(11)


def test_gc_keeps_everything_a_live_reader_pins(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 12)
    r = client.open_leased_reader(shard, heartbeat=False)
    pinned = client.state(shard).leased_readers[r.reader_id].seqno
    old_keys = _live_keys(client, shard)
    client.compact(shard)
    rep = gc(client, shard)
    # The reader pins a version that still lists the pre-compaction batches.
    assert rep.pinned_seqno == pinned and rep.parts_deleted == 0
    assert old_keys <= _blob_keys(client, shard)
    assert client.consensus.scan(f"shard/{shard}", 0)[0].seqno == pinned
    # Once the reader moves on (heartbeat after reading the new head), gc may collect.
    assert _snap(r, 11) == _expected(11)
    r.heartbeat()
    rep = gc(client, shard)
    assert rep.parts_deleted == len(old_keys - _live_keys(client, shard)) > 0
    assert _snap(r, 11) == _expected(11)
    r.expire()


def test_gc_ignores_an_expired_readers_pin(tmp_path) -> None:  # noqa: ANN001
    clock = FakeClock()
    client = storage.open(tmp_path, fsync=False, clock=clock)
    shard = storage.ShardId.new()
    _fill(client, shard, 12)
    r = client.open_leased_reader(shard, heartbeat=False, lease_ms=1000)
    client.compact(shard)
    assert gc(client, shard).parts_deleted == 0
    clock.now += 1001
    assert gc(client, shard).parts_deleted > 0
    with pytest.raises(storage.LeaseExpired):
        r.snapshot(11)


def test_gc_deletes_orphans_only_after_the_grace_period(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 3)
    # An orphan: the parts of an append whose CAS then lost (written, never referenced).
    client.parts.write(shard, _rows(99))
    orphans = _blob_keys(client, shard) - _live_keys(client, shard)
    assert len(orphans) == 1
    rep = gc(client, shard)  # default grace: minutes
    assert rep.orphans_kept == 1 and rep.orphans_deleted == 0
    assert orphans <= _blob_keys(client, shard)
    dry = gc(client, shard, grace_ms=0, dry_run=True)
    assert dry.orphans_deleted == 1 and orphans <= _blob_keys(client, shard)
    # Age the orphan past a short grace period.
    (key,) = orphans
    old = time.time() - 120
    os.utime(client.blob.local_path(key), (old, old))
    rep = gc(client, shard, grace_ms=60_000)
    assert rep.orphans_deleted == 1 and not (orphans & _blob_keys(client, shard))
    assert _blob_keys(client, shard) == _live_keys(client, shard)


def test_gc_during_snapshots_never_breaks_a_read(client: storage.Client) -> None:
    """Readers snapshot in threads while the main thread appends, compacts and gcs."""
    shard = storage.ShardId.new()
    w = _fill(client, shard, 5)
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader_loop() -> None:
        # A short lease: the heartbeat moves the pin forward, so gc really collects.
        with client.open_leased_reader(shard, lease_ms=1500) as r:
            while not stop.is_set():
                s = client.state(shard)
                as_of = s.upper.time - 1  # type: ignore[operator]
                try:
                    got = _snap(r, as_of)
                    assert got == _expected(as_of), as_of
                    reads[0] += 1
                except BaseException as e:  # noqa: BLE001
                    failures.append(e)
                    return

    threads = [threading.Thread(target=reader_loop) for _ in range(3)]
    for t in threads:
        t.start()
    deleted = 0
    try:
        for i in range(5, 80):
            w.compare_and_append(_rows(i), i, i + 1)
            client.compact(shard)
            deleted += gc(client, shard, grace_ms=0).parts_deleted
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[0]
    assert reads[0] > 10 and deleted > 0


# ---------------------------------------------------------------- finalize


def test_finalize_makes_a_tombstone_and_deletes_every_part(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    w = _fill(client, shard, 8)
    r = client.open_leased_reader(shard, heartbeat=False)
    crit = client.open_critical_since(shard, "ctl", 1)
    client.blob.put(f"{shard}/orphan.parquet", b"x")  # e.g. a lost append's part
    # Held by a live reader and a critical handle: the upper closes, nothing else happens.
    held = finalize(client, shard)
    assert sorted(held) == sorted([r.reader_id, "ctl"])
    s = client.state(shard)
    assert s.upper.is_empty and not s.is_tombstone and s.batches and _blob_keys(client, shard)
    assert s.leased_readers and s.critical_readers
    # An operator's force drops every hold.
    assert finalize(client, shard, force=True) == {}
    s = client.state(shard)
    assert s.is_tombstone and s.batches == () and not s.leased_readers and not s.critical_readers
    st.check_invariants(s)
    assert _blob_keys(client, shard) == set()
    assert [v.seqno for v in client.consensus.scan(f"shard/{shard}", 0)] == [s.seqno]
    # Every later call says Tombstone.
    calls = {
        "open_writer": lambda: client.open_writer(shard),
        "compare_and_append": lambda: w.compare_and_append(_rows(8), 8, 9),
        "append": lambda: w.append(_rows(8), 8, 9),
        "monotonic_append": lambda: w.monotonic_append(pa.table({"k": ["x"], "v": [1]})),
        "open_leased_reader": lambda: client.open_leased_reader(shard),
        "snapshot": lambda: r.snapshot(3),
        "listen": lambda: next(iter(r.listen(3))),
        "downgrade_since": lambda: r.downgrade_since(5),
        "open_critical_since": lambda: client.open_critical_since(shard, "other", 1),
        "compare_and_downgrade_since": lambda: crit.compare_and_downgrade_since(1, (1, 5)),
        "compact": lambda: client.compact(shard),
    }
    for name, call in calls.items():
        with pytest.raises(storage.Tombstone):
            call()
            pytest.fail(name)
    # Finalizing again does nothing.
    assert finalize(client, shard) == {}
    assert client.state(shard).seqno == s.seqno
    rep = client.gc(shard, grace_ms=0)
    assert rep.parts_deleted == rep.orphans_deleted == rep.versions_truncated == 0
    v = client.verify(shard)
    assert v.tombstone and v.ok and v.parts_checked == 0


def test_finalize_resumes_after_each_step(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 3)
    m = client.machine(shard)
    m.apply(st.finalize_upper, writer_id="x")
    assert client.state(shard).upper.is_empty and not client.state(shard).is_tombstone
    with client.open_leased_reader(shard) as r:  # closed but not yet a tombstone: still readable
        assert _snap(r, 10**6) == _expected(2)
    m.apply(st.finalize_since)  # crash after step 2
    assert client.state(shard).is_tombstone and client.state(shard).batches
    client.finalize(shard)
    assert client.state(shard).batches == () and _blob_keys(client, shard) == set()


def test_finalize_unknown_shard(client: storage.Client) -> None:
    with pytest.raises(storage.ShardNotFound):
        client.finalize(storage.ShardId.new())


# ---------------------------------------------------------------- verify / integrity


def test_verify_reports_flipped_and_missing_parts(tmp_path) -> None:  # noqa: ANN001
    client = storage.open(tmp_path, fsync=False)
    shard = storage.ShardId.new()
    _fill(client, shard, 4)
    ok = client.verify(shard)
    assert ok.ok and ok.parts_checked == 4 and ok.bytes_checked > 0 and not ok.tombstone
    s = client.state(shard)
    flipped, missing = s.batches[1].parts[0], s.batches[3].parts[0]
    path = client.blob.local_path(flipped.key)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    os.unlink(client.blob.local_path(missing.key))
    rep = verify(client, shard)
    assert not rep.ok and rep.parts_checked == 4 and len(rep.problems) == 2
    msgs = sorted(str(p) for p in rep.problems)
    assert all(isinstance(p, storage.CorruptPart) for p in rep.problems)
    assert f"shard {shard}: batch [1, 2) part {flipped.key}: sha256" in msgs[0]
    assert msgs[1] == f"shard {shard}: batch [3, 4) part {missing.key}: missing"


@pytest.mark.parametrize("damage", ["flip", "delete", "truncate"])
def test_snapshot_raises_corrupt_part_never_a_wrong_answer(tmp_path, damage: str) -> None:  # noqa: ANN001
    client = storage.open(tmp_path, fsync=False)
    shard = storage.ShardId.new()
    _fill(client, shard, 3)
    part = client.state(shard).batches[1].parts[0]
    path = client.blob.local_path(part.key)
    data = open(path, "rb").read()
    if damage == "flip":
        # Flip one byte in a value page (the middle of the file), size unchanged.
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        open(path, "wb").write(bytes(b))
    elif damage == "delete":
        os.unlink(path)
    else:
        open(path, "wb").write(data[:-10])
    # A fresh client (no verification cache) and this one after the damage.
    for c in (client, storage.open(tmp_path, fsync=False)):
        with c.open_leased_reader(shard) as r:
            with pytest.raises(storage.CorruptPart, match=rf"shard {shard}: batch \[1, 2\) part {part.key}"):
                r.snapshot(2)
            # as_of before the damaged batch does not need it.
            assert _snap(r, 0) == _expected(0)
    with pytest.raises(storage.CorruptPart):
        client.compact(shard, fanout=2)

"""The decoded-state cache and the incremental decode (issue 13, flat appends).

A state fetched through the cache or decoded incrementally (reusing the batches
it shares with the last version seen) must equal a from-scratch decode of the
same stored bytes, after any mix of appends, empty appends, merges and reader
changes, and under writers racing `compare_and_append`. And an append must not
re-parse the batches it did not change.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import storage
from storage import Frontier, ShardId
from storage import state as st
from storage.errors import UpperMismatch
from storage.machine import shard_key

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


def rows(t0: int, t1: int, n: int, tag: str) -> pa.Table:
    return pa.table({
        "k": pa.array([f"{tag}-{i % 7}" for i in range(n)], pa.string()),
        "v": pa.array(range(n), pa.int64()),
        "_time": pa.array([t0 + i % max(1, t1 - t0) for i in range(n)], pa.int64()),
        "_diff": pa.array([1] * n, pa.int64()),
    })


def from_scratch(client: storage.Client, shard: str) -> st.ShardState:
    """The head decoded with no cache and nothing reused (no shard id: no cache lookup)."""
    head = client.consensus.head(shard_key(shard))
    assert head is not None
    return st.ShardState.decode(head.data, "test")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=hs.lists(hs.sampled_from(["append", "empty", "wide", "compact", "reader", "foreign"]), min_size=1, max_size=25))
def test_cached_and_incremental_decode_equal_a_from_scratch_decode(tmp_path_factory: pytest.TempPathFactory, ops: list[str]) -> None:
    root = tmp_path_factory.mktemp("cache")
    client = storage.open(str(root), fsync=False)
    other = storage.open(str(root), fsync=False)  # another client: its own handles, the same process cache
    try:
        shard = ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA, compact=False)
        w2 = other.open_writer(shard, compact=False)
        upper, readers = 0, []
        for i, op in enumerate(ops):
            if op == "append":
                w.compare_and_append(rows(upper, upper + 1, 3, f"a{i}"), upper, upper + 1, metadata={"n": (i, i)})
                upper += 1
            elif op == "empty":
                w.compare_and_append(rows(0, 1, 0, "e"), upper, upper + 2)
                upper += 2
            elif op == "wide":
                w.compare_and_append(rows(upper, upper + 5, 11, f"w{i}"), upper, upper + 5, offsets={"p": i})
                upper += 5
            elif op == "compact":
                client.compact(shard, full=i % 2 == 0)
            elif op == "reader":
                readers.append(other.open_leased_reader(shard, heartbeat=False))
            else:  # another writer appends: this client's cached version is now old
                w2.compare_and_append(rows(upper, upper + 1, 2, f"f{i}"), upper, upper + 1)
                upper += 1
            want = from_scratch(client, shard)
            for c in (client, other):
                got = c.state(shard)
                assert got == want
                st.check_invariants(got)
            assert want.upper == Frontier(upper)
        for r in readers:
            r.expire()
    finally:
        other.close()
        client.close()


def settled_state(client: storage.Client, shard: str) -> tuple[st.ShardState, st.ShardState]:
    """`client.state(shard)` and a from-scratch decode of the same version.

    Background compaction may commit a merge at any moment, so the head is decoded
    before and after the fetch; the pair counts only when no version came between
    (a stale cache shows as a fetched seqno below the one decoded before it).
    """
    for _ in range(50):
        before = from_scratch(client, shard)
        got = client.state(shard)
        after = from_scratch(client, shard)
        assert before.seqno <= got.seqno <= after.seqno, (before.seqno, got.seqno, after.seqno)
        if before.seqno == after.seqno:
            return got, before
    raise AssertionError("the shard's state never held still for one fetch")


def test_racing_writers_never_see_a_stale_state(tmp_path: Path) -> None:
    """Two writers (two clients, one process cache) race compare_and_append at the same upper.

    Each round exactly one wins; the loser's UpperMismatch names the winner's upper
    (a stale cached state would report the old one, or let both win); both then see
    the state a from-scratch decode gives. Background compaction runs meanwhile, so
    merges rewrite batches in the middle of the state too.
    """
    c1 = storage.open(str(tmp_path), fsync=False)
    c2 = storage.open(str(tmp_path), fsync=False)
    try:
        shard = ShardId.new()
        writers = [c1.open_writer(shard, schema=SCHEMA), c2.open_writer(shard)]
        upper = 0
        for rnd in range(40):
            barrier = threading.Barrier(2)
            won: list[int] = []
            lost: list[Frontier] = []

            def race(j: int, lo: int = upper, rnd: int = rnd, barrier: threading.Barrier = barrier,
                     won: list[int] = won, lost: list[Frontier] = lost) -> None:
                hi = lo + 1 + j  # each writer its own new upper: the winner shows in the upper
                barrier.wait()
                try:
                    writers[j].compare_and_append(rows(lo, hi, 3, f"r{rnd}w{j}"), lo, hi)
                    won.append(hi)
                except UpperMismatch as e:
                    lost.append(e.current)

            ts = [threading.Thread(target=race, args=(j,)) for j in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert len(won) == 1, (rnd, won, lost)
            upper = won[0]
            assert lost == [Frontier(upper)], (rnd, won, lost)
            for c in (c1, c2):
                got, want = settled_state(c, shard)
                assert got == want
            assert want.upper == Frontier(upper)
        c1.wait_compaction(timeout=60)
        c2.wait_compaction(timeout=60)
        got, want = settled_state(c2, shard)
        assert got == want
    finally:
        c2.close()
        c1.close()


def test_an_append_parses_only_its_own_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost of decoding does not grow with the batches: an append (its early upper check
    and its compare-and-set) and a reader's fetch parse no batch they already saw, even
    when another client wrote the new version.
    """
    c1 = storage.open(str(tmp_path), fsync=False)
    c2 = storage.open(str(tmp_path), fsync=False)
    try:
        shard = ShardId.new()
        w1 = c1.open_writer(shard, schema=SCHEMA, compact=False)
        w2 = c2.open_writer(shard, compact=False)
        for t in range(60):
            w1.compare_and_append(rows(t, t + 1, 2, "x"), t, t + 1)
        parsed: list[int] = []
        orig = st.BatchMeta.from_json.__func__  # type: ignore[attr-defined]

        def counting(cls: type[st.BatchMeta], d: dict) -> st.BatchMeta:  # type: ignore[type-arg]
            parsed.append(1)
            return orig(cls, d)  # type: ignore[no-any-return]

        monkeypatch.setattr(st.BatchMeta, "from_json", classmethod(counting))
        w1.compare_and_append(rows(60, 61, 2, "x"), 60, 61)
        assert len(parsed) == 0  # this writer's own version: cached
        w2.compare_and_append(rows(61, 62, 2, "y"), 61, 62)  # a version w1's process last saw at 61
        assert len(parsed) <= 1
        parsed.clear()
        assert len(c1.state(shard).batches) == 62
        assert len(parsed) == 0
        c1.compact(shard)  # merges: a new prefix; the batches after it are parsed again at most once
        parsed.clear()
        s = c2.state(shard)
        assert len(parsed) == 0 and s == from_scratch(c2, shard)
    finally:
        c2.close()
        c1.close()


def test_an_append_reads_the_head_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The early upper check's head is the compare-and-set's first attempt: one read of a
    whole state version per append, not two (a stale one only loses its compare-and-set:
    `test_racing_writers_never_see_a_stale_state`)."""
    client = storage.open(str(tmp_path), fsync=False)
    try:
        shard = ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA, compact=False)
        w.compare_and_append(rows(0, 1, 2, "x"), 0, 1)
        reads: list[str] = []
        orig = client.consensus.head

        def counting(key: str):  # type: ignore[no-untyped-def]
            reads.append(key)
            return orig(key)

        monkeypatch.setattr(client.consensus, "head", counting)
        w.compare_and_append(rows(1, 2, 2, "x"), 1, 2)
        assert reads == [shard_key(shard)]
        assert client.state(shard) == from_scratch(client, shard)
    finally:
        client.close()

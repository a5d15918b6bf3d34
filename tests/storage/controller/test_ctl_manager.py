"""The collection manager: append-only and differential collections, ticking, unregistering."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from ctl_helpers import KV, contents

import storage
from storage.controller import Append, CollectionDesc, Delete, StorageController, step_back
from storage.errors import IdentifierInvalid, InvalidInput, InvalidUppers, ReadOnly, UpperMismatch
from storage.frontier import Frontier


def rows(*kv):
    return pa.table({"k": [k for k, _ in kv], "v": [v for _, v in kv]}, schema=KV)


def test_appender_one_commit_per_flush(client, clock, ctl):
    ctl.create_collections([CollectionDesc("events", KV, data_source="webhook")])
    a = ctl.monotonic_appender("events")
    assert ctl.monotonic_appender("events") is a
    futs = [a.append(rows((f"e{i}", i)), wait=False) for i in range(5)]
    assert not any(f.done() for f in futs)
    a.flush()
    assert a.commits == 1
    assert {f.result() for f in futs} == {clock.now}
    shard = ctl.collection("events").shard_id
    assert client.state(shard).upper == Frontier(clock.now + 1)
    assert len(contents(client, shard)) == 5
    clock.advance(100)
    assert a.append(rows(("late", 9))) == clock.now  # wait=True without a thread: commits now
    assert a.commits == 2


def test_appender_batches_in_background(client, clock):
    ctl = StorageController.open(client, clock=clock, tick_interval_ms=10_000, batch_duration_ms=300, compact=False)
    try:
        ctl.create_collections([CollectionDesc("events", KV, data_source="webhook")])
        a = ctl.monotonic_appender("events")
        out = []
        ts = [threading.Thread(target=lambda i=i: out.append(a.append(rows((f"e{i}", i))))) for i in range(8)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert len(out) == 8
        # 8 concurrent appends share at most a few commits (one per batch duration).
        assert a.commits <= 3, a.commits
        assert time.monotonic() - t0 < 5
        assert len(contents(client, ctl.collection("events").shard_id)) == 8
    finally:
        ctl.close()


def test_appender_read_only(client, clock, ctl):
    ctl.create_collections([CollectionDesc("events", KV, data_source="webhook")])
    ro = StorageController.open(client, clock=clock, tick_interval_ms=None, read_only=True)
    try:
        with pytest.raises(ReadOnly):
            ro.monotonic_appender("events").append(rows(("a", 1)))
    finally:
        ro.close()


def test_manager_refuses_flow_and_table_collections(ctl):
    ctl.create_collections([CollectionDesc("o", KV, data_source="ingestion"), CollectionDesc("t", KV, data_source="table")])
    with pytest.raises(InvalidInput, match="a flow"):
        ctl.monotonic_appender("o")
    with pytest.raises(InvalidInput, match="append_table"):
        ctl.differential_write("t", Append(rows(("a", 1))))
    with pytest.raises(InvalidInput, match="controller itself"):
        ctl.differential_write("system.frontiers", Append(rows(("a", 1))))


def test_unregister_answers_queued_writes(client, ctl):
    ctl.create_collections([CollectionDesc("events", KV, data_source="webhook")])
    a = ctl.monotonic_appender("events")
    f = a.append(rows(("a", 1)), wait=False)
    ctl.drop_collections(["events"])
    with pytest.raises(IdentifierInvalid, match="dropped"):
        f.result(1)
    with pytest.raises(IdentifierInvalid):
        a.append(rows(("b", 2)))


def test_ticks_idle_uppers(client, clock, ctl):
    ctl.create_collections([CollectionDesc("events", KV, data_source="webhook"), CollectionDesc("kv", KV)])
    ctl.monotonic_appender("events")
    ctl.differential_write("kv", Append(rows(("a", 1))))
    clock.advance(5000)
    ctl.tick()
    for n in ("events", "kv"):
        assert client.state(ctl.collection(n).shard_id).upper == Frontier(clock.now)
        assert ctl.frontiers(n) == (Frontier(clock.now - 1000), Frontier(clock.now))


def test_differential_append_delete(client, clock, ctl):
    ctl.create_collections([CollectionDesc("kv", KV)])
    shard = ctl.collection("kv").shard_id
    ctl.differential_write("kv", Append(rows(("a", 1), ("b", 2), ("c", 3))))
    clock.advance(10)
    up = ctl.differential_write("kv", Delete("v >= 2"))
    assert up == Frontier(clock.now)
    assert contents(client, shard) == [("a", 1, 1)]
    with pytest.raises(InvalidInput, match="filter"):
        ctl.differential_write("kv", Delete("nope ="))
    with pytest.raises(InvalidInput, match="filter"):
        ctl.differential_write("kv", Delete("true; DROP TABLE x"))
    assert contents(client, shard) == [("a", 1, 1)]


def test_differential_converges_with_foreign_writer(client, clock, ctl):
    ctl.create_collections([CollectionDesc("kv", KV)])
    shard = ctl.collection("kv").shard_id
    ctl.differential_write("kv", Append(rows(("a", 1), ("b", 2))))
    foreign = client.open_writer(shard)
    up = foreign.upper.time
    # A foreign writer deletes "a" and inserts garbage, moving the upper.
    foreign.compare_and_append(
        pa.table({"k": ["a", "zz"], "v": [1, 99], "_time": [up, up], "_diff": [-1, 1]}), up, up + 5
    )
    clock.advance(1)
    ctl.differential_write("kv", Append(rows(("c", 3))))  # loses the race, re-syncs, corrects
    assert contents(client, shard) == [("a", 1, 1), ("b", 2, 1), ("c", 3, 1)]
    # And a foreign write that only happens later is corrected at the next tick.
    up = foreign.upper.time
    foreign.compare_and_append(pa.table({"k": ["b"], "v": [2], "_time": [up], "_diff": [1]}), up, up + 1)
    clock.advance(1)
    ctl.tick()
    assert contents(client, shard) == [("a", 1, 1), ("b", 2, 1), ("c", 3, 1)]


def test_differential_invalid_uppers_after_retries(client, clock, ctl, monkeypatch):
    ctl.create_collections([CollectionDesc("kv", KV)])
    ctl.differential_write("kv", Append(rows(("a", 1))))
    shard = ctl.collection("kv").shard_id
    sleeps = []
    ctl._sleep = sleeps.append
    foreign = client.open_writer(shard)
    w = ctl._colls["kv"].write.writer

    def always_lose(updates, lower, upper, **kw):
        cur = foreign.upper
        foreign.compare_and_append(pa.table({"k": [], "v": [], "_time": [], "_diff": []},
                                            schema=pa.schema([*KV, ("_time", pa.int64()), ("_diff", pa.int64())])),
                                   cur, cur.time + 1)
        raise UpperMismatch(shard, lower, foreign.upper)

    monkeypatch.setattr(w, "compare_and_append", always_lose)
    with pytest.raises(InvalidUppers, match="'kv'.*6 times"):
        ctl.differential_write("kv", Append(rows(("b", 2))))
    # Bounded, growing backoff between the retries.
    assert sleeps == sorted(sleeps) and len(sleeps) == ctl.max_write_retries and max(sleeps) <= 0.5


def test_differential_desired_survives_restart(client, clock, ctl):
    ctl.create_collections([CollectionDesc("kv", KV)])
    ctl.differential_write("kv", Append(rows(("a", 1), ("b", 2))))
    ctl.close()
    ctl2 = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    try:
        clock.advance(5)
        ctl2.differential_write("kv", Delete("k = 'a'"))
        assert contents(client, ctl2.collection("kv").shard_id) == [("b", 2, 1)]
    finally:
        ctl2.close()


def test_background_ticker_and_compaction(tmp_path):
    """With a real clock and interval, idle uppers move forward and since reaches the shard."""
    client = storage.open(str(tmp_path / "rt"), fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=50, compact_interval_ms=0)
    try:
        ctl.create_collections([CollectionDesc("events", KV, data_source="webhook")])
        a = ctl.monotonic_appender("events")
        a(rows(("a", 1)))  # an appender is callable (webhook on_batch)
        ctl.set_read_policy({"events": step_back()})
        shard = ctl.collection("events").shard_id
        u0 = client.state(shard).upper
        deadline = time.monotonic() + 10
        while client.state(shard).upper <= u0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.state(shard).upper > u0
        assert ctl.ticks > 0
        while client.state(shard).since < u0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.state(shard).since >= u0
    finally:
        ctl.close()
        client.close()

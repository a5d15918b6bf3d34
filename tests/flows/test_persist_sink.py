from __future__ import annotations

import random
import tempfile
from collections import Counter

import bytewax.operators as op
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from flowtest_util import upd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import storage
from flows.operators import consolidate
from flows.sinks import (
    Committed,
    PersistLogic,
    _PartWriter,
    append_sink,
    persist_sink,
    resume_point,
)
from storage import Frontier, Progress, UpdateBatch

SCHEMA = pa.schema([("k", pa.string())])
PARTS = ("src/0",)


def contents(client, shard, t) -> Counter:
    with client.open_leased_reader(shard) as r:
        snap = r.snapshot(t, timeout=0)
    return Counter({row["k"]: row["_diff"] for row in snap.to_pylist()})


def desired_at(ticks, t) -> Counter:
    c: Counter = Counter()
    for tab in ticks:
        for r in tab.to_pylist():
            if r["_time"] <= t:
                c[r["k"]] += r["_diff"]
    return Counter({k: v for k, v in c.items() if v})


def tick(i: int) -> pa.Table:
    """Tick i: insert key i%5 at 2i, retract it at 2i+3 (straddles the next Progress)."""
    return upd([(f"k{i % 5}", 2 * i, 1), (f"x{i}", 2 * i, 1), (f"x{i}", 2 * i + 3, -1)])


def items_for(ticks, start=0):
    out = []
    for i in range(start, len(ticks)):
        out.append(UpdateBatch(ticks[i], offsets={"src/0": i}))
        out.append(Progress(Frontier(2 * i + 1), "src/0", PARTS))
    return out


def final_upper(n):
    return 2 * n + 3


def assert_equals_desired(client, shard, ticks, lo=0):
    up = client.state(shard).upper.time
    assert up is not None and up >= final_upper(len(ticks)) - 3
    for t in range(lo, up):
        assert contents(client, shard, t) == desired_at(ticks, t), t


def run_flow(runner, client, shard, items, *, as_of=None, cons=True):
    out: list = []
    flow = Dataflow("p")
    s = op.input("in", flow, TestingSource(items))
    if cons:
        s = consolidate("cons", s)
    op.output("out", persist_sink("sink", s, client, shard, as_of=as_of, schema=SCHEMA), TestingSink(out))
    runner(flow)
    return out


@pytest.fixture
def client():
    return storage.open(tempfile.mkdtemp(prefix="sf-sink-"))


@pytest.mark.parametrize("cons", [True, False])
def test_persist_sink_writes_desired(runner, client, cons):
    ticks = [tick(i) for i in range(8)]
    shard = str(storage.ShardId.new())
    # a final progress past the last retraction
    items = items_for(ticks) + [Progress(Frontier(final_upper(8)), "src/0", PARTS)]
    out = run_flow(runner, client, shard, items, cons=cons)
    assert all(isinstance(c, Committed) for c in out)
    assert_equals_desired(client, shard, ticks)
    s = client.state(shard)
    assert s.upper == final_upper(8)
    assert resume_point(s) == ({"src/0": 7}, final_upper(8))


def test_persist_sink_corrects_foreign_contents(runner, client):
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    w.compare_and_append(upd([("k0", 0, 5), ("junk", 1, 1), ("k1", 2, -1)]), 0, 4)
    ticks = [tick(i) for i in range(6)]
    run_flow(runner, client, shard, items_for(ticks) + [Progress(Frontier(final_upper(6)), "src/0", PARTS)])
    # times before the foreign upper cannot be rewritten; from there on it is desired
    assert_equals_desired(client, shard, ticks, lo=4)


def test_persist_sink_resume_from_offsets(runner, client):
    shard = str(storage.ShardId.new())
    client.open_writer(shard, SCHEMA)
    ticks = [tick(i) for i in range(10)]
    # the first run dies after half its input (no EOF, so no final flush)
    Driver(client, shard, items_for(ticks)).step(9)
    offs, as_of = resume_point(client.state(shard))
    assert offs and as_of is not None
    start = offs["src/0"] + 1
    run_flow(runner, client, shard, items_for(ticks, start) + [Progress(Frontier(final_upper(10)), "src/0", PARTS)], as_of=as_of)
    assert_equals_desired(client, shard, ticks)


def test_two_sinks_same_shard_converge(client):
    """Two committers of the same desired, interleaved step by step, never disagree with desired."""
    shard = str(storage.ShardId.new())
    client.open_writer(shard, SCHEMA)
    ticks = [tick(i) for i in range(10)]
    items = items_for(ticks) + [Progress(Frontier(final_upper(10)), "src/0", PARTS)]
    a, b = Driver(client, shard, items), Driver(client, shard, items)
    rnd = random.Random(1)
    while not (a.done and b.done):
        rnd.choice([d for d in (a, b) if not d.done]).step(rnd.randint(1, 3))
    assert_equals_desired(client, shard, ticks)


def test_append_sink(runner, client):
    shard = str(storage.ShardId.new())
    client.open_writer(shard, SCHEMA)
    out: list = []
    flow = Dataflow("a")
    items = [UpdateBatch(upd([("a", 5, 1), ("b", 5, 1)]), offsets={"s/0": 0}), UpdateBatch(upd([("a", 7, -1)]), offsets={"s/0": 1})]
    s = op.input("in", flow, TestingSource(items))
    op.output("out", append_sink("app", s, client, shard, batch_duration=10.0), TestingSink(out))
    runner(flow)
    st = client.state(shard)
    assert sum(c.rows for c in out) == 3
    assert len(out) <= 2  # at most one per batch duration, plus the flush at EOF
    assert contents(client, shard, st.upper.time - 1) == Counter({"b": 1})
    assert st.metadata["offsets"] == {"s/0": 1}


# ---- model-based: foreign writes, restarts and a second sink at random points ----


class Driver:
    """Feeds a PersistLogic directly (no bytewax), like one copy of the flow."""

    def __init__(self, client, shard, items, start=0, as_of=None):
        self.client, self.shard, self.items, self.pos = client, shard, items, start
        self.writer = _PartWriter("t", client, shard, as_of)
        self.logic = PersistLogic("t", client, shard, as_of)

    @property
    def done(self):
        return self.pos >= len(self.items)

    def step(self, n):
        vals = [self.writer(x) for x in self.items[self.pos : self.pos + n]]
        self.pos += len(vals)
        self.logic.on_batch(vals)
        if self.done:
            self.logic.on_eof()


def restart(client, shard, ticks, items):
    offs, as_of = resume_point(client.state(shard))
    start = 0 if not offs else 2 * (offs["src/0"] + 1)  # two items per tick
    return Driver(client, shard, items, start, as_of)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=hs.lists(hs.tuples(hs.sampled_from(["a", "a", "a", "b", "foreign", "restart"]), hs.integers(1, 4)), max_size=25),
       n=hs.integers(2, 8))
def test_persist_sink_model(ops, n):
    client = storage.open(tempfile.mkdtemp(prefix="sf-model-"))
    shard = str(storage.ShardId.new())
    fw = client.open_writer(shard, SCHEMA)
    ticks = [tick(i) for i in range(n)]
    items = items_for(ticks) + [Progress(Frontier(final_upper(n)), "src/0", PARTS)]
    a = Driver(client, shard, items)
    b = Driver(client, shard, items)
    last_foreign = 0
    for kind, k in ops:
        if kind == "a" and not a.done:
            a.step(k)
        elif kind == "b" and not b.done:
            b.step(k)
        elif kind == "foreign":
            up = fw.upper.time
            if up < final_upper(n) - 1:
                fw.compare_and_append(upd([(f"junk{k}", up, k), ("k0", up, -1)]), up, up + 1)
                last_foreign = up + 1
        elif kind == "restart":
            a.logic.close()
            a = restart(client, shard, ticks, items)
    while not a.done:
        a.step(3)
    assert_equals_desired(client, shard, ticks, lo=last_foreign)


def test_resume_point_follows_commits_without_new_offsets(client):
    """A source whose frontier moves while idle (CDC on a quiet table): the resume point
    must follow every commit, or it falls below since and a restart can never correct from it."""
    shard = str(storage.ShardId.new())
    client.open_writer(shard, SCHEMA)
    ticks = [tick(i) for i in range(3)]
    idle = [Progress(Frontier(t), "src/0", PARTS) for t in (100, 1000, 5000)]
    run_flow(run_main, client, shard, items_for(ticks) + idle)
    st = client.state(shard)
    offs, as_of = resume_point(st)
    assert offs == {"src/0": 2}
    assert as_of == st.upper.time == 5000
    # Since moves past the old offsets' upper, as the default read policy would do ...
    r = client.open_leased_reader(shard)
    r.downgrade_since(4000)
    client.compact(shard)
    # ... and a restart from the resume point still works and adds nothing.
    run_flow(run_main, client, shard,
             [Progress(Frontier(6000), "src/0", PARTS)], as_of=as_of)
    assert contents(client, shard, 5999) == desired_at(ticks, 5999)
    r.expire()

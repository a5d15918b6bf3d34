from __future__ import annotations

import bytewax.operators as op
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource
from flowtest_util import rows_of, upd

from flows.operators import FrontierTracker, OffsetQueue, consolidate, sql
from storage import Frontier, Progress, UpdateBatch
from storage.errors import InvalidInput


def P(t, part=None, parts=None):
    return Progress(Frontier(t), part, parts)


def run_consolidate(runner, items):
    out: list = []
    flow = Dataflow("c")
    # SUBTLE: no redistribute here: it would reorder data after its Progress. The
    # single key still moves items to another worker under the 2-worker cluster.
    s = op.input("in", flow, TestingSource(items))
    op.output("out", consolidate("cons", s), TestingSink(out))
    runner(flow)
    return out


def test_frontier_tracker_min_over_partitions():
    t = FrontierTracker()
    assert t.frontier() is None
    t.observe(P(5, "a", ("a", "b")))
    assert t.frontier() is None
    t.observe(P(3, "b", ("a", "b")))
    assert t.frontier() == 3
    t.observe(P(2, "b", ("a", "b")))  # never moves back
    assert t.frontier() == 3
    t.observe(P(9, "b"))
    assert t.frontier() == 5


def test_offset_queue_waits_for_earlier_batches():
    q = OffsetQueue()
    q.push({"s/0": 1}, 10)
    q.push({"s/0": 2}, 3)
    assert q.pop(Frontier(5)) == {}
    assert q.pop(Frontier(11)) == {"s/0": 2}


def check_tiling(out):
    """Progress strictly increases; each batch is [previous progress, next progress), times inside."""
    prev = Frontier(0)
    expect_progress = False
    for x in out:
        if isinstance(x, UpdateBatch):
            assert x.lower == prev and not expect_progress
            for t in x.table.column("_time").to_pylist():
                assert x.lower.less_equal(t) and not x.upper.less_equal(t)
            expect_progress = x.upper
        else:
            assert prev < x.frontier
            assert expect_progress in (False, x.frontier)
            prev, expect_progress = x.frontier, False


def flat(out):
    rows = []
    offs = {}
    for x in out:
        if isinstance(x, UpdateBatch):
            rows += rows_of(x.table)
            offs.update(x.offsets or {})
    return sorted(rows), offs


def test_consolidate_emits_per_frontier(runner):
    items = [
        UpdateBatch(upd([("a", 1, 1), ("a", 1, 1), ("b", 2, 1), ("c", 7, 1)]), offsets={"s/0": 0}),
        P(3, "s/0", ("s/0",)),
        UpdateBatch(upd([("b", 4, -1), ("b", 4, 1), ("d", 5, 1)]), offsets={"s/0": 1}),
        P(6, "s/0", ("s/0",)),
        P(8, "s/0", ("s/0",)),
        P(10, "s/0", ("s/0",)),
    ]
    out = run_consolidate(runner, items)
    check_tiling(out)
    assert out[-1] == Progress(Frontier(10))
    assert all(p.partition is None for p in out if isinstance(p, Progress))
    assert flat(out) == ([("a", 1, 2), ("b", 2, 1), ("c", 7, 1), ("d", 5, 1)], {"s/0": 1})
    # offset 0's batch had an update at 7: it is only covered once 8 is passed
    for x in out:
        if isinstance(x, UpdateBatch) and x.offsets:
            assert x.upper.time > 7


def test_consolidate_waits_for_slowest_partition(runner):
    parts = ("s/0", "s/1")
    items = [
        P(0, "s/0", parts),
        UpdateBatch(upd([("a", 1, 1)])),
        P(5, "s/0", parts),
        UpdateBatch(upd([("b", 2, 1)])),
        P(2, "s/1", parts),
        P(9, "s/1", parts),
    ]
    out = run_consolidate(runner, items)
    check_tiling(out)
    # s/1 held the frontier: nothing past 2 before it moved, and never past 5 (s/0)
    assert out[-1] == Progress(Frontier(5))
    assert flat(out)[0] == [("a", 1, 1), ("b", 2, 1)]


def test_consolidate_cancelling_diffs_emit_only_progress(runner):
    items = [UpdateBatch(upd([("a", 1, 1), ("a", 1, -1)])), P(4)]
    out = run_consolidate(runner, items)
    assert [type(x).__name__ for x in out] == ["Progress"]


def test_consolidate_keeps_beyond_frontier_at_eof(runner):
    items = [UpdateBatch(upd([("a", 1, 1), ("b", 6, 1)]), offsets={"s/0": 0}), P(2)]
    out = run_consolidate(runner, items)
    check_tiling(out)
    assert out[-1] == Progress(Frontier(2))
    # "b" at 6 is not emitted, and neither is the offset that covers it
    assert flat(out) == ([("a", 1, 1)], {})


def run_sql(runner, items, query, schema=None):
    out: list = []
    flow = Dataflow("q")
    s = op.input("in", flow, TestingSource(items))
    s = op.redistribute("spread", s)
    op.output("out", sql("q", s, query, schema=schema), TestingSink(out))
    runner(flow)
    return out


def test_sql_keeps_time_and_diff(runner):
    items = [UpdateBatch(upd([("a", 1, 1), ("bb", 2, -1)]), Frontier(0), Frontier(3), {"x": 1}), P(3)]
    out = run_sql(runner, items, "SELECT _diff, _time, upper(k) AS k FROM updates WHERE length(k) > 1")
    b = [x for x in out if isinstance(x, UpdateBatch)]
    assert len(b) == 1 and b[0].table.schema.names == ["k", "_time", "_diff"]
    assert rows_of(b[0].table) == [("BB", 2, -1)]
    assert b[0].offsets == {"x": 1} and b[0].upper == 3
    assert any(isinstance(x, Progress) for x in out)


def test_sql_refuses_dropping_diff_up_front():
    flow = Dataflow("bad")
    s = op.input("in", flow, TestingSource([]))
    with pytest.raises(InvalidInput, match="must keep '_time' and '_diff'"):
        sql("q", s, "SELECT k, _time FROM updates", schema=pa.schema([("k", pa.string())]))


def test_sql_refuses_on_first_batch_without_schema(runner):
    from bytewax.errors import BytewaxRuntimeError

    with pytest.raises(BytewaxRuntimeError) as ei:
        run_sql(runner, [UpdateBatch(upd([("a", 1, 1)]))], "SELECT k, _diff AS n FROM updates")
    e = ei.value
    while e.__cause__ is not None:
        e = e.__cause__
    assert isinstance(e, InvalidInput) and "step 'q.q'" in str(e)

"""`flows.views.view` as a bytewax operator: two inputs at different speeds, one consistent time."""

from __future__ import annotations

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.views import view
from storage import Frontier, Progress, UpdateBatch

A = pa.schema([("k", pa.int64()), ("x", pa.int64())])
B = pa.schema([("k", pa.int64()), ("y", pa.int64())])


def batch(schema: pa.Schema, rows: list[tuple], lower: int, upper: int) -> UpdateBatch:
    cols = list(zip(*rows, strict=True))
    full = schema.append(pa.field("_time", pa.int64())).append(pa.field("_diff", pa.int64()))
    t = pa.table({f.name: pa.array(list(c), f.type) for f, c in zip(full, cols, strict=True)}, schema=full)
    return UpdateBatch(t, Frontier(lower), Frontier(upper), offsets={"src/0": upper})


def test_view_waits_for_every_input_and_emits_corrections():
    flow = Dataflow("v")
    a = op.input("a", flow, TestingSource([
        batch(A, [(1, 10, 1, 1), (2, 20, 1, 1)], 0, 2), Progress(Frontier(2)),
        batch(A, [(1, 10, 3, -1), (1, 11, 3, 1)], 2, 4), Progress(Frontier(4)),
    ]))
    b = op.input("b", flow, TestingSource([
        batch(B, [(1, 5, 1, 1)], 0, 3), Progress(Frontier(3)),
        batch(B, [(2, 7, 3, 1)], 3, 5), Progress(Frontier(5)),
    ]))
    sql = "SELECT a.k, a.x, b.y FROM a JOIN b ON a.k = b.k"
    out: list = []
    op.output("out", view("j", {"a": a, "b": b}, sql, schemas={"a": A, "b": B}), TestingSink(out))
    run_main(flow)
    fronts = [x.frontier for x in out if isinstance(x, Progress)]
    # the minimum over both inputs: never past 4 (b is at 5), increasing
    assert fronts[-1] == Frontier(4) and fronts == sorted(set(fronts)) and fronts[0] == Frontier(2)
    got = sorted(r for x in out if isinstance(x, UpdateBatch) for r in map(tuple, (d.values() for d in x.table.to_pylist())))
    # at 1: (1,10,5); at 3: (1,10,5) retracted, (1,11,5) and (2,20,7) inserted; nothing at 4 (b not there yet)
    assert got == [(1, 10, 5, 1, 1), (1, 10, 5, 3, -1), (1, 11, 5, 3, 1), (2, 20, 7, 3, 1)]
    assert all(x.upper <= Frontier(4) for x in out if isinstance(x, UpdateBatch))

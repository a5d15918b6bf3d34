"""The input of `bench/view_freshness.py`: COUNTER at `$FRESH_RATE` ticks/s of `$FRESH_ROWS` rows.

Once `$FRESH_CARD` rows are live, each tick inserts `$FRESH_ROWS` values and retracts as
many: 2 x rows x rate updates/s (defaults: 5,000 x 10 x 2 = 100k updates/s).
"""

from __future__ import annotations

import os

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate


def build(ctx):  # type: ignore[no-untyped-def]
    rows, rate = int(os.environ.get("FRESH_ROWS", "5000")), float(os.environ.get("FRESH_RATE", "10"))
    gen = Counter(seed=0, rows_per_tick=rows, max_cardinality=int(os.environ.get("FRESH_CARD", "100000")))
    ctx.collection("counter", gen.schemas()["counter"])
    src = LoadgenSource(gen, "counter", ticks=None, rate=rate, resume=ctx.resume_offsets("counter"))
    flow = Dataflow("fresh_counter")
    ctx.persist("sink", consolidate("cons", op.input("counter", flow, src)), "counter")
    return flow

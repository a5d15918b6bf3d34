"""A loadgen COUNTER flow for the fault tests (loaded by path; not a test module).

Collection `counter(counter int64)`: tick i inserts `i * ROWS + 1 .. (i + 1) * ROWS`,
never retracted, so a correct result is exactly `1 .. N` with N a multiple of ROWS:
a lost tick leaves a gap, a doubled one a repeated value. Env: COUNTER_ROWS (10),
COUNTER_TICKS (30; batch mode), COUNTER_RATE (ticks per second; continuous mode, 20).
"""

from __future__ import annotations

import os

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate


def build(ctx):  # noqa: ANN001, ANN201
    flow = Dataflow("loadgen_counter")
    gen = Counter(seed=0, rows_per_tick=int(os.environ.get("COUNTER_ROWS", "10")))
    ctx.collection("counter", gen.schemas()["counter"])
    src = LoadgenSource(
        gen,
        "counter",
        ticks=None if ctx.continuous else int(os.environ.get("COUNTER_TICKS", "30")),
        rate=float(os.environ.get("COUNTER_RATE", "20")) if ctx.continuous else None,
        resume=ctx.resume_offsets("counter"),
    )
    ctx.persist("sink", consolidate("cons", op.input("in", flow, src)), "counter")
    return flow

"""The soak's flow (bench/soak.py): the COUNTER generator at 100 ticks/s, at most 1,000 live rows.

    shardflow run bench/soak_flow.py --data ./soak --mode continuous

Env: SOAK_RATE (ticks/s, default 100), SOAK_ROWS (rows per tick, default 10),
SOAK_LIVE (live rows at most, default 1000).
"""

from __future__ import annotations

import os

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate


def build(ctx):  # type: ignore[no-untyped-def]
    gen = Counter(
        seed=0,
        rows_per_tick=int(os.environ.get("SOAK_ROWS", "10")),
        max_cardinality=int(os.environ.get("SOAK_LIVE", "1000")),
    )
    ctx.collection("counter", gen.schemas()["counter"])
    src = LoadgenSource(
        gen,
        "counter",
        ticks=None if ctx.continuous else 500,
        rate=float(os.environ.get("SOAK_RATE", "100")),
        resume=ctx.resume_offsets("counter"),
    )
    flow = Dataflow("soak_counter")
    ctx.persist("sink", consolidate("cons", op.input("counter", flow, src)), "counter")
    return flow

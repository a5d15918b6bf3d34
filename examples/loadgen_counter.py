"""Load generator -> collection `counter`: the COUNTER generator, at most 100 live rows.

    shardflow run examples/loadgen_counter.py --data ./data                      # 50 ticks, then exit
    shardflow run examples/loadgen_counter.py --data ./data --mode continuous    # 10 ticks/s until Ctrl-C
    shardflow query --data ./data "SELECT count(*), max(counter) FROM counter"

Running it again resumes after the last committed tick: nothing is emitted twice.
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate


def build(ctx):  # type: ignore[no-untyped-def]
    gen = Counter(seed=0, rows_per_tick=10, max_cardinality=100)
    ctx.collection("counter", gen.schemas()["counter"])
    src = LoadgenSource(
        gen,
        "counter",
        ticks=None if ctx.continuous else 50,
        rate=10.0 if ctx.continuous else None,
        resume=ctx.resume_offsets("counter"),
    )
    flow = Dataflow("loadgen_counter")
    ctx.persist("sink", consolidate("cons", op.input("counter", flow, src)), "counter")
    return flow

"""Collection `counter` -> `counter_even`: a flow whose input is another collection.

Run examples/loadgen_counter.py first, then:

    shardflow run examples/shard_chain.py --data ./data
    shardflow query --data ./data "SELECT count(*) FROM counter_even"

`ShardSource` takes the snapshot of `counter`, then follows its changes
(retractions included: the view stays exact). Its offset is the frontier of
`counter` reached, so a rerun continues after it. In batch mode it stops at
the upper `counter` had when it started.

`inputs=("counter",)` records that `counter_even` is derived from `counter`:
a durable hold keeps `counter` readable at `counter_even`'s since, so a rerun
after the counter flow ran on (and compacted) still resumes exactly.
"""

from __future__ import annotations

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.shard import ShardSource
from flows.operators import consolidate, sql

SCHEMA = pa.schema([("counter", pa.int64())])


def build(ctx):  # type: ignore[no-untyped-def]
    # counter_even is computed from counter: counter stays readable where this flow stopped.
    ctx.collection("counter_even", SCHEMA, inputs=("counter",))
    src = ShardSource(ctx.client, ctx.shard("counter"), mode=ctx.mode, name="counter",
                      resume=ctx.resume_offsets("counter_even"))
    flow = Dataflow("shard_chain")
    even = sql("even", op.input("counter", flow, src), "SELECT * FROM updates WHERE counter % 2 = 0", schema=SCHEMA)
    ctx.persist("sink", consolidate("cons", even), "counter_even")
    return flow

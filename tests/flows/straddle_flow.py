"""A flow whose sink commits part of a multi-time source batch (loaded by path; not a test module).

Collection `src(counter)`: written by this file on its first build: `[0, 1)` holds
counter 1000 at time 0, `[1, 10)` counters 1001 .. 1009, counter `1000 + t` at time `t`.

Collection `out`: a `ShardSource` over `src` (snapshot at 0, then ONE listen batch
holding times 1 .. 9 with offset 10) merged with a loadgen `Counter` (one row per
tick, tick `i` at time `4 + 10 * i`, `STRADDLE_TICKS` ticks in a batch run). The
loadgen partition's last progress (`5` after one tick) lies inside the listen batch,
so the sink's frontier stops there: it commits that batch's updates at times 1 .. 4
without its offset, and a rerun reads the whole batch again.
"""

from __future__ import annotations

import os

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource
from connectors.shard import ShardSource


def build(ctx):  # noqa: ANN001, ANN201
    gen = Counter(seed=0, rows_per_tick=1, start_time=4, tick_ms=10)
    schema = gen.schemas()["counter"]
    src_shard = ctx.collection("src", schema)
    if ctx.client.state(src_shard).upper.time == 0:
        w = ctx.client.open_writer(src_shard)
        w.compare_and_append(pa.table({"counter": [1000], "_time": [0], "_diff": [1]}), 0, 1)
        ts = list(range(1, 10))
        w.compare_and_append(pa.table({"counter": [1000 + t for t in ts], "_time": ts, "_diff": [1] * 9}), 1, 10)
    ctx.collection("out", schema, inputs=("src",))
    resume = ctx.resume_offsets("out")
    flow = Dataflow("straddle")
    a = op.input("src", flow, ShardSource(ctx.client, src_shard, as_of=0, mode=ctx.mode, name="src", resume=resume))
    ticks = int(os.environ.get("STRADDLE_TICKS", "1"))
    b = op.input("lg", flow, LoadgenSource(gen, "counter", ticks=ticks, name="lg", resume=resume))
    ctx.persist("sink", op.merge("both", a, b), "out")
    return flow

"""Bids over 500 from the auction load generator: source -> consolidate -> sql -> persist.

    shardflow run examples/big_bids.py --data ./data
    shardflow query --data ./data "SELECT count(*), min(amount) FROM big_bids"
"""

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.loadgen import Auction
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate, sql

SCHEMA = pa.schema([("id", pa.int64()), ("auction_id", pa.int64()), ("amount", pa.int64())])


def build(ctx):
    gen = Auction(seed=1)
    ctx.collection("big_bids", SCHEMA)                      # named through the storage controller
    flow = Dataflow("big_bids")
    src = LoadgenSource(gen, "bids", ticks=100, resume=ctx.resume_offsets("big_bids"))
    big = sql("big", consolidate("cons", op.input("in", flow, src)),
              "SELECT id, auction_id, amount, _time, _diff FROM updates WHERE amount > 500",
              schema=gen.schemas()["bids"])
    ctx.persist("sink", big, "big_bids")                    # offsets go in the same CAS as the data
    return flow

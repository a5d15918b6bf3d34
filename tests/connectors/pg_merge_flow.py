"""Two PostgreSQL tables, one CDC source each, merged into one collection (loaded by path; not a test module).

Both sources' times are commit LSNs, so their frontiers interleave: while one
table's source has read up to LSN x, the other's next batch may hold transactions
on both sides of x. The sink then commits such a batch's updates below x without
its offset (a batch's offset waits for all of its updates), and a kill there makes
the next run read the whole batch again.

Env: PG_DSN; MERGE_LOG (optional): a file that gets one line per emitted batch
(`B <tmin> <tmax>`) and per commit (`C <upper>`), for the test to count such commits.
"""

from __future__ import annotations

import os

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.postgres import PostgresSource
from flows.operators import consolidate
from storage import UpdateBatch


def _log(line: str) -> None:
    path = os.environ.get("MERGE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def build(ctx):  # noqa: ANN001, ANN201
    dsn = os.environ["PG_DSN"]
    probe = PostgresSource(dsn, "public.t_a", publication="merge_pub")
    shard = ctx.collection("items", probe.row_schema())
    resume = ctx.resume_offsets("items")
    flow = Dataflow("pg_merge")
    srcs, streams = [], []
    for t in ("t_a", "t_b"):
        src = PostgresSource(dsn, f"public.{t}", publication="merge_pub", mode=ctx.mode, name=t,
                             pipeline_id=shard, poll_interval=0.05, resume=resume)
        srcs.append(src)
        s = op.input(t, flow, src)
        op.inspect(f"{t}_log", s, lambda _s, x: isinstance(x, UpdateBatch) and x.num_rows and _log(
            f"B {x.table.column('_time')[0].as_py()} {x.table.column('_time')[-1].as_py()}"))
        streams.append(s)
    committed = ctx.persist("sink", consolidate("cons", op.merge("both", *streams)), "items")

    def ack(_step: str, c) -> None:  # noqa: ANN001
        _log(f"C {c.upper.time}")
        for src in srcs:
            src.ack(c.offsets)

    op.inspect("ack", committed, ack)
    return flow

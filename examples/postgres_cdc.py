"""PostgreSQL table -> collection: change data capture over logical replication.

Set up the table once (as a superuser, or the table owner with REPLICATION):

    ALTER TABLE orders REPLICA IDENTITY FULL;   -- updates/deletes carry the whole old row
    CREATE PUBLICATION orders_pub FOR TABLE orders WITH (publish = 'insert, update, delete');

and run with `wal_level = logical`:

    PG_DSN=postgresql://postgres@127.0.0.1:5432/shop PG_TABLE=orders \\
        shardflow run examples/postgres_cdc.py --data ./data --mode continuous

The first run takes a snapshot consistent with a replication slot of its own and
then streams; later runs resume after the committed LSN. The slot is named after
the collection's shard id (`shardflow_<table>_<12 hex>`), so the same data dir
finds its slot again and a pipeline with another `--data` on the same table gets
another slot. `PG_SLOT` names a slot explicitly instead (e.g. `shardflow_orders`,
the one slot every pipeline used before slots were per pipeline). The flow
acknowledges committed offsets to the source, which then advances the slot so
PostgreSQL can recycle WAL. Dropping the collection leaves its slot: drop it with
`SELECT pg_drop_replication_slot('<slot>')`.
"""

from __future__ import annotations

import os

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.postgres import PostgresSource
from flows.operators import consolidate


def build(ctx):  # type: ignore[no-untyped-def]
    table = os.environ.get("PG_TABLE", "orders")
    name = table.rpartition(".")[2]
    probe = PostgresSource(os.environ["PG_DSN"], table, publication=os.environ.get("PG_PUBLICATION", f"{name}_pub"))
    shard = ctx.collection(name, probe.row_schema())
    src = PostgresSource(probe.dsn, table, publication=probe.publication, mode=ctx.mode,
                         pipeline_id=shard, slot=os.environ.get("PG_SLOT") or None,
                         resume=ctx.resume_offsets(name))
    src.check()  # a missing grant or slot is one clear line before the flow starts
    flow = Dataflow("postgres_cdc")
    committed = ctx.persist("sink", consolidate("cons", op.input(name, flow, src)), name)
    op.inspect("ack", committed, lambda _step, c: src.ack(c.offsets))
    return flow

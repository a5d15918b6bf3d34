"""Kafka topic `orders` (JSON values) -> collection `orders`; undecodable records -> `orders_errors`.

    KAFKA_BOOTSTRAP=127.0.0.1:9092 shardflow run examples/kafka_orders.py --data ./data
    KAFKA_BOOTSTRAP=127.0.0.1:9092 shardflow run examples/kafka_orders.py --data ./data --mode continuous
    shardflow query --data ./data "SELECT customer, sum(amount) FROM orders GROUP BY ALL"

Env: `KAFKA_BOOTSTRAP` (required), `KAFKA_TOPIC` (default `orders`),
`ORDERS_ENVELOPE` (`append`, the default: every record is a row; `upsert`: the
record's key names the order, a later record replaces it and a null value deletes
it, with the state under `<data>/kafka_upsert/`).

Each topic partition is a source partition; the offsets go into the collection's
compare-and-set with the rows, so a rerun (or a restart after a crash) continues
exactly after the last committed record. A batch run reads to the end offsets
seen at start; a continuous one follows the topic until Ctrl-C.
"""

from __future__ import annotations

import os

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.files import split_errors
from connectors.kafka import ERRORS_SCHEMA, KafkaSource
from flows.operators import consolidate

SCHEMA = pa.schema([("id", pa.int64()), ("customer", pa.string()), ("amount", pa.float64())])


def build(ctx):  # type: ignore[no-untyped-def]
    envelope = os.environ.get("ORDERS_ENVELOPE", "append")

    def source(**kw):  # type: ignore[no-untyped-def]
        return KafkaSource(os.environ["KAFKA_BOOTSTRAP"], os.environ.get("KAFKA_TOPIC", "orders"), schema=SCHEMA,
                           key_format="text", metadata=("key", "partition", "offset", "timestamp"),
                           envelope=envelope, mode=ctx.mode, name="orders",
                           upsert_state=os.path.join(ctx.client.root, "kafka_upsert") if envelope == "upsert" else None,
                           **kw)

    ctx.collection("orders", source().row_schema())
    ctx.collection("orders_errors", ERRORS_SCHEMA)
    src = source(resume=ctx.resume_offsets("orders"), resume_upper=ctx.upper("orders"))
    src.check()  # an unreachable broker or a missing topic: one line, before the flow starts
    flow = Dataflow("kafka_orders")
    split = split_errors("split", op.input("kafka", flow, src))
    # Both collections, the errors committed first (a kill in between loses no error row).
    committed = ctx.persist_split(
        "orders_sink", consolidate("orders_cons", split.data), consolidate("errors_cons", split.errors), "orders"
    )
    op.inspect("ack", committed, lambda _step, c: src.ack(c.offsets))  # upsert: its undo log shrinks
    return flow

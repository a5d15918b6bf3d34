"""A `shardflow run` flow over `KafkaSource`, configured by environment variables (used by the Kafka tests).

    KAFKA_BOOTSTRAP   bootstrap servers (required)
    KAFKA_TOPIC       the topic (required)
    KAFKA_ENVELOPE    append (default) or upsert
    KAFKA_STATE       upsert state folder (upsert only)
    KAFKA_CONNECT_TIMEOUT, KAFKA_DISCOVER_INTERVAL   seconds (default 5 each)
    KAFKA_NO_RESUME_UPPER   1: resume without resume_upper (a mistake the source must refuse)

JSON values `(id int64, name string)` go to collection `rows` (with key, partition
and offset), bad records to `rows_errors`.
"""

from __future__ import annotations

import os

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.files import split_errors
from connectors.kafka import ERRORS_SCHEMA, KafkaSource
from flows.operators import consolidate

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def build(ctx):  # type: ignore[no-untyped-def]
    def source(**kw):  # type: ignore[no-untyped-def]
        return KafkaSource(
            os.environ["KAFKA_BOOTSTRAP"],
            os.environ["KAFKA_TOPIC"],
            schema=SCHEMA,
            key_format="text",
            metadata=("key", "partition", "offset"),
            envelope=os.environ.get("KAFKA_ENVELOPE", "append"),
            upsert_state=os.environ.get("KAFKA_STATE"),
            mode=ctx.mode,
            name="rows",
            tick=0.05,
            connect_timeout=float(os.environ.get("KAFKA_CONNECT_TIMEOUT", "5")),
            discover_interval=float(os.environ.get("KAFKA_DISCOVER_INTERVAL", "5")),
            **kw,
        )

    ctx.collection("rows", source().row_schema())
    ctx.collection("rows_errors", ERRORS_SCHEMA)
    upper = None if os.environ.get("KAFKA_NO_RESUME_UPPER") == "1" else ctx.upper("rows")
    src = source(resume=ctx.resume_offsets("rows"), resume_upper=upper)
    src.check()  # an unreachable broker or a missing topic is one line before the flow starts
    flow = Dataflow("kafka_flow")
    split = split_errors("split", op.input("kafka", flow, src))
    committed = ctx.persist_split(
        "rows_sink", consolidate("rows_cons", split.data), consolidate("errors_cons", split.errors), "rows"
    )
    op.inspect("ack", committed, lambda _step, c: src.ack(c.offsets))  # upsert: drop undo entries
    return flow

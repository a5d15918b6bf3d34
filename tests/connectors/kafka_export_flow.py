"""A `shardflow run` flow exporting collection `counter` to Kafka with `kafka_sink` (used by the sink tests).

    KAFKA_BOOTSTRAP   bootstrap servers (required)
    KAFKA_OUT         the data topic (required)
    KAFKA_PROGRESS    the progress topic (required)
"""

from __future__ import annotations

import os

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.shard import ShardSource
from flows.kafka_sink import export_resume_upper, kafka_sink


def build(ctx):  # type: ignore[no-untyped-def]
    bootstrap, topic, progress = os.environ["KAFKA_BOOTSTRAP"], os.environ["KAFKA_OUT"], os.environ["KAFKA_PROGRESS"]
    shard = ctx.shard("counter")
    # A durable hold: `counter` stays readable at the export's progress while the export is down.
    hold = ctx.client.open_critical_since(shard, f"kafka-export:{topic}", "kafka-export")
    upper = export_resume_upper(bootstrap, progress, topic, timeout=5.0)
    src = ShardSource(ctx.client, shard, mode=ctx.mode, name="export",
                      resume={"export/0": upper} if upper else None, poll_interval=0.05)
    flow = Dataflow("kafka_export")
    kafka_sink("export", op.input("in", flow, src), bootstrap, topic, progress_topic=progress, hold=hold,
               resume_upper=upper)
    return flow

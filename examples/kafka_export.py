"""Collection `orders` -> Kafka topic `orders_changes`, exactly once, with progress in `orders_progress`.

    KAFKA_BOOTSTRAP=127.0.0.1:9092 shardflow run examples/kafka_export.py --data ./data
    KAFKA_BOOTSTRAP=127.0.0.1:9092 shardflow run examples/kafka_export.py --data ./data --mode continuous

Run examples/kafka_orders.py first (or any flow that writes `orders`); create both
topics beforehand. Each change is one message `{"before": .., "after": .., "_time",
"_diff", "_txn"}` keyed by the order id; each frontier step is one Kafka transaction
ending with `{"topic": "orders_changes", "upper": U, "txn": ..}` in the progress
topic. A rerun continues from the last progress record; a durable hold
(`kafka-export:<topic>`, see `shardflow holds`) keeps `orders` readable from there
while the export is down. See `flows.kafka_sink` for the exact guarantee.
"""

from __future__ import annotations

import os

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.shard import ShardSource
from flows.kafka_sink import export_resume_upper, kafka_sink


def build(ctx):  # type: ignore[no-untyped-def]
    bootstrap = os.environ["KAFKA_BOOTSTRAP"]
    topic = os.environ.get("KAFKA_EXPORT_TOPIC", "orders_changes")
    progress = os.environ.get("KAFKA_PROGRESS_TOPIC", "orders_progress")
    shard = ctx.shard("orders")
    hold = ctx.client.open_critical_since(shard, f"kafka-export:{topic}", "kafka-export")
    upper = export_resume_upper(bootstrap, progress, topic)
    src = ShardSource(ctx.client, shard, mode=ctx.mode, name="export", resume={"export/0": upper} if upper else None)
    flow = Dataflow("kafka_export")
    kafka_sink("export", op.input("orders", flow, src), bootstrap, topic, progress_topic=progress, key=("id",),
               hold=hold, resume_upper=upper)
    return flow

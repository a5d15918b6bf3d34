"""Introspection collections, in schema `system`: the controller's view of itself, queryable.

| collection                    | kind         | columns                                               |
|-------------------------------|--------------|-------------------------------------------------------|
| `system.frontiers`            | differential | object_id, read_frontier, write_frontier              |
| `system.shard_mapping`        | differential | collection, shard_id                                  |
| `system.source_status_history`| append-only  | occurred_at, source_id, status, error                 |
| `system.sink_status_history`  | append-only  | occurred_at, sink_id, status, error                   |
| `system.statistics`           | differential | object_id, rows, bytes, updates_staged, updates_committed |

Frontiers are NULL when empty (closed). `occurred_at` is the controller's clock
(ms since the epoch). Status histories skip a status equal to the object's
current one, and at start-up keep only the last N rows per object.
"""

from __future__ import annotations

import pyarrow as pa

FRONTIERS = "system.frontiers"
SHARD_MAPPING = "system.shard_mapping"
SOURCE_STATUS = "system.source_status_history"
SINK_STATUS = "system.sink_status_history"
STATISTICS = "system.statistics"

SCHEMAS: dict[str, pa.Schema] = {
    FRONTIERS: pa.schema(
        [
            pa.field("object_id", pa.string(), nullable=False),
            pa.field("read_frontier", pa.int64()),
            pa.field("write_frontier", pa.int64()),
        ]
    ),
    SHARD_MAPPING: pa.schema(
        [pa.field("collection", pa.string(), nullable=False), pa.field("shard_id", pa.string(), nullable=False)]
    ),
    SOURCE_STATUS: pa.schema(
        [
            pa.field("occurred_at", pa.int64(), nullable=False),
            pa.field("source_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
        ]
    ),
    SINK_STATUS: pa.schema(
        [
            pa.field("occurred_at", pa.int64(), nullable=False),
            pa.field("sink_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
        ]
    ),
    STATISTICS: pa.schema(
        [
            pa.field("object_id", pa.string(), nullable=False),
            pa.field("rows", pa.int64(), nullable=False),
            pa.field("bytes", pa.int64(), nullable=False),
            pa.field("updates_staged", pa.int64(), nullable=False),
            pa.field("updates_committed", pa.int64(), nullable=False),
        ]
    ),
}

DIFFERENTIAL = (FRONTIERS, SHARD_MAPPING, STATISTICS)
APPEND_ONLY = (SOURCE_STATUS, SINK_STATUS)
# The id column of each status history: keep-last-N and deduplication are per value of it.
STATUS_ID = {SOURCE_STATUS: "source_id", SINK_STATUS: "sink_id"}

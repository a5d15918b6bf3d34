"""shardflow sources: each is a bytewax source of `UpdateBatch`/`Progress` items.

See `connectors.base` for the contract every source obeys (partition keys,
resume offsets, batch vs continuous mode, `request_stop`). Layering: connectors
import `storage` types only, never `flows`.

- `LoadgenSource` (`connectors.loadgen_source`): deterministic load generators.
- `FileSource` (`connectors.files`): CSV, JSON Lines and Parquet under a glob.
- `PostgresSource` (`connectors.postgres`): CDC over logical replication (pgoutput).
- `KafkaSource` (`connectors.kafka`, needs the `kafka` extra; not imported here):
  Kafka topics, append or upsert envelope.
- `WebhookServer` (`connectors.webhook`): HTTP requests into an append-only collection.
- `ShardSource` (`connectors.shard`): another collection's snapshot, then its changes.

The names below are imported on first use (PEP 562): a flow that reads files
does not load psycopg, nor one that generates load the HTTP server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import STOP, UpdatePartition, UpdateSource, partition_key, request_stop, reset_stop

if TYPE_CHECKING:
    from .files import FileSource, FileSourceError, split_errors
    from .loadgen_source import LoadgenSource, loadgen_sources
    from .postgres import PostgresCdcError, PostgresSource
    from .shard import ShardSource
    from .webhook import WebhookServer, webhook_schema

_LAZY = {
    "FileSource": "files",
    "FileSourceError": "files",
    "split_errors": "files",
    "LoadgenSource": "loadgen_source",
    "loadgen_sources": "loadgen_source",
    "PostgresCdcError": "postgres",
    "PostgresSource": "postgres",
    "ShardSource": "shard",
    "WebhookServer": "webhook",
    "webhook_schema": "webhook",
}

__all__ = [
    "STOP",
    "FileSource",
    "FileSourceError",
    "LoadgenSource",
    "PostgresCdcError",
    "PostgresSource",
    "ShardSource",
    "UpdatePartition",
    "UpdateSource",
    "WebhookServer",
    "loadgen_sources",
    "partition_key",
    "request_stop",
    "reset_stop",
    "split_errors",
    "webhook_schema",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'connectors' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

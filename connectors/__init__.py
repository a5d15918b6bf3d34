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
"""

from .base import STOP, UpdatePartition, UpdateSource, partition_key, request_stop, reset_stop
from .files import FileSource, FileSourceError, split_errors
from .loadgen_source import LoadgenSource, loadgen_sources
from .postgres import PostgresCdcError, PostgresSource
from .shard import ShardSource
from .webhook import WebhookServer, webhook_schema

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

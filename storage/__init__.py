"""shardflow storage: persist-style shards of Parquet parts, coordinated through consensus.

Vocabulary (one word per concept, used everywhere):

- **update**: `(row, time, diff)`. `row` is the user's columns under an Arrow
  schema; `time` an int64 >= 0; `diff` an int64 count (+1 insert, -1 retract).
  Updates travel and rest as Arrow data whose last columns are `_time`, `_diff`.
- **frontier**: a time `t` (times >= t may still come) or empty (closed).
- **shard**: a durable collection of updates, with:
  - **upper**: every update at a time `< upper` is known; appends happen only at
    `lower == upper`; the upper only moves forward.
  - **since**: reads at `as_of >= since` are exact; times `< since` may have been
    advanced to `since` by compaction; the since only moves forward.
  - **batch**: updates at times `[lower, upper)`, with a since, made of parts.
    Batches are contiguous.
  - **part**: one Parquet file in blob, with its sha256, row count and size.
- **as_of**: the time a snapshot is taken at: every update at a time `<= as_of`,
  consolidated (diffs summed per row, zeros dropped). Needs `since <= as_of < upper`.

Example:
    >>> import pyarrow as pa, storage, tempfile
    >>> client = storage.open(tempfile.mkdtemp())
    >>> shard = storage.ShardId.new()
    >>> w = client.open_writer(shard, schema=pa.schema([("k", pa.string()), ("v", pa.int64())]))
    >>> _ = w.compare_and_append(pa.table({"k": ["a", "b"], "v": [1, 2], "_time": [0, 5], "_diff": [1, 1]}), 0, 10)
    >>> r = client.open_leased_reader(shard)
    >>> r.snapshot(as_of=4).to_pylist()
    [{'k': 'a', 'v': 1, '_diff': 1}]
    >>> r.expire()
"""

from . import errors, parts, query
from .blob import ArrowFsBlob, Blob, LocalBlob
from .client import Client, SinceHandle, open
from .consensus import Consensus, PostgresConsensus, SqliteConsensus, VersionedData
from .errors import *  # noqa: F403
from .frontier import MAX_TIME, Frontier
from .ids import ShardId
from .read import ReadHandle
from .state import AlreadyCommitted, Appended, OpaqueMismatch, check_invariants
from .updates import (
    DIFF,
    TIME,
    Progress,
    UpdateBatch,
    as_overflow,
    check_row_schema,
    consolidate,
    consolidate_sql,
    duck,
    overflow_checked,
    update_schema,
)
from .write import Batch, WriteHandle, compare_and_append_batches

__all__ = [
    "DIFF",
    "MAX_TIME",
    "TIME",
    "AlreadyCommitted",
    "Appended",
    "Batch",
    "ArrowFsBlob",
    "Blob",
    "Client",
    "Consensus",
    "Frontier",
    "LocalBlob",
    "OpaqueMismatch",
    "PostgresConsensus",
    "Progress",
    "ReadHandle",
    "ShardId",
    "SinceHandle",
    "SqliteConsensus",
    "UpdateBatch",
    "VersionedData",
    "WriteHandle",
    "as_overflow",
    "check_invariants",
    "check_row_schema",
    "compare_and_append_batches",
    "consolidate",
    "consolidate_sql",
    "duck",
    "errors",
    "open",
    "overflow_checked",
    "parts",
    "query",
    "update_schema",
    *errors.__all__,
]

"""The source contract between connectors/ and flows/.

A shardflow source is a bytewax `FixedPartitionedSource` (`UpdateSource`) whose
partitions emit two kinds of items:

- `storage.UpdateBatch(table, offsets={partition_key: offset})`: `table` holds
  the row columns then `_time` (int64) and `_diff` (int64). `offsets` is the
  JSON-serialisable offset to resume *after* once this batch is durable; the sink
  commits it in the same compare-and-set as the data (exactly-once ingestion).
- `storage.Progress(frontier, partition=partition_key, partitions=all_keys)`:
  no update at a time `< frontier` will come from this partition any more.

Rules:

- `partition_key` is globally unique in a flow: `f"{source_name}/{p}"`
  (`partition_key(...)`). `Progress.partitions` lists every key of the source,
  so downstream operators know whom to wait for.
- Resume: the constructor takes `resume: Mapping[str, Any] | None`
  (partition_key -> committed offset); a partition resumes *after* that offset.
  Bytewax's own recovery is not used (`resume_state` is ignored).
- Times on replay: the sink may commit a batch's updates below the frontier
  before its offsets (another partition can hold the frontier inside the batch),
  and a restarted run reads the batch again; `persist_sink` then drops the
  replayed updates below the resume point. So either give a replayed update the
  time it had (a function of the input position: an LSN, a tick, the input's own
  time), or put each batch at one time at or past the shard's upper at start
  (`resume_upper`). A batch over several times that a replay does not reproduce
  is doubled in part; replayed times below the resume point are lost.
- Batch mode (finite partition): emit the last data, then a final
  `Progress(last_time + 1)` — NOT the empty frontier, so the shard stays
  appendable for later runs — then raise `StopIteration`.
- Continuous mode: return `[]` when idle and set `next_awake()`; never block or
  `time.sleep` in `next_batch`. When `STOP` is set (`request_stop()`, called by
  the job's SIGINT/SIGTERM handler) emit a final Progress, then raise
  `StopIteration` on the next call. This is how a job flushes cleanly: bytewax
  runs `on_eof` only after every partition reached EOF, never on a signal.
- Progress should be emitted at least after every batch; a partition that is
  idle should still emit Progress periodically (its frontier = "now") so idle
  shards tick forward.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from storage import Frontier, Progress, UpdateBatch

__all__ = [
    "STOP",
    "Item",
    "UpdatePartition",
    "UpdateSource",
    "awake_in",
    "partition_key",
    "request_stop",
    "reset_stop",
    "stop_requested",
]

Item = UpdateBatch | Progress

#: Set by `request_stop()`; every continuous partition polls it in `next_batch`.
STOP = threading.Event()


def request_stop() -> None:
    """Ask every continuous source in this process to emit final progress and EOF."""
    STOP.set()


def reset_stop() -> None:
    """Clear the stop request (the job runner does this before a run starts)."""
    STOP.clear()


def stop_requested() -> bool:
    return STOP.is_set()


def partition_key(source_name: str, partition: Any) -> str:
    """The flow-unique key of a source partition: `"<source_name>/<partition>"`."""
    return f"{source_name}/{partition}"


def awake_in(seconds: float) -> datetime:
    """A tz-aware UTC `next_awake` value `seconds` from now."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


class UpdatePartition(StatefulSourcePartition[Item, Any]):
    """Convenience base for a partition; `snapshot()` returns the current offset.

    Subclasses implement `next_batch()` (returning UpdateBatch/Progress items).
    """

    offset: Any = None

    def snapshot(self) -> Any:
        # Only used by bytewax recovery, which shardflow does not use.
        return self.offset


class UpdateSource(FixedPartitionedSource[Item, Any]):
    """A source of `UpdateBatch`/`Progress` items (see the module docstring).

    Subclasses implement `list_parts()` (partition keys, identical on every
    worker) and `build_partition(key, resume_offset)`, where `resume_offset` is
    `self.resume.get(key)`: None means start from the beginning, otherwise
    resume *after* that offset.

    Args:
        resume: partition key -> last committed offset (from the shard's metadata).
        resume_upper: the shard's upper when the job started, if the source
            needs it (e.g. to not emit times below it).
    """

    def __init__(self, *, resume: Mapping[str, Any] | None = None, resume_upper: Frontier | None = None):
        self.resume: dict[str, Any] = dict(resume or {})
        self.resume_upper = resume_upper

    @abstractmethod
    def build_partition(self, key: str, resume_offset: Any) -> StatefulSourcePartition[Item, Any]: ...

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> StatefulSourcePartition[Item, Any]:
        # SUBTLE: bytewax's resume_state is ignored; offsets come from the shard (same CAS as data).
        return self.build_partition(for_part, self.resume.get(for_part))

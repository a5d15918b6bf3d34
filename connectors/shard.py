"""`ShardSource`: another collection's shard as a source, so flows chain.

It subscribes: the snapshot at `as_of` (as updates at time `as_of`), then every
later update as it commits, with `Progress` following the shard's upper.

Delivery: **exactly-once**, given that the sink commits each batch's offsets in
the same compare-and-set as its data, and that the input's since has not passed
the committed offset (hold it with a read hold / critical since handle of the
storage controller; this source's own leased reader only holds it while the
job runs).

Offset: the frontier reached, an int: every update at a time `< offset` has
been emitted. Off-by-one rule: a partition resumed with offset `F` skips the
snapshot and listens for times `>= F` (`listen(as_of=F - 1)`), i.e. it resumes
*after* the last emitted time.

Times: the input's own times (a snapshot's updates are at `as_of`). A batch
run reads up to the input's upper at start and ends with `Progress(that upper)`.
If the input is finalized (its upper becomes empty), the source ends.

Example:
    >>> import pyarrow as pa, storage, tempfile
    >>> from bytewax.dataflow import Dataflow
    >>> import bytewax.operators as op
    >>> from bytewax.testing import TestingSink, run_main
    >>> client = storage.open(tempfile.mkdtemp())
    >>> shard = storage.ShardId.new()
    >>> w = client.open_writer(shard, schema=pa.schema([("k", pa.string())]))
    >>> _ = w.compare_and_append(pa.table({"k": ["a", "b"], "_time": [1, 3], "_diff": [1, 1]}), 0, 5)
    >>> flow, out = Dataflow("chain"), []
    >>> op.output("out", op.input("in", flow, ShardSource(client, shard, as_of=2, mode="batch", name="up")), TestingSink(out))
    >>> run_main(flow)
    >>> [(x.table.to_pylist(), x.offsets) if hasattr(x, "table") else x.frontier for x in out]
    [Frontier(0), ([{'k': 'a', '_time': 2, '_diff': 1}], {'up/0': 3}), Frontier(3), ([{'k': 'b', '_time': 3, '_diff': 1}], {'up/0': 5}), Frontier(5)]
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from storage import Frontier, Progress, UpdateBatch
from storage.errors import InvalidInput, ReadBeforeSince

from .base import Item, UpdatePartition, UpdateSource, awake_in, partition_key, stop_requested
from .errors import ConnectorError

if TYPE_CHECKING:
    from storage import Client, ReadHandle

__all__ = ["ShardSource"]


class ShardSource(UpdateSource):
    """Subscribe to shard `shard` (snapshot, then listen); one partition.

    Args:
        client: The `storage.Client` holding the shard.
        shard: The shard id (e.g. `controller.collection(name).shard_id`).
        as_of: Snapshot time; default the latest readable time (`upper - 1`),
            waiting for a first write if the shard is still empty.
        mode: `"continuous"` follows the shard until `request_stop()`;
            `"batch"` stops at the upper the shard had when reading started.
        name: Source name, the prefix of the partition key; default the shard id.
        poll_interval: Seconds between polls of the shard's state.
        resume: `{partition key: frontier reached}` from the output's metadata.
    """

    def __init__(
        self,
        client: Client,
        shard: str,
        *,
        as_of: int | None = None,
        mode: Literal["batch", "continuous"] = "continuous",
        name: str | None = None,
        poll_interval: float = 0.1,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(resume=resume)
        if mode not in ("batch", "continuous"):
            raise InvalidInput(f"ShardSource: mode must be 'batch' or 'continuous', got {mode!r}")
        if as_of is not None and (not isinstance(as_of, int) or as_of < 0):
            raise InvalidInput(f"ShardSource: as_of must be an int >= 0 or None, got {as_of!r}")
        self.client = client
        self.shard = str(shard)
        self.as_of = as_of
        self.mode = mode
        self.name = name or self.shard
        self.poll_interval = poll_interval
        self.key = partition_key(self.name, 0)

    def list_parts(self) -> list[str]:
        return [self.key]

    def build_partition(self, key: str, resume_offset: Any) -> _ShardPartition:
        if resume_offset is not None and (not isinstance(resume_offset, int) or resume_offset < 1):
            raise InvalidInput(f"ShardSource {self.name!r}: resume offset must be a frontier int >= 1, got {resume_offset!r}")
        return _ShardPartition(self, key, resume_offset)


class _ShardPartition(UpdatePartition):
    def __init__(self, src: ShardSource, key: str, resume: int | None) -> None:
        self.src = src
        self.key = key
        self.keys = (key,)
        self.offset = resume
        # Everything before `frontier` was emitted; None until the snapshot is taken.
        self.frontier: int | None = resume
        self.reader: ReadHandle = src.client.open_leased_reader(src.shard)
        self._end: Frontier | None = None  # batch mode: stop here
        self._awake: datetime | None = None
        self._done = False
        self._progressed: int | None = None  # the last Progress emitted

    def _progress(self, t: int) -> Progress:
        self._progressed = t
        return Progress(Frontier(t), partition=self.key, partitions=self.keys)

    def _stop(self) -> list[Item]:
        self._done = True
        if self.frontier is None or self.frontier == self._progressed:
            return []
        return [self._progress(self.frontier)]

    def next_batch(self) -> list[Item]:
        if self._done:
            raise StopIteration()
        if self._progressed is None:
            # Initial progress: downstream learns this partition exists.
            if self.src.mode == "batch":
                self._end = self.reader.machine.fetch().upper
            return [self._progress(self.frontier or 0)]
        if self.src.mode == "continuous" and stop_requested():
            return self._stop()
        self._awake = awake_in(self.src.poll_interval)
        upper = self.reader.machine.fetch().upper
        if self._end is None and self.src.mode == "batch":
            self._end = upper
        if self.frontier is None:
            return self._snapshot(upper)
        if self._end is not None and self._end.less_equal(self.frontier):
            return self._stop()  # batch mode: reached the upper seen at start
        if upper.less_equal(self.frontier):
            return []
        try:
            events = list(self.reader.listen(self.frontier - 1, timeout=0))
        except ReadBeforeSince as e:
            raise ConnectorError(
                f"ShardSource {self.src.name!r}: shard {self.src.shard}: changes from time {self.frontier} "
                f"were compacted away ({e}); hold the input's since with a read hold, or resubscribe without resume"
            ) from None
        return self._emit(events)

    def _snapshot(self, upper: Frontier) -> list[Item]:
        as_of = self.src.as_of
        if as_of is None:
            if upper.is_empty:
                raise ConnectorError(f"ShardSource {self.src.name!r}: shard {self.src.shard} is closed (empty upper)")
            if upper.time == 0:
                if self.src.mode == "batch":
                    self.frontier = 0
                    return self._stop()
                return []  # nothing readable yet: wait for the first write
            as_of = upper.time - 1  # type: ignore[operator]  # not empty: checked above
        elif upper.less_equal(as_of):
            if self.src.mode == "batch":
                raise ConnectorError(
                    f"ShardSource {self.src.name!r}: as_of {as_of} is not readable in shard {self.src.shard} (upper {upper})"
                )
            return []
        try:
            snap = self.reader.snapshot_updates(as_of, timeout=0)
        except ReadBeforeSince as e:
            raise ConnectorError(f"ShardSource {self.src.name!r}: {e}") from None
        self.frontier = as_of + 1
        self.offset = self.frontier
        items: list[Item] = [
            UpdateBatch(snap.table, Frontier(as_of), Frontier(as_of + 1), offsets={self.key: self.frontier}),
            self._progress(self.frontier),
        ]
        self._awake = None  # go on with the changes right away
        return items

    def _emit(self, events: list[UpdateBatch | Progress]) -> list[Item]:
        items: list[Item] = []
        pending: UpdateBatch | None = None
        for ev in events:
            if isinstance(ev, UpdateBatch):
                pending = ev
                continue
            f = ev.frontier
            if f.time is None:
                # The input was finalized: nothing more will ever come.
                if pending is not None:
                    raise ConnectorError(f"ShardSource {self.src.name!r}: shard {self.src.shard} closed with data at an empty upper")
                self._done = True
                return items
            if self._end is not None and self._end.less_than(f.time):
                f = self._end  # batch mode: do not claim past the end we stop at
            table = pending.table if pending is not None else self.reader.schema.empty_table()
            if pending is not None and self._end is not None and pending.upper is not None and self._end < pending.upper:
                table = table.filter(pc.less(table.column("_time"), pa.scalar(f.time, pa.int64())))
            t = f.time
            assert t is not None  # INVARIANT: capped to _end only while _end is before f
            if pending is not None or t > (self.frontier or 0):
                lower = Frontier(self.frontier or 0)
                items.append(UpdateBatch(table, lower, f, offsets={self.key: t}))
                items.append(self._progress(t))
                self.frontier = t
                self.offset = f.time
            pending = None
        return items

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        self.reader.expire()

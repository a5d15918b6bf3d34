"""`LoadgenSource`: a load generator (`connectors.loadgen`) as a shardflow source.

Delivery: **exactly-once**, given that the sink commits each batch's offsets in
the same compare-and-set as its data. A generator's tick `i` is a pure function
of `(seed, params, i)`, so regenerating a tick after a restart yields the very
same updates at the very same time.

Offset: the number of the last emitted tick. Off-by-one rule: a partition
resumed with offset `i` continues with tick `i + 1` (resume *after* the last
emitted tick).

Every partition first emits an initial `Progress` (so downstream knows it exists).

Times: tick `i` carries `_time = gen.time_of(i)` (`start_time + i * tick_ms`).
After tick `i` the partition emits `Progress(gen.time_of(i + 1))`: the next tick
cannot be earlier. The last tick of a batch run emits `Progress(time_of(i) + 1)`
instead, as the source contract asks (the shard stays appendable for a later
run, whose first tick is at `time_of(i + 1) >= time_of(i) + 1`).

Example:
    >>> from bytewax.dataflow import Dataflow
    >>> import bytewax.operators as op
    >>> from bytewax.testing import TestingSink, run_main
    >>> from connectors.loadgen import Counter
    >>> flow, out = Dataflow("lg"), []
    >>> op.output("out", op.input("in", flow, LoadgenSource(Counter(rows_per_tick=2), "counter", ticks=3)), TestingSink(out))
    >>> run_main(flow)
    >>> [(type(x).__name__, x.num_rows if hasattr(x, "num_rows") else x.frontier.time) for x in out]
    [('Progress', 0), ('UpdateBatch', 2), ('Progress', 1000), ('UpdateBatch', 2), ('Progress', 2000), ('UpdateBatch', 2), ('Progress', 2001)]
    >>> out[-2].offsets
    {'counter/0': 2}
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa

from storage import Frontier, Progress, UpdateBatch
from storage.errors import InvalidInput

from .base import Item, UpdatePartition, UpdateSource, awake_in, partition_key, stop_requested
from .loadgen import LoadGenerator

__all__ = ["LoadgenSource", "loadgen_sources"]

# At most this many ticks are produced by one `next_batch` call, so a source
# that fell behind its rate (or runs unpaced) still yields to the other steps.
_MAX_TICKS_PER_CALL = 16


class LoadgenSource(UpdateSource):
    """One collection of a load generator, as a source with one partition.

    Batch mode (`ticks` given): emits ticks `0 .. ticks - 1` (fewer on resume)
    then EOF. Continuous mode (`ticks=None`): runs until `request_stop()`. With
    `rate` the ticks are paced at `rate` ticks per second of wall time; without
    it they are produced as fast as the flow takes them. `request_stop()` also
    ends a paced batch run early.

    Every tick yields one `UpdateBatch` (possibly empty: it still carries the
    offset, so the committed offset keeps up with collections that are quiet
    after tick 0) and one `Progress`.

    Args:
        generator: A `connectors.loadgen.LoadGenerator`.
        collection: One of `generator.schemas()` (e.g. `"bids"`).
        ticks: Number of ticks of a batch run; `None` for continuous mode.
        rate: Ticks per second, or `None` for unpaced.
        resume: `{partition key: last emitted tick}` from the shard's metadata.
        name: Source name, the prefix of the partition key; default `collection`.

    Raises:
        InvalidInput: unknown collection, negative `ticks`, non-positive `rate`.
    """

    def __init__(
        self,
        generator: LoadGenerator,
        collection: str,
        *,
        ticks: int | None,
        rate: float | None = None,
        resume: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(resume=resume)
        schemas = generator.update_schemas()
        if collection not in schemas:
            msg = f"LoadgenSource: generator {generator.name!r} has no collection {collection!r} (it has {sorted(schemas)})"
            raise InvalidInput(msg)
        if ticks is not None and (isinstance(ticks, bool) or not isinstance(ticks, int) or ticks < 0):
            raise InvalidInput(f"LoadgenSource: ticks must be an int >= 0 or None, got {ticks!r}")
        if rate is not None and not rate > 0:
            raise InvalidInput(f"LoadgenSource: rate must be > 0 ticks per second or None, got {rate!r}")
        self.generator = generator
        self.collection = collection
        self.schema: pa.Schema = schemas[collection]
        self.ticks = ticks
        self.rate = rate
        self.name = name or collection
        self.key = partition_key(self.name, 0)

    def list_parts(self) -> list[str]:
        return [self.key]

    def build_partition(self, key: str, resume_offset: Any) -> _LoadgenPartition:
        start = 0 if resume_offset is None else int(resume_offset) + 1
        return _LoadgenPartition(self, key, start)


class _LoadgenPartition(UpdatePartition):
    def __init__(self, src: LoadgenSource, key: str, start: int) -> None:
        self.src = src
        self.key = key
        self.keys = (key,)
        self.next_tick = start
        self.offset = start - 1 if start else None
        self._t0 = time.monotonic()
        self._start = start
        self._awake: datetime | None = None
        self._done = False
        self._frontier: int | None = None  # the last Progress emitted

    def _due(self) -> int:
        """The first tick not yet due (exclusive bound of what may be emitted now)."""
        if self.src.rate is None:
            return self.next_tick + _MAX_TICKS_PER_CALL
        return self._start + int((time.monotonic() - self._t0) * self.src.rate) + 1

    def _progress(self, t: int) -> Progress:
        return Progress(Frontier(t), partition=self.key, partitions=self.keys)

    def next_batch(self) -> list[Item]:
        if self._done:
            raise StopIteration()
        gen, end = self.src.generator, self.src.ticks
        items: list[Item] = []
        if self._frontier is None:
            # Initial progress, so downstream knows this partition exists before
            # its first tick: just past the last tick an earlier run emitted.
            # SUBTLE: never above what that run promised (time_of(i + 1) or
            # time_of(i) + 1), and never above the next tick's time.
            last = self.next_tick - 1
            self._frontier = gen.time_of(last) + 1 if last >= 0 else gen.time_of(0)
            items.append(self._progress(self._frontier))
        if stop_requested() or (end is not None and self.next_tick >= end):
            self._done = True
            # The final progress already went out with the last tick, or as the
            # initial progress when there was nothing left to do.
            return items
        stop_at = min(self._due(), self.next_tick + _MAX_TICKS_PER_CALL)
        if end is not None:
            stop_at = min(stop_at, end)
        while self.next_tick < stop_at:
            i = self.next_tick
            batch = gen.tick(i).get(self.src.collection)
            table = pa.Table.from_batches([batch] if batch is not None else [], schema=self.src.schema)
            t = gen.time_of(i)
            items.append(UpdateBatch(table, Frontier(t), Frontier(t + 1), offsets={self.key: i}))
            last_of_batch_run = end is not None and i == end - 1
            self._frontier = t + 1 if last_of_batch_run else gen.time_of(i + 1)
            items.append(self._progress(self._frontier))
            self.next_tick = i + 1
            self.offset = i
        if end is not None and self.next_tick >= end:
            self._done = True  # the final Progress went out with the last tick
        if self.src.rate is None:
            self._awake = None
        else:
            due_in = (self.next_tick - self._start) / self.src.rate - (time.monotonic() - self._t0)
            # Wake for the next tick, but at least every 0.2 s to notice a stop request.
            self._awake = awake_in(min(max(due_in, 0.0), 0.2))
        return items

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        pass


def loadgen_sources(
    generator: LoadGenerator,
    *,
    ticks: int | None,
    rate: float | None = None,
    resume: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, LoadgenSource]:
    """One `LoadgenSource` per collection of `generator`: `{collection: source}`.

    `resume` maps a collection to that collection's resume offsets.
    """
    resume = resume or {}
    return {
        c: LoadgenSource(generator, c, ticks=ticks, rate=rate, resume=resume.get(c))
        for c in generator.schemas()
    }

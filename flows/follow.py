"""`follow_committed`: a collection the same flow writes, read back as it becomes durable.

A view maintained in the same `shardflow run` as the flow that writes its input
(CSV -> collection -> view) cannot read that input with a `ShardSource`: in batch
mode a `ShardSource` stops at the upper the shard had when it started (empty,
the sink has not written yet), and it cannot know when the writer is done.

`follow_committed` takes the input's sink's `Committed` stream instead
(`persist_sink` emits one per successful append). On each, it reads the shard
from the frontier it reached up to the shard's upper (`listen`), so it emits
exactly what became durable, in order, and never what a SIGKILL could still
lose. Its output is what a `ShardSource` emits (`UpdateBatch`es with offsets
`{"<name>/0": frontier}`, then `Progress`), so the view operator and its
resume logic are the same:

- fresh (`resume=None`): the snapshot at `as_of` (updates at `as_of`) once the
  upper passed it, then every later update;
- resumed at frontier `F` (the view's committed offset): every update at a
  time `>= F`. The gap `[F, input upper at start)` (the input committed and
  the view did not, before a crash) is read at the first event: a one-shot
  start item merged into the `Committed` stream wakes it even when the writer
  has nothing new to commit; and once more at the end of the stream.

With `at_end` (what `ctx.view` asks in batch mode) it reads once, when the
`Committed` stream ends: a batch run's view is wanted at the end, and every
read wakes the view, whose evaluation costs about the same however much
changed (ten 1M-row appends cost ten evaluations of a GROUP BY over 100k groups).

One worker (one key), like the committer it follows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Stream
from bytewax.operators import StatefulBatchLogic
from bytewax.testing import TestingSource

from storage import Client, Frontier, Progress, ReadHandle, UpdateBatch
from storage.errors import InvalidInput, ReadBeforeSince

from .operators import one_key

__all__ = ["follow_committed"]

_START = "start"


class _FollowLogic(StatefulBatchLogic[Any, Any, None]):
    def __init__(
        self, step_id: str, client: Client, shard: str, key: str, as_of: int | None, resume: int | None, at_end: bool
    ):
        self.at_end = at_end
        self.step_id = step_id
        self.client = client
        self.shard = shard
        self.key = key
        self.keys = (key,)
        self.as_of = as_of
        # Everything before `frontier` was emitted; None until the snapshot is taken.
        self.frontier: int | None = resume
        self.reader: ReadHandle = client.open_leased_reader(shard)
        self._announced = False

    def _progress(self, t: int) -> Progress:
        return Progress(Frontier(t), partition=self.key, partitions=self.keys)

    def _catch_up(self) -> list[Any]:
        out: list[Any] = []
        if not self._announced:
            # Downstream learns this input exists (and where it stands) before any data.
            self._announced = True
            out.append(self._progress(self.frontier or 0))
        upper = self.client.state(self.shard).upper
        if upper.is_empty:
            return out
        u = upper.time
        assert u is not None
        if self.frontier is None:
            if self.as_of is None and u == 0:
                return out  # nothing written yet
            as_of = self.as_of if self.as_of is not None else u - 1
            if u <= as_of:
                return out  # nothing readable at as_of yet: the next commit wakes us
            try:
                snap = self.reader.snapshot_updates(as_of, timeout=0)
            except ReadBeforeSince as e:
                raise InvalidInput(f"{self.step_id}: {e}") from None
            self.frontier = as_of + 1
            out += [
                UpdateBatch(snap.table, Frontier(as_of), Frontier(as_of + 1), offsets={self.key: self.frontier}),
                self._progress(self.frontier),
            ]
        if u <= self.frontier:
            return out
        try:
            events = list(self.reader.listen(self.frontier - 1, timeout=0))
        except ReadBeforeSince as e:
            raise InvalidInput(
                f"{self.step_id}: changes of shard {self.shard} from time {self.frontier} were compacted away ({e})"
            ) from None
        # One UpdateBatch and one Progress for the whole range read, not one per stored
        # batch: each Progress wakes the view downstream for an evaluation.
        tables: list[pa.Table] = []
        held: list[pa.Table] = []  # updates not yet followed by their Progress
        last = self.frontier
        for ev in events:
            if isinstance(ev, UpdateBatch):
                if ev.table.num_rows:
                    held.append(ev.table)
                continue
            t = ev.frontier.time
            if t is None:
                break  # the input was finalized
            if t > last:
                # INVARIANT: listen's batches hold times in [frontier, t).
                tables += held
                last = t
            held = []
        if last > self.frontier:
            table = pa.concat_tables(tables) if tables else self.reader.schema.empty_table()
            out.append(UpdateBatch(table, Frontier(self.frontier), Frontier(last), offsets={self.key: last}))
            out.append(self._progress(last))
            self.frontier = last
        return out

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        if self.at_end:
            return [], StatefulBatchLogic.RETAIN
        return self._catch_up(), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        out = self._catch_up()
        self.reader.expire()
        return out, StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        return None


def follow_committed(
    step_id: str,
    committed: Stream[Any],
    client: Client,
    shard: str,
    *,
    name: str,
    as_of: int | None = None,
    resume: int | None = None,
    at_end: bool = False,
) -> Stream[Any]:
    """Shard `shard`'s updates as its sink commits them: `UpdateBatch`/`Progress` like a `ShardSource`.

    Args:
        step_id: the step's id.
        committed: the `Committed` stream of the sink writing `shard` in this flow.
        client: the storage client.
        shard: the shard that sink writes.
        name: the partition key's prefix (`"<name>/0"`), the input's name in the view.
        as_of: a fresh reader's snapshot time (default: the upper at the first event minus one).
        resume: the frontier already consumed (the view's committed offset); skips the snapshot.
        at_end: read only once, when the `Committed` stream ends (a batch run: the view
            downstream then evaluates once over everything, not once per append).
    """
    if resume is not None and resume < 1:
        raise InvalidInput(f"{step_id}: resume frontier must be >= 1, got {resume!r}")
    flow = committed.flow()
    kick = op.input(f"{step_id}_start", flow, TestingSource([_START]))
    merged = op.merge(f"{step_id}_merge", committed, kick)
    keyed = one_key(f"{step_id}_key", merged)
    key = f"{name}/0"
    out = op.stateful_batch(
        f"{step_id}_read", keyed, lambda _r: _FollowLogic(step_id, client, shard, key, as_of, resume, at_end)
    )
    return op.key_rm(f"{step_id}_unkey", out)

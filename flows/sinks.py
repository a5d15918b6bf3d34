"""Sinks: the self-correcting `persist_sink` and the blind `append_sink`.

Both take a stream of `UpdateBatch`/`Progress` items and return a stream of
`Committed` events (one per successful compare-and-append), which the job
runner counts; ignore it if you do not need it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic

from storage import (
    TIME,
    Batch,
    Client,
    Frontier,
    Progress,
    ReadHandle,
    UpdateBatch,
    WriteHandle,
    consolidate_sql,
    overflow_checked,
)
from storage.errors import InvalidInput, InvalidUppers, LeaseExpired, OffsetsMismatch, UpperMismatch
from storage.query import qliteral

# The consolidation SQL below (`_correction`, `_absorb`) is to move to storage's one
# consolidation builder; until then it uses these helpers of `storage.updates`.
from .operators import FrontierTracker, OffsetQueue, arrow_of, check_item, one_key, tmax_of, tmin_of

__all__ = ["Committed", "WrittenBatch", "append_sink", "export_resume_upper", "kafka_sink", "persist_sink"]

OFFSETS_KEY = "offsets"
#: The upper of the append that last committed offsets: desired == persisted below it.
OFFSETS_UPPER_KEY = "offsets_upper"
MAX_CAS_ATTEMPTS = 50
#: Seconds between refreshes of written-but-uncommitted parts (see `_keep_pending_alive`).
KEEP_ALIVE_S = 60.0
#: The memory limit (MiB) of the file-backed DuckDB that computes corrections; past it they spill
#: to its temp dir (an out-of-memory query is retried with more: `operators.arrow_of`).
SINK_MEMORY_MB = 256  # 512 peaked at 0.93-1.01 GiB in bench/sink_memory.py; 256: 0.80-0.83 GiB

NowGetter = Callable[[], datetime]


def utc_now() -> datetime:
    """The default `now_getter` of the sinks: the wall clock, in UTC."""
    return datetime.now(UTC)


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


class _HasMetadata(Protocol):
    @property
    def metadata(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class WrittenBatch:
    """Updates a worker has already written as a (not yet appended) `Batch`.

    `tmin`/`tmax` bound the times (-1 when empty); `offsets` are the source
    offsets of the `UpdateBatch` it came from.
    """

    batch: Batch
    tmin: int
    tmax: int
    rows: int
    offsets: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Committed:
    """One successful append of the batch `[lower, upper)` to `shard`."""

    shard: str
    lower: Frontier
    upper: Frontier
    rows: int
    offsets: Mapping[str, Any] = field(default_factory=dict)
    wall_ms: int = 0
    corrected: bool = False  # True when the batch came from the slow path (a correction)


def committed_offsets(state: _HasMetadata) -> dict[str, Any]:
    """The source offsets committed in `state` (partition key -> offset to resume after)."""
    return dict(state.metadata.get(OFFSETS_KEY) or {})


def resume_point(state: _HasMetadata) -> tuple[dict[str, Any], int | None]:
    """(offsets, as_of) to resume a flow writing this shard; `as_of` is None when nothing was committed.

    `as_of` is the upper of the append that committed the offsets (not the
    current upper: another writer may have appended since, and the sink must
    still correct that).
    """
    offs = committed_offsets(state)
    up = state.metadata.get(OFFSETS_UPPER_KEY)
    if not offs or up is None:
        return {}, None
    return offs, int(up)


class _PartWriter:
    """The per-worker write step: validates a batch and writes it as parts (`WriteHandle.batch`)."""

    def __init__(self, step_id: str, client: Client, shard: str, as_of: int | None):
        self.step_id = step_id
        self.client = client
        self.shard = shard
        self.as_of = as_of
        self._writer: WriteHandle | None = None

    def __call__(self, x: Any) -> Any:
        check_item(self.step_id, x)
        if isinstance(x, Progress):
            return x
        if self._writer is None:
            self._writer = self.client.open_writer(self.shard)
        table = x.table
        if self.as_of is not None and table.num_rows and tmin_of(table) < self.as_of:
            # Below as_of the shard already holds desired (see persist_sink, SUBTLE).
            table = table.filter(pc.greater_equal(table.column(TIME), pa.scalar(self.as_of, pa.int64())))
        tmin, tmax = tmin_of(table), tmax_of(table)
        # The batch's bounds are its own times: the committer appends it inside any [P, F) that holds them.
        batch = self._writer.batch(table, lower=max(tmin, 0), upper=max(tmax + 1, tmin, 0))
        return WrittenBatch(batch, tmin, tmax, batch.rows, x.offsets)


def _lt(t: int, f: Frontier) -> bool:
    """Time `t` is before frontier `f`."""
    return f.is_empty or t < f.time  # type: ignore[operator]


class PersistLogic(StatefulBatchLogic[Any, Committed, None]):
    """The committer of `persist_sink` (one per shard; see its docstring).

    State:
      - `P`: the persisted upper as last seen;
      - `S` (the sync point): desired and persisted accumulate to the same
        contents over all times `< S`; `S <= P` always;
      - `pending`: written-but-uncommitted parts of desired updates (on disk,
        in blob), each with its time bounds; together they hold desired at
        every time `>= S`;
      - the input frontier `F` (`FrontierTracker`) and the source offsets.
    """

    def __init__(
        self,
        step_id: str,
        client: Client,
        shard: str,
        as_of: int | None,
        *,
        now_getter: NowGetter = utc_now,
        retry_interval: float = 0.2,
        hold: ReadHandle | None = None,
        commit_every: float | None = None,
        after: str | None = None,
        hold_with: str | None = None,
    ):
        self.step_id = step_id
        self.client = client
        self.shard = shard
        self.writer = client.open_writer(shard)
        self.schema = self.writer.schema
        s = client.state(shard)
        self.P: Frontier = s.upper
        if as_of is not None and not s.upper.is_empty and as_of > s.upper.time:  # type: ignore[operator]
            msg = f"step {step_id!r}: as_of {as_of} is beyond shard {shard}'s upper {s.upper}"
            raise InvalidInput(msg)
        self.S: int = 0 if as_of is None else as_of
        self.offsets: dict[str, Any] = committed_offsets(s)
        self.oq = OffsetQueue()
        self.pending: list[WrittenBatch] = []
        self.tracker = FrontierTracker()
        self.now_getter = now_getter
        self.retry_interval = retry_interval
        self._retry_at: datetime | None = None
        self.commit_every = commit_every
        self._commit_at: datetime | None = None  # the next append, when `commit_every` holds it back
        self._last_commit = now_getter()
        self._reader: ReadHandle | None = None
        self._released = 0.0
        self._tmp: str | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._absorbed: Frontier | None = None
        self._touched = now_getter()
        #: commit only below this shard's upper (`persist_sink(after=)`), as last read.
        self.after = after
        self._gate: Frontier | None = None if after is None else client.state(after).upper
        #: hold since also below this shard's resume point (`persist_sink(hold_with=)`).
        self.hold_with = hold_with
        self._hold_since(hold)

    # ---- the read hold ----
    def _hold_since(self, hold: ReadHandle | None) -> None:
        """Hold the shard's since at `S - 1` with a leased (heartbeated) reader.

        SUBTLE: the persisted side of a correction over `[S, P)` is exact only while
        since `< S` (see `_sources`). The shard's since is the minimum over its
        readers and the controller's critical handle, so without a reader of its
        own the sink is at the mercy of whoever runs the read policy (another copy
        of the flow, the housekeeper). Registered at the shard's since as it is
        now; if that is already past `S - 1`, `_sources` refuses, as before. The
        reader is downgraded as `S` moves (`_synced`), expired in `close` (EOF,
        stop), and a crashed process's lease runs out on its own.
        """
        r = self.client.open_leased_reader(self.shard)
        self._reader = r
        if hold is not None:
            # The caller's hold (taken before it read `as_of`) kept since where it was until now.
            try:
                hold.expire()
            except Exception:  # noqa: BLE001 - it runs out its lease
                pass
        self._downgrade()

    def _downgrade(self) -> None:
        r = self._reader
        if r is None or self.S <= 0:
            return
        # SUBTLE: a hold, not a policy: never past `S - 1`, and never past the other holders
        # (the controller's critical handle, other readers). Alone on a shard the sink does
        # not move since at all, as before it had a reader; with a read policy since follows
        # min(policy, S - 1), so compaction and gc keep going while the job runs.
        s = self.client.state(self.shard)
        now = self.client.clock()
        others = [x.since for k, x in s.leased_readers.items() if k != r.reader_id and x.lease_expires_ms > now]
        others += [x.since for x in s.critical_readers.values()]
        if not others:
            return
        lim = min(others)
        target: int = self.S - 1 if lim.time is None else min(self.S - 1, lim.time)
        if self.hold_with is not None:
            # SUBTLE: a restart corrects this shard from `hold_with`'s resume point (the flow's
            # `persist(after=)`), which may lie below `S`: keep since below it too.
            a = resume_point(self.client.state(self.hold_with))[1]
            if a is not None:
                target = min(target, a - 1)
        cur = r.since
        if cur.is_empty or (cur.time is not None and cur.time >= target):
            return
        try:
            r.downgrade_since(target)
            now_s = time.monotonic()
            if now_s - self._released >= 1.0:
                # The sink reads the shard without the handle: let gc have what it no longer needs.
                self._released = now_s
                r.release_versions()
        except LeaseExpired:
            # A stall outlived the lease: hold again from since as it is now (`_sources` checks it).
            self._reader = self.client.open_leased_reader(self.shard)
            self._downgrade()

    # ---- bytewax hooks ----
    def on_batch(self, values: list[Any]) -> tuple[Iterable[Committed], bool]:
        for v in values:
            if isinstance(v, Progress):
                self.tracker.observe(v)
            elif isinstance(v, WrittenBatch):
                if v.rows:
                    self.pending.append(v)
                self.oq.push(v.offsets, v.tmax)
            elif isinstance(v, Committed) and self.after is not None:
                pass  # the `after` shard moved on: `advance` reads its upper
            else:
                msg = f"step {self.step_id!r}: unexpected item {type(v)!r} in the committer"
                raise TypeError(msg)
        return self.advance(), StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[Committed], bool]:
        self._retry_at = None
        self._commit_at = None
        return self.advance(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        ts = [t for t in (self._retry_at, self._commit_at) if t is not None]
        return min(ts) if ts else None

    def on_eof(self) -> tuple[Iterable[Committed], bool]:
        try:
            out = self.advance(final=True)
        finally:
            self.close()
        return out, StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.expire()
            except Exception:
                pass
            self._reader = None
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # ---- the algorithm ----
    def _keep_pending_alive(self) -> None:
        """Refresh the mtime of written-but-uncommitted parts, at most once a minute.

        SUBTLE: until the CAS, gc sees these parts as orphans and deletes orphans older
        than its grace period (15 min). A frontier can stall far longer than that (an
        idle source partition), so the committer keeps its parts young. Remote blobs
        (no local path) are not refreshed: there, a stall longer than the grace period
        must not meet a concurrent gc.
        """
        now = self.now_getter()
        if (now - self._touched).total_seconds() < KEEP_ALIVE_S:
            return
        self._touched = now
        self.client.parts.touch(p for w in self.pending for p in w.batch.parts)

    def advance(self, *, final: bool = False) -> list[Committed]:
        """Append `[P, F)` if the input frontier `F` is beyond the persisted upper `P`.

        With `commit_every`, not sooner than that many seconds after the last append
        (a notification comes then), unless `final` (end of input).
        """
        self._keep_pending_alive()
        f = self.tracker.frontier()
        if f is None:
            return []
        if self._gate is not None and self._gate < f:
            # SUBTLE: never commit offsets past what the `after` shard holds (see `persist_sink`).
            assert self.after is not None
            self._gate = self.client.state(self.after).upper
            if self._gate < f:
                f = self._gate
        if self.commit_every and not final and f > self.P:
            due = self._last_commit + timedelta(seconds=self.commit_every)
            if self.now_getter() < due:
                self._commit_at = due
                return []
        out: list[Committed] = []
        for _ in range(MAX_CAS_ATTEMPTS):
            if f <= self.P:
                # Someone else is ahead. If they wrote what we desire, move the sync point.
                self._absorb(f)
                return out
            assert self.P.time is not None
            # INVARIANT: the sync point never passes the persisted upper.
            assert self.P.time >= self.S, (self.S, self.P)
            batches, rows, corrected = self._batch(self.P, f)
            offs = self.oq_peek(f)
            # SUBTLE: record the resume point on EVERY commit, not only on commits with new
            # offsets: after any commit of [P, f), desired == persisted below f. A resume point
            # left behind (e.g. by a source whose frontier moves while idle) falls below since
            # once compaction advances, and a restart could then never correct from it.
            md: dict[str, Any] = {OFFSETS_KEY: {**self.offsets, **offs}}
            if f.time is not None:
                md[OFFSETS_UPPER_KEY] = f.time
            try:
                self.writer.compare_and_append_batch(
                    batches, expected_upper=self.P, new_upper=f, token=uuid.uuid4().hex, metadata=md
                )
            except UpperMismatch as e:
                # SUBTLE: we do nothing to the data here; the next round reads what the
                # other writer appended in [S, current) and the correction absorbs it.
                cur = Frontier.of(e.current)
                if cur.is_empty:
                    msg = f"step {self.step_id!r}: shard {self.shard} was closed (empty upper) by another writer"
                    raise InvalidUppers(msg) from e
                self.P = cur
                continue
            lower = self.P
            self._last_commit = self.now_getter()
            self.offsets.update(offs)
            self._synced(f)
            out.append(Committed(self.shard, lower, f, rows, offs, _ms(self.now_getter()), corrected))
            return out
        # Lost the race too often: try again later rather than spin.
        self._retry_at = self.now_getter() + timedelta(seconds=self.retry_interval)
        return out

    def oq_peek(self, f: Frontier) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, dq in self.oq.q.items():
            for tmax, v in dq:
                if not _lt(tmax, f):
                    break
                out[k] = v
        return out

    def _synced(self, f: Frontier) -> None:
        """Desired == persisted below `f` (and `P >= f`): move S, drop what is covered."""
        if not f.is_empty and f > self.P:
            self.P = f
        self.S = f.time if f.time is not None else self.S
        self._downgrade()
        self.pending = [w for w in self.pending if not _lt(w.tmax, f)]
        self.oq.pop(f)

    def _batch(self, lower: Frontier, upper: Frontier) -> tuple[list[Batch], int, bool]:
        """The batches to append as `[lower, upper)`; `corrected` when they had to be recomputed."""
        lo = lower.time
        assert lo is not None
        due = [w for w in self.pending if _lt(w.tmin, upper)]
        fast = lo == self.S and all(w.tmin >= lo and _lt(w.tmax, upper) for w in due)
        if fast:
            # In sync: the workers' parts are exactly desired - persisted on [lower, upper).
            return [w.batch for w in due], sum(w.rows for w in due), False
        table = self._correction(lo, upper, due)
        return [self.writer.batch(table, lower=lo, upper=upper)], table.num_rows, True

    # ---- DuckDB over parts ----
    def _duck(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._tmp = tempfile.mkdtemp(prefix="shardflow-sink-")
            # File-backed, with a memory limit: large corrections spill to the temp dir.
            self._con = duckdb.connect(os.path.join(self._tmp, "sink.duckdb"))
            self._con.execute(f"SET memory_limit='{SINK_MEMORY_MB}MB'")
            self._con.execute(f"SET temp_directory = {qliteral(os.path.join(self._tmp, 'spill'))}")
            self._con.execute("SET preserve_insertion_order=false")
        return self._con

    def _sources(self, con: duckdb.DuckDBPyConnection, due: list[WrittenBatch], lo: int, hi: int) -> tuple[str, str]:
        """FROM clauses over desired (the parts of `due`) and over the shard's updates at times in `[lo, hi)`.

        Both through the client's part store, which checks every part's sha256
        (`CorruptPart` for a missing or damaged one).

        SUBTLE: the persisted side is exact only while the shard's since is `< lo`
        (compaction advances times below since *to* since, which would pull older
        updates into the range). The sink's leased reader holds since at `S - 1`
        (`_hold_since`); if since had already passed the sync point when the sink
        started, we refuse rather than guess.
        """
        s = self.client.state(self.shard)
        if lo < hi and lo > 0 and not s.since.less_equal(lo - 1):
            msg = (
                f"step {self.step_id!r}: shard {self.shard}'s since {s.since} passed the sink's sync "
                f"point {lo}; its updates in [{lo}, {hi}) can no longer be told apart"
            )
            raise InvalidUppers(msg)
        batches = [b for b in s.batches if b.parts and b.lower.less_than(hi) and not b.upper.less_equal(lo)]
        desired = self.client.parts.source(s, [w.batch for w in due], con, "__desired").src
        return desired, self.client.parts.source(s, batches, con, "__persisted").src

    def _correction(self, lo: int, upper: Frontier, due: list[WrittenBatch]) -> pa.Table:
        """desired - persisted over times `[S, upper)`, each time advanced to `lo` (the persisted upper).

        With the sync invariant (desired == persisted accumulated below S), appending
        this at `[lo, upper)` makes the shard equal desired at every time in `[lo, upper)`.
        """
        con = self._duck()
        dsrc, psrc = self._sources(con, due, self.S, lo)
        up = "" if upper.is_empty else f" AND {TIME} < {upper.time}"
        q = consolidate_sql(
            f"(SELECT * FROM {dsrc} WHERE {TIME} >= {self.S}{up})",
            self.schema.names,
            minus=f"(SELECT * FROM {psrc} WHERE {TIME} >= {self.S} AND {TIME} < {lo})",
            since=lo,
            where=f"step {self.step_id!r} (shard {self.shard})",
        )
        try:
            return arrow_of(con, q, SINK_MEMORY_MB)
        finally:
            _unregister(con)

    def _absorb(self, f: Frontier) -> None:
        """With `S < f <= P`: if persisted accumulates to desired below `f`, move S to `f`."""
        if f.time is None or f.time <= self.S or self._absorbed == f:
            return
        self._absorbed = f
        due = [w for w in self.pending if w.tmin < f.time]
        con = self._duck()
        dsrc, psrc = self._sources(con, due, self.S, f.time)
        rng = f"{TIME} >= {self.S} AND {TIME} < {f.time}"
        diff = consolidate_sql(
            f"(SELECT * FROM {dsrc} WHERE {rng})",
            self.schema.names,
            minus=f"(SELECT * FROM {psrc} WHERE {rng})",
            drop_time=True,
            where=f"step {self.step_id!r} (shard {self.shard})",
        )
        q = f"SELECT count(*) FROM ({diff})"
        try:
            with overflow_checked():
                rows_ = con.sql(q).fetchall()
            row = rows_[0] if rows_ else None
        finally:
            _unregister(con)
        if row is not None and row[0] == 0:
            self._synced(f)


def _unregister(con: duckdb.DuckDBPyConnection) -> None:
    for name in ("__desired", "__persisted"):
        try:
            con.unregister(name)
        except Exception:
            pass


@operator
def persist_sink(
    step_id: str,
    up: Stream[Any],
    client: Client,
    shard: str,
    *,
    as_of: int | None = None,
    schema: pa.Schema | None = None,
    hold: ReadHandle | None = None,
    commit_every: float | None = None,
    after: Stream[Committed] | None = None,
    after_shard: str | None = None,
    hold_with: str | None = None,
) -> Stream[Committed]:
    """The self-correcting sink: make `shard` equal the desired updates of `up`.

    Built like Materialize's persist_sink, in three steps:

    - **write** (every worker, in parallel): each `UpdateBatch` is validated
      against the shard's schema and written to blob as parts (not yet
      visible); a `WrittenBatch` (parts, time bounds, offsets) goes on.
    - **mint + append** (one committer per shard, a single key): it tracks the
      input frontier `F` (min over source partitions, from `Progress`) and the
      persisted upper `P`. When `P < F` it appends `[P, F)` with one
      compare_and_append, and the batch's source offsets go into the shard's
      metadata (`"offsets"`) in the same CAS: exactly-once ingestion.
    - **correction = desired - persisted**: the committer keeps a sync point
      `S`: desired and persisted accumulate to the same contents below `S`.
      When `S == P` (the usual case) the workers' parts are the correction and
      are appended as they are (no copy). Otherwise (another writer appended,
      or the shard held other contents at start) it computes, in a
      file-backed DuckDB that spills to a temp dir, desired over `[S, F)` minus
      persisted over `[S, P)`, with times advanced to `P`, writes that as new
      parts and appends it at `[P, F)`. On `UpperMismatch` it only learns the
      new upper; the next round's correction absorbs what the other writer
      wrote, so nothing is duplicated or lost, and several copies of one flow
      writing the same shard converge to the same contents.

    Desired is never held whole in Python memory: not-yet-appended desired
    lives in the parts the workers wrote (Parquet on disk/blob), and the
    correction is a DuckDB query over them and over the shard's parts.

    Args:
        step_id: the step's id.
        up: `UpdateBatch`/`Progress` items (any partitioning; `consolidate`
            upstream makes the fast path copy-free).
        client: the storage client.
        shard: the shard id (ask the storage controller for a collection's shard).
        as_of: None to correct everything (fresh start), or, when the flow
            resumed from offsets committed in the shard, the upper they were
            committed at (`resume_point(state)[1]`).
        schema: create the shard with this row schema if it does not exist.
        hold: a leased reader the caller opened *before* it read `as_of`; it keeps
            since at or below `as_of - 1` until the committer has registered its own
            reader (which holds since at `S - 1` while the sink runs), then is expired.
        commit_every: None (the default) appends as soon as the frontier moves.
            Seconds: at most one append per that many seconds (the first that
            long after the sink starts), covering every frontier passed
            meanwhile, and one at the end of input. Fewer, larger batches: less
            consensus traffic and compaction, for throughput over freshness (a
            batch job's choice, `flows.job.BATCH_COMMIT_EVERY`). A crash redoes
            at most that much work: offsets commit with the data, as always.
        after, after_shard: the `Committed` stream and the shard of another `persist_sink`
            fed by the same source, which must commit each frontier first: this
            sink commits `[P, F)` only up to that shard's upper, so its offsets never
            run ahead of what the other holds. The two sinks of `split_errors` (errors
            first, data `after` them): a crash between their commits then leaves the
            errors ahead, never behind, and the rerun from the data's offsets re-reads
            what the errors sink must correct (see `hold_with`).
        hold_with: the shard of the sink that runs `after` this one (the data): the
            flow resumes from *its* offsets, so this sink is started with `as_of` at or
            below that shard's resume point, and holds since below it as well.

    Returns:
        A stream of `Committed` events, one per successful append.

    SUBTLE: a resumed flow re-reads its input only *after* the committed
    offsets, so desired below the resume point is not seen again (and a
    replayed batch may hold updates below it that are already in the shard).
    The sink must therefore assume desired == persisted below `as_of` (`S`
    starts at `as_of`) and drop incoming updates at times `< as_of`; started
    fresh (`as_of=None`, no offsets) it assumes nothing (`S = 0`) and its first
    append corrects the whole shard to desired. Passing `None` on a resumed
    flow would retract everything before the resume point.
    """
    if schema is not None:
        client.open_writer(shard, schema)  # create the shard now, before workers look at it
    writer = _PartWriter(step_id, client, shard, as_of)
    written = op.map("write", up, writer)
    if (after is None) != (after_shard is None):
        raise InvalidInput(f"step {step_id!r}: after= and after_shard= go together")
    if after is not None:
        # Its commits wake this committer, and its end of input comes before this one's.
        written = op.merge("after", written, after)
    gate = after_shard
    keyed = one_key("key", written)
    out = op.stateful_batch(
        "commit",
        keyed,
        lambda _resume: PersistLogic(
            step_id, client, shard, as_of, hold=hold, commit_every=commit_every, after=gate, hold_with=hold_with
        ),
    )
    return op.key_rm("unkey", out)


# --------------------------------------------------------------------------------------------
# append_sink
# --------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A buffered input batch of `append_sink`: its rows and the source position it covers.

    For each partition key in `offsets`, the batch holds that partition's records
    after `prev[key]` (the offset before it in this run's input; None: from the
    start) up to and including `offsets[key]`.
    """

    table: pa.Table | None
    offsets: dict[str, Any]
    prev: dict[str, Any]


def _is_pos(x: Any) -> bool:
    """Integer offsets (ticks, LSNs, frontiers) are ordered positions; others compare only by equality."""
    return isinstance(x, int) and not isinstance(x, bool)


class AppendLogic(StatefulBatchLogic[Any, Committed, None]):
    """Buffers rows and appends them with `monotonic_append` at most once per `batch_duration`.

    Exactly once across concurrent copies: the source offsets of the buffered
    batches go into the CAS, together with the offsets this run expects to be
    committed (`expected`: what its source resumed from, then what it committed
    itself). When another run committed past them (`OffsetsMismatch`), it
    re-reads the committed offsets and drops the batches that are already in:
    a batch whose offsets are all at or before the committed ones. Later input
    up to the committed offsets is dropped on arrival. A batch that straddles a
    committed offset (its records lie on both sides) cannot be split, nor can a
    committed opaque offset that is not one of this run's batch boundaries be
    placed: then the sink stops with `OffsetsMismatch` and one clear line.
    """

    def __init__(
        self,
        step_id: str,
        client: Client,
        shard: str,
        batch_duration: float,
        *,
        now_getter: NowGetter = utc_now,
        resume_offsets: Mapping[str, Any] | None = None,
    ):
        self.step_id = step_id
        self.writer = client.open_writer(shard)
        self.shard = shard
        self.batch_duration = batch_duration
        self.now_getter = now_getter
        if resume_offsets is None:
            resume_offsets = committed_offsets(client.state(shard))
        #: partition key -> the committed offset this run's next commit must find.
        self.expected: dict[str, Any] = _json(dict(resume_offsets))
        #: partition key -> the offset of the last batch seen (committed or not).
        self.seen: dict[str, Any] = dict(self.expected)
        self.buf: list[_Pending] = []
        #: partition key -> an integer offset another run committed beyond what this run had read.
        self.ahead: dict[str, Any] = {}
        self.offsets: dict[str, Any] = {}
        self.tmax = -1
        self.last_commit: datetime | None = None

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Committed], bool]:
        for v in values:
            check_item(self.step_id, v)
            if isinstance(v, UpdateBatch):
                self._push(v)
        if self._due() <= 0.0:
            return self.flush(), StatefulBatchLogic.RETAIN
        return [], StatefulBatchLogic.RETAIN

    def _push(self, v: UpdateBatch) -> None:
        offs = _json(dict(v.offsets)) if v.offsets else {}
        if not offs and not v.table.num_rows:
            return
        p = _Pending(v.table if v.table.num_rows else None, offs, {k: self.seen.get(k) for k in offs})
        self.seen.update(offs)
        if offs and self.ahead and self._arrived_covered(p):
            return  # another run of this flow already committed it
        self.buf.append(p)
        if p.table is not None:
            self.tmax = max(self.tmax, tmax_of(p.table))
        self.offsets.update(offs)

    def _arrived_covered(self, p: _Pending) -> bool:
        """For partitions another run committed beyond what this run had read (`ahead`):
        True if `p` lies at or before that offset, False if after (and the partition is caught up)."""
        flags = []
        for k, o in p.offsets.items():
            c = self.ahead.get(k)
            if c is None:
                flags.append(False)
                continue
            prev = p.prev[k]
            if o == c or (_is_pos(o) and o < c):
                flags.append(True)
                if o == c:
                    del self.ahead[k]  # caught up: from here on this run's input is new
            elif prev == c or (_is_pos(prev) and prev > c):
                flags.append(False)
                del self.ahead[k]
            else:
                raise self._stop(k, prev, o, c)
        return self._all_or_none(p, flags)

    def _all_or_none(self, p: _Pending, flags: list[bool]) -> bool:
        if all(flags):
            return bool(flags)
        if any(flags):
            msg = (
                f"step {self.step_id!r}: an input batch with offsets {p.offsets} is partly committed by another "
                f"run of this flow in shard {self.shard} (committed: {self.expected}); it cannot be split, so it stops"
            )
            raise OffsetsMismatch(self.shard, p.offsets, dict(self.expected), msg)
        return False

    def _stop(self, key: str, prev: Any, off: Any, committed: Any) -> OffsetsMismatch:
        start = "the start" if prev is None else repr(prev)
        msg = (
            f"step {self.step_id!r}: another run of this flow committed source partition {key!r} of shard "
            f"{self.shard} up to offset {committed!r}, which is not a batch boundary of this run's input "
            f"(read from {start} up to {off!r}); it cannot tell which of its rows are already in, "
            "so it stops (none of them was written)"
        )
        return OffsetsMismatch(self.shard, {key: off}, {key: committed}, msg)

    def _resync(self, current: Mapping[str, Any]) -> None:
        """Another run committed `current` (partition key -> offset): drop the buffered batches it covers.

        Per partition, in this run's input order: every batch up to the one that ends
        at the committed offset is in, and so is every batch after the one that starts
        there is not. A committed offset beyond everything read so far (integer
        offsets only) covers the whole buffer, and later input up to it is dropped on
        arrival (`ahead`).
        """
        covered: dict[int, list[bool]] = {}
        for k, c in current.items():
            if c == self.expected.get(k):
                continue
            mine = [i for i, p in enumerate(self.buf) if k in p.offsets]
            flags = self._place(k, c, [self.buf[i] for i in mine])
            for i, f in zip(mine, flags, strict=True):
                covered.setdefault(i, []).append(f)
        self.expected.update(current)
        keep = []
        for i, p in enumerate(self.buf):
            if not self._all_or_none(p, covered.get(i, [])):
                keep.append(p)
        self.buf = keep
        self.offsets, self.tmax = {}, -1
        for p in self.buf:
            self.offsets.update(p.offsets)
            if p.table is not None:
                self.tmax = max(self.tmax, tmax_of(p.table))

    def _place(self, k: str, c: Any, items: list[_Pending]) -> list[bool]:
        """Covered flags of `items` (the buffered batches of partition `k`, in order) given committed offset `c`."""
        n = len(items)
        for i, p in enumerate(items):
            if p.offsets[k] == c:
                return [True] * (i + 1) + [False] * (n - i - 1)
            if p.prev[k] == c:
                return [True] * i + [False] * (n - i)
        if n and _is_pos(c) and all(_is_pos(p.offsets[k]) for p in items):
            if items[-1].offsets[k] < c:
                self.ahead[k] = c  # beyond all this run has read: the rest arrives later
                return [True] * n
            flags = []
            for p in items:
                if p.offsets[k] < c:
                    flags.append(True)
                elif _is_pos(p.prev[k]) and p.prev[k] >= c:
                    flags.append(False)
                else:
                    raise self._stop(k, p.prev[k], p.offsets[k], c)
            return flags
        if n == 0 and _is_pos(c) and (self.seen.get(k) is None or _is_pos(self.seen.get(k))):
            if self.seen.get(k) is None or self.seen[k] < c:
                self.ahead[k] = c
            return []
        if n == 0:
            return []
        raise self._stop(k, items[0].prev[k], items[-1].offsets[k], c)

    def on_notify(self) -> tuple[Iterable[Committed], bool]:
        return self.flush(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.buf:
            return None
        return self.now_getter() + timedelta(seconds=max(0.0, self._due()))

    def _due(self) -> float:
        """Seconds until the next commit may happen (<= 0: now)."""
        if self.last_commit is None:
            return 0.0
        return self.batch_duration - (self.now_getter() - self.last_commit).total_seconds()

    def on_eof(self) -> tuple[Iterable[Committed], bool]:
        return self.flush(), StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        return None

    def flush(self) -> list[Committed]:
        for _ in range(MAX_CAS_ATTEMPTS):
            if not self.buf:
                return []
            tables = [p.table for p in self.buf if p.table is not None]
            table = pa.concat_tables(tables) if tables else self.writer.schema.empty_table()
            rows = table.drop_columns([TIME]) if TIME in table.schema.names else table
            offs = dict(self.offsets)
            expected = {k: self.expected.get(k) for k in offs}
            lower = self.writer.upper
            try:
                ts = self.writer.monotonic_append(
                    rows, at_least=max(self.tmax, 0), offsets=offs or None, expected_offsets=expected or None
                )
            except OffsetsMismatch as e:
                # SUBTLE: another copy of this flow committed some of this input. Retrying
                # at the new upper would write it twice; drop what is in and try the rest.
                self._resync(e.current)
                continue
            out = [
                Committed(
                    self.shard, Frontier(max(ts, lower.time or 0)), Frontier(ts + 1), table.num_rows, offs,
                    _ms(self.now_getter()),
                )
            ]
            self.expected.update(offs)
            self.buf, self.offsets, self.tmax, self.last_commit = [], {}, -1, self.now_getter()
            return out
        msg = (
            f"step {self.step_id!r}: shard {self.shard}: lost the race on committed source offsets "
            f"{MAX_CAS_ATTEMPTS} times in a row; stopping"
        )
        raise InvalidUppers(msg)


def _json(offs: dict[str, Any]) -> dict[str, Any]:
    """Offsets as they read back from a shard's state (tuples become lists)."""
    out: dict[str, Any] = json.loads(json.dumps(offs))
    return out


@operator
def append_sink(
    step_id: str,
    up: Stream[Any],
    client: Client,
    shard: str,
    *,
    batch_duration: float = 1.0,
    resume_offsets: Mapping[str, Any] | None = None,
) -> Stream[Committed]:
    """Blind appends: every update goes in with `monotonic_append` at `max(upper, its max time)`.

    At most one commit per `batch_duration` seconds (default 1 s); whatever is
    buffered at end of input is flushed. Source offsets go into the same CAS,
    and so do the offsets the sink expects to be committed: several copies of
    one flow writing the same shard commit each source record once (see
    `AppendLogic`). `Progress` items are ignored (an append-only collection's
    upper is the time of its last write). One committer per shard (a single key).

    Args:
        resume_offsets: the committed offsets the source was resumed from
            (`ctx.resume_offsets`); None reads them from the shard now. Pass
            them when the source was built from an earlier read, or a copy that
            commits in between goes unnoticed.
    """
    if resume_offsets is None:
        resume_offsets = committed_offsets(client.state(shard))
    offs = dict(resume_offsets)
    keyed = one_key("key", up)
    out = op.stateful_batch(
        "append", keyed, lambda _resume: AppendLogic(step_id, client, shard, batch_duration, resume_offsets=offs)
    )
    return op.key_rm("unkey", out)


# The Kafka sink lives in its own module (confluent-kafka is imported only when it runs).
from .kafka_sink import export_resume_upper, kafka_sink  # noqa: E402

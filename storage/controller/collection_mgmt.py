"""The collection manager: the controller's own write tasks.

- **Append-only** collections take blind writes through a `MonotonicAppender`:
  rows queued within one batch duration commit together at `max(upper, now)`.
- **Differential** collections keep a *desired* state (in DuckDB, `desired.py`)
  and write `desired - persisted` at the persisted upper; after a lost race they
  re-sync `persisted` from a snapshot at `upper - 1` and retry with bounded
  backoff, then raise InvalidUppers.
- Both kinds tick idle uppers forward to now (`tick`).

Each collection's write side is a `WriteTask`, its counters a `Stats` (both in
`records.py`, with the collection record `_Coll`); the `CollectionManager` owns
the desired store and does the IO. It runs under the controller's lock and goes
back to the controller (seen through the `Controller` protocol) for what it owns: the epoch check before every write, the read side after an upper moved
(`_advance`), and fencing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, cast

import pyarrow as pa

from ..client import Client
from ..errors import (
    CorruptPart,
    Fenced,
    IdentifierInvalid,
    InvalidInput,
    InvalidUppers,
    ReadBeforeSince,
    ReadOnly,
    ShardNotFound,
    UpperMismatch,
)
from ..frontier import Frontier
from ..read import read_snapshot
from ..updates import DIFF, TIME, update_schema
from ..write import WriteHandle
from .catalog import SYSTEM_PREFIX, CollectionDesc
from .desired import DesiredStore, as_rows, rows_schema
from .records import Appender, _Coll

log = logging.getLogger("storage.controller")


class Controller(Protocol):
    """The storage controller as the collection manager and the introspection use it (`StorageController`).

    Exactly the members `collection_mgmt.py` and `introspection.py` use on their
    `ctl`; read-only properties, so `StorageController`'s attributes satisfy them.
    """

    @property
    def client(self) -> Client: ...
    @property
    def clock(self) -> Callable[[], int]: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def epoch(self) -> int: ...
    @property
    def backoff_ms(self) -> tuple[int, int]: ...
    @property
    def max_write_retries(self) -> int: ...
    @property
    def status_keep_last(self) -> int: ...
    @property
    def _colls(self) -> dict[str, _Coll]: ...
    @property
    def _lock(self) -> threading.RLock: ...
    @property
    def _wake(self) -> threading.Event: ...
    @property
    def _thread(self) -> threading.Thread | None: ...
    @property
    def _mgmt(self) -> CollectionManager: ...
    @property
    def _sleep(self) -> Callable[[float], None]: ...

    def _check_live(self) -> None: ...
    def _check_epoch(self) -> None: ...
    def _fence(self, e: Fenced) -> None: ...
    def _advance(self, c: _Coll, upper: Frontier) -> None: ...
    def _create(self, descs: Sequence[CollectionDesc], *, system: bool) -> None: ...


@dataclass(frozen=True)
class Append:
    """Add `rows` (row columns, optional `_diff`, default +1) to a differential collection's desired."""

    rows: Any


@dataclass(frozen=True)
class Delete:
    """Remove every desired row matching the DuckDB SQL predicate `filter`, e.g. `"k = 'a'"`."""

    filter: str


@dataclass(frozen=True)
class Replace:
    """Desired becomes exactly `rows`."""

    rows: Any


class MonotonicAppender:
    """Blind appends to an append-only collection, batched: one commit per batch duration.

    `append(rows)` queues `rows` (row columns, optional `_diff`); all rows queued
    within one batch duration commit together at `max(upper, now)`. With
    `wait=True` (the default) it returns once they are durable, with the time
    they were written at; with `wait=False` it returns a `Future` of that time.
    Without a background thread (`tick_interval_ms=None`), `wait=True` commits
    at once, and `wait=False` rows wait for `flush()` or `ctl.tick()`.
    """

    def __init__(self, ctl: Controller, coll: _Coll):
        self._ctl = ctl
        self._coll = coll
        self._qlock = threading.Lock()
        self._queue: list[tuple[pa.Table, Future[int]]] = []
        self._invalid: Exception | None = None
        self.last_flush = 0.0
        self.commits = 0

    @property
    def name(self) -> str:
        return self._coll.name

    def pending(self) -> int:
        with self._qlock:
            return len(self._queue)

    @property
    def commits_in_background(self) -> bool:
        """Whether the controller's thread commits queued rows, so that `append(wait=False)`
        needs no `flush()` (e.g. for an asyncio server awaiting the returned future)."""
        return self._ctl._thread is not None

    def append(self, rows: Any, *, wait: bool = True) -> Any:
        ctl = self._ctl
        ctl._check_live()
        if self._invalid is not None:
            raise self._invalid
        if ctl.read_only:
            raise ReadOnly(f"collection {self.name!r}: the controller is read-only; appends are refused")
        t = as_rows(rows, self._coll.meta.schema, f"collection {self.name!r}")
        fut: Future[int] = Future()
        with self._qlock:
            if self._invalid is not None:
                raise self._invalid
            self._queue.append((t, fut))
            self._coll.stats.staged += t.num_rows
        if not wait:
            ctl._wake.set()
            return fut
        if ctl._thread is None:
            self.flush()
        else:
            ctl._wake.set()
        return fut.result()

    def __call__(self, rows: Any) -> Any:
        """`append(rows)`: an appender is a callable sink (e.g. a webhook's `on_batch`)."""
        return self.append(rows)

    def flush(self) -> None:
        """Commit everything queued now, in one write."""
        with self._ctl._lock:
            self._ctl._mgmt.flush_appender(self)

    def _take(self) -> list[tuple[pa.Table, Future[int]]]:
        with self._qlock:
            q, self._queue = self._queue, []
            return q

    def _fail(self, e: Exception, *, forever: bool) -> None:
        with self._qlock:
            if forever:
                self._invalid = e
            q, self._queue = self._queue, []
        for t, f in q:
            self._coll.stats.staged -= t.num_rows
            if not f.done():
                f.set_exception(e)


class CollectionManager:
    """The write tasks of one controller's managed collections (call it under the controller's lock)."""

    def __init__(self, ctl: Controller, desired_path: str | None):
        self.ctl = ctl
        self.desired = DesiredStore(desired_path)

    # ------------------------------------------------------------------ lifecycle

    def close(self, colls: Iterable[_Coll], *, flush: bool) -> None:
        """Flush queued appends (if `flush`), fail the appenders for good, release DuckDB."""
        colls = list(colls)
        if flush:
            for c in colls:
                if c.write.appender is not None and c.write.appender.pending():
                    try:
                        self.flush_appender(c.write.appender)
                    except Exception as e:  # noqa: BLE001 - closing: report, do not raise
                        log.warning("controller close: flushing %s failed: %s", c.name, e)
        for c in colls:
            if c.write.appender is not None:
                c.write.appender._fail(IdentifierInvalid(f"collection {c.name!r}: the controller was closed"), forever=True)
        self.desired.close()

    def fail_appenders(self, colls: Iterable[_Coll], e: Exception) -> None:
        for c in colls:
            if c.write.appender is not None:
                c.write.appender._fail(e, forever=True)

    def alter(self, c: _Coll, schema: pa.Schema) -> None:
        """`c`'s schema changes to `schema` (the caller updates `c.meta`)."""
        if self.desired.has(c.name):
            self.desired.alter(c.name, schema)
        c.write.writer = None  # reopened lazily under the new schema

    def on_dropped(self, c: _Coll) -> None:
        """`c` was dropped: fail its queued appends, release its differential hold and desired state."""
        e = IdentifierInvalid(f"collection {c.name!r} was dropped; its queued writes were not applied")
        w = c.write
        if w.appender is not None:
            w.appender._fail(e, forever=True)
        if self.desired.has(c.name):
            self.desired.unregister(c.name)
        w.kind = None

    def take_over(self, c: _Coll) -> None:
        """This controller just became the writer: new writer ids, and differential state re-synced."""
        c.write.writer = None
        if c.write.kind == "differential":
            self.resync(c, self.shard_upper(c))

    def next_flush(self, colls: Iterable[_Coll], due: float, batch: float) -> float:
        """The earliest of `due` and the monotonic times at which pending appenders must flush."""
        for c in colls:
            a = c.write.appender
            if a is not None and a.pending():
                due = min(due, a.last_flush + batch)
        return due

    def flush_due(self, colls: Iterable[_Coll], batch: float) -> None:
        for c in colls:
            a = c.write.appender
            if a is not None and a.pending() and time.monotonic() >= a.last_flush + batch:
                self.flush_appender(a)

    def tick(self, colls: Iterable[_Coll], system_failed: Callable[[_Coll, str, Exception], None]) -> None:
        """Flush or tick forward every appender, then write every user differential collection.

        A failure of a `system.*` appender goes to `system_failed` (introspection's tolerance);
        any other failure propagates. The `system.*` differential collections are the
        introspection's to write, after it refreshed them.
        """
        colls = list(colls)
        for c in colls:
            if c.write.appender is not None:
                try:
                    if c.write.appender.pending():
                        self.flush_appender(c.write.appender)
                    else:
                        self.tick_forward(c)
                except Exception as e:  # noqa: BLE001 - only system.*: see Introspection.failed
                    if not c.name.startswith(SYSTEM_PREFIX):
                        raise
                    system_failed(c, "writing it", e)
        for c in colls:
            if c.write.kind == "differential" and not c.name.startswith(SYSTEM_PREFIX):
                self.diff_commit(c)

    # ------------------------------------------------------------------ shared

    def admit(self, c: _Coll, kind: str) -> _Coll:
        """`c`, if the collection manager may write it as `kind` ("append", "differential" or "system")."""
        name = c.name
        if name.startswith(SYSTEM_PREFIX) and kind != "system":
            raise InvalidInput(f"collection {name!r} is written by the controller itself")
        if c.meta.data_source in ("ingestion", "table") and kind != "system":
            raise InvalidInput(
                f"collection {name!r} has data_source {c.meta.data_source!r}: it is written by "
                f"{'a flow' if c.meta.data_source == 'ingestion' else 'append_table'}, not the collection manager"
            )
        return c

    def writer(self, c: _Coll) -> WriteHandle:
        if c.write.writer is None:
            c.write.writer = self.ctl.client.open_writer(c.shard_id, writer_id=f"controller-e{self.ctl.epoch}")
        return c.write.writer

    def shard_upper(self, c: _Coll) -> Frontier:
        try:
            return self.ctl.client.machine(c.shard_id).fetch().upper
        except ShardNotFound:
            return Frontier.MIN

    def backoff(self, attempt: int) -> None:
        lo, hi = self.ctl.backoff_ms
        self.ctl._sleep(min(lo * 2**attempt, hi) / 1000.0)

    # ------------------------------------------------------------------ append-only

    def appender(self, c: _Coll) -> MonotonicAppender:
        if c.write.kind == "differential":
            raise InvalidInput(f"collection {c.name!r} is a differential collection, not append-only")
        if c.write.appender is None:
            c.write.appender = MonotonicAppender(self.ctl, c)
            c.write.kind = "append"
        return cast(MonotonicAppender, c.write.appender)  # the manager makes every appender, here

    def flush_appender(self, a: Appender) -> None:
        """Commit everything queued in `a` as one batch at `max(upper, now)` (under the lock)."""
        c = a._coll
        if not a.pending():
            return
        if self.ctl.read_only:
            a._fail(ReadOnly(f"collection {c.name!r}: the controller is read-only"), forever=False)
            return
        q = a._take()
        rows = pa.concat_tables([t for t, _ in q]) if len(q) > 1 else q[0][0]
        try:
            ts = self._append_at_now(c, rows)
        except Exception as e:
            for t, f in q:
                c.stats.staged -= t.num_rows
                f.set_exception(e)
            if isinstance(e, Fenced):
                self.ctl._fence(e)
            raise
        a.last_flush = time.monotonic()
        a.commits += 1
        for t, f in q:
            c.stats.staged -= t.num_rows
            f.set_result(ts)
        c.stats.committed += rows.num_rows

    def _append_at_now(self, c: _Coll, rows: pa.Table) -> int:
        w = self.writer(c)
        for attempt in range(20):
            self.ctl._check_epoch()
            upper = w.machine.fetch().upper
            if upper.is_empty:
                raise InvalidUppers(f"collection {c.name!r}: its shard is closed (upper is empty)")
            ts = max(upper.time or 0, self.ctl.clock())
            upd = at_time(rows, ts)
            try:
                w.compare_and_append(upd, upper, ts + 1)
            except UpperMismatch:
                self.backoff(attempt)
                continue
            self.ctl._advance(c, Frontier(ts + 1))
            return ts
        raise InvalidUppers(f"collection {c.name!r}: append lost 20 races in a row")

    def tick_forward(self, c: _Coll) -> None:
        """An idle append-only collection's upper moves to now, so it stays readable at recent times."""
        w = self.writer(c)
        upper = w.machine.fetch().upper
        now = self.ctl.clock()
        if upper.is_empty or not upper.less_than(now):
            return
        try:
            w.compare_and_append(update_schema(c.meta.schema).empty_table(), upper, now)
        except UpperMismatch:
            return  # someone else moved it; the next tick looks again
        self.ctl._advance(c, Frontier(now))

    # ------------------------------------------------------------------ differential

    def register_differential(self, c: _Coll, *, init_from_persisted: bool) -> None:
        if c.write.kind == "differential":
            return
        if c.write.kind == "append":
            raise InvalidInput(f"collection {c.name!r} is append-only, not a differential collection")
        self.desired.register(c.name, c.meta.schema)
        c.write.kind = "differential"
        # A re-sync reads at persisted upper - 1: readable, as no implied capability passes
        # upper - 1 (`holds.policy_at`), whichever process applies the policy.
        if init_from_persisted:
            upper = self.shard_upper(c)
            self.resync(c, upper)
            self.desired.desired_is_persisted(c.name)
        elif not self.ctl.read_only:
            self.resync(c, self.shard_upper(c))

    def apply_op(self, c: _Coll, op: Append | Delete | Replace) -> None:
        where = f"collection {c.name!r}"
        if isinstance(op, Append):
            rows = as_rows(op.rows, c.meta.schema, where)
            self.desired.append(c.name, rows)
            c.stats.staged += rows.num_rows
        elif isinstance(op, Delete):
            self.desired.delete(c.name, op.filter)
        elif isinstance(op, Replace):
            self.desired.replace(c.name, as_rows(op.rows, c.meta.schema, where))
        else:
            raise InvalidInput(f"{where}: differential_write takes Append, Delete or Replace, got {type(op).__name__}")

    def resync(self, c: _Coll, upper: Frontier) -> None:
        """persisted := the shard's contents at `upper - 1`."""
        if upper.is_empty:
            raise InvalidUppers(f"collection {c.name!r}: its shard is closed (upper is empty); it cannot be written")
        if upper.time == 0:
            snap = rows_schema(c.meta.schema).empty_table()
        else:
            assert upper.time is not None
            snap = raw_snapshot(self.ctl.client, c.shard_id, c.name, upper.time - 1)
        self.desired.set_persisted(c.name, snap.cast(rows_schema(c.meta.schema)))
        c.write.persisted_upper = upper
        self.ctl._advance(c, upper)

    def diff_commit(self, c: _Coll) -> Frontier:
        """Write `desired - persisted` at the persisted upper, advancing it to at least now."""
        ctl, w = self.ctl, c.write
        for attempt in range(ctl.max_write_retries + 1):
            ctl._check_epoch()
            if w.persisted_upper is None or c.read.write_frontier > w.persisted_upper:
                # Someone else wrote (we saw the upper move): what we believe is stale.
                self.resync(c, self.shard_upper(c))
            upper = w.persisted_upper
            assert upper is not None and upper.time is not None
            corr = self.desired.corrections(c.name)
            new_upper = max(upper.time + 1 if corr.num_rows else upper.time, ctl.clock())
            if new_upper == upper.time:
                return upper
            try:
                self.writer(c).compare_and_append(at_time(corr, upper.time), upper, new_upper)
            except UpperMismatch as e:
                log.info("collection %s: lost the race at upper %s (now %s); re-syncing", c.name, upper, e.current)
                self.resync(c, e.current)
                if attempt:
                    self.backoff(attempt - 1)
                continue
            self.desired.persisted_is_desired(c.name)
            w.persisted_upper = Frontier(new_upper)
            c.stats.committed += corr.num_rows
            c.stats.staged = 0
            ctl._advance(c, w.persisted_upper)
            return w.persisted_upper
        raise InvalidUppers(
            f"collection {c.name!r}: lost the race for the upper {ctl.max_write_retries + 1} times "
            f"(last seen {w.persisted_upper}); the write was not applied"
        )


def raw_snapshot(client: Client, shard_id: str, name: str, as_of: int) -> pa.Table:
    """Collection `name`'s contents (row columns + `_diff`) at `as_of`, without registering a reader
    (so read-only controllers write nothing).

    SUBTLE: without a leased reader nothing pins the parts; a compaction plus
    gc may delete one mid-read. That surfaces as CorruptPart (never a wrong
    answer), and a fresh state names the merged parts, so retry.
    """
    m = client.machine(shard_id)
    for attempt in range(5):
        s = m.fetch()
        if not s.since.less_equal(as_of):
            raise ReadBeforeSince(f"collection {name!r}: as_of {as_of} is before since {s.since}")
        try:
            return read_snapshot(client, s, as_of, what=f"collection {name!r}")
        except CorruptPart:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def at_time(rows: pa.Table, t: int) -> pa.Table:
    """Rows (row columns + `_diff`) as updates at time `t`."""
    diff = rows.column(DIFF)
    out = rows.drop_columns([DIFF])
    out = out.append_column(pa.field(TIME, pa.int64(), nullable=False), pa.repeat(pa.scalar(t, pa.int64()), rows.num_rows))
    return out.append_column(pa.field(DIFF, pa.int64(), nullable=False), diff)

"""The storage controller: names to shards, read policies and holds, managed collections, fencing.

See `storage.controller` for the overview. Concurrency: one re-entrant lock
guards all in-memory state and serialises the controller's own writes; a
background thread ticks and flushes appenders under that lock.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import duckdb
import pyarrow as pa

from .. import state as st
from ..client import Client, SinceHandle
from ..consensus import CasOp, VersionedData
from ..errors import (
    ConsensusUnavailable,
    CorruptPart,
    Fenced,
    IdentifierInvalid,
    IdentifierMissing,
    InvalidInput,
    InvalidUppers,
    InvariantViolated,
    OutOfSpace,
    ReadBeforeSince,
    ReadOnly,
    ShardNotFound,
    UpperMismatch,
)
from ..frontier import Frontier
from ..ids import ShardId
from ..read import parts_source, snapshot_schema, snapshot_sql
from ..updates import DIFF, TIME, overflow_checked, qident
from ..write import WriteHandle
from . import introspection as sysc
from .catalog import (
    CATALOG_KEY,
    DATA_SOURCES,
    SYSTEM_PREFIX,
    CatalogState,
    CatalogStore,
    CollectionDesc,
    CollectionMeta,
    check_alter,
    plan_alter,
    plan_create,
    plan_drop,
    plan_finalized,
    plan_set_policies,
    validate_name,
)
from .desired import DesiredStore, as_rows, rows_schema
from .policy import (
    DEFAULT_POLICY,
    MutableAntichain,
    ReadPolicy,
    ValidFrom,
    coerce_policy,
    policy_to_json,
)
from .tables import TableWrite, append_tables

log = logging.getLogger("storage.controller")

# The system.* shards whose failure this process already reported (`_introspection_failed`):
# one warning line per broken collection per process, however many controllers it opens.
_INTRO_WARNED: set[str] = set()
_INTRO_WARNED_LOCK = threading.Lock()

CRITICAL_READER_ID = "controller"
CRASH_ENV = "SHARDFLOW_CONTROLLER_CRASH_AT"


def _crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named step if `$SHARDFLOW_CONTROLLER_CRASH_AT` says so."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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


@dataclass(eq=False)
class _Coll:
    """In-memory state of one collection (live or dropped-but-not-finalized)."""

    meta: CollectionMeta
    policy: ReadPolicy
    write_frontier: Frontier = Frontier.MIN
    implied: Frontier = Frontier.MIN
    since: Frontier = Frontier.MIN
    caps: MutableAntichain = field(default_factory=MutableAntichain)
    handle: SinceHandle | None = None
    writer: WriteHandle | None = None
    input_holds: dict[str, Frontier] = field(default_factory=dict)
    inputs: dict[str, _Coll] = field(default_factory=dict)
    dropped: bool = False
    kind: str | None = None  # None, "append" or "differential"
    appender: MonotonicAppender | None = None
    persisted_upper: Frontier | None = None  # differential: the upper `persisted` is valid at
    diff_hold: ReadHold | None = None
    staged: int = 0
    committed: int = 0
    compacted_since: Frontier = Frontier.MIN
    last_compact: float = 0.0

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def shard_id(self) -> str:
        return self.meta.shard_id


class ReadHold:
    """A read capability at `time` on one collection: its since does not pass `time` while held.

    Release it (or leave the `with` block) when done; `downgrade(t)` moves it
    forward. Releasing twice is a no-op. A hold outlives a drop: the shard is
    finalized only once every hold is released.

    Example:
        >>> with ctl.acquire_read_holds(["orders"])[0] as h:   # doctest: +SKIP
        ...     snapshot_at(h.time)
    """

    def __init__(self, ctl: StorageController, coll: _Coll, time: Frontier):
        self._ctl = ctl
        self._coll = coll
        self._time = time
        self._released = False

    @property
    def name(self) -> str:
        return self._coll.name

    @property
    def time(self) -> Frontier:
        return self._time

    @property
    def released(self) -> bool:
        return self._released

    def downgrade(self, t: Frontier | int | None) -> None:
        """Move the hold forward to `t` (an empty frontier releases it). Moving back raises InvalidInput."""
        self._ctl._downgrade_hold(self, Frontier.of(t))

    def release(self) -> None:
        self._ctl._downgrade_hold(self, Frontier.EMPTY)

    def __enter__(self) -> ReadHold:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else f"at {self._time}"
        return f"ReadHold({self.name!r}, {state})"


class MonotonicAppender:
    """Blind appends to an append-only collection, batched: one commit per batch duration.

    `append(rows)` queues `rows` (row columns, optional `_diff`); all rows queued
    within one batch duration commit together at `max(upper, now)`. With
    `wait=True` (the default) it returns once they are durable, with the time
    they were written at; with `wait=False` it returns a `Future` of that time.
    Without a background thread (`tick_interval_ms=None`), `wait=True` commits
    at once, and `wait=False` rows wait for `flush()` or `ctl.tick()`.
    """

    def __init__(self, ctl: StorageController, coll: _Coll):
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
            self._coll.staged += t.num_rows
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
            self._ctl._flush_appender(self)

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
            self._coll.staged -= t.num_rows
            if not f.done():
                f.set_exception(e)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Public entry points: refuse once fenced, and notice a fence raised inside."""

    def wrapper(self: StorageController, *args: Any, **kwargs: Any) -> Any:
        self._check_live()
        try:
            return fn(self, *args, **kwargs)
        except Fenced as e:
            self._fence(e)
            raise

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class StorageController:
    """Collections by name over shards, with read policies, read holds and managed collections.

    Open it with `StorageController.open(client)`; see the package docstring.
    """

    def __init__(
        self,
        client: Client,
        *,
        read_only: bool,
        clock: Callable[[], int],
        tick_interval_ms: int | None,
        batch_duration_ms: int,
        desired_path: str | None,
        status_keep_last: int,
        max_write_retries: int,
        backoff_ms: tuple[int, int],
        compact: bool,
        compact_interval_ms: int,
        on_fenced: Callable[[Fenced], None] | None,
        sleep: Callable[[float], None],
    ):
        self.client = client
        self.clock = clock
        self._fence_on_open = True  # open(fence=False) joins the current epoch instead
        self.read_only = read_only
        self.tick_interval_ms = tick_interval_ms
        self.batch_duration_ms = batch_duration_ms
        self.status_keep_last = status_keep_last
        self.max_write_retries = max_write_retries
        self.backoff_ms = backoff_ms
        self.compact_enabled = compact
        self.compact_interval_ms = compact_interval_ms
        self.on_fenced = on_fenced
        self._sleep = sleep
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fenced: Fenced | None = None
        self._closed = False
        self._catalog = CatalogStore(client.consensus)
        self._colls: dict[str, _Coll] = {}
        self._dropped: dict[str, _Coll] = {}  # shard id -> dropped collection awaiting finalization
        self._seen_seqno = -1
        self._desired = DesiredStore(desired_path)
        self._last_status: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.epoch = 0
        self.ticks = 0

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        client: Client,
        *,
        read_only: bool = False,
        clock: Callable[[], int] | None = None,
        tick_interval_ms: int | None = 1000,
        batch_duration_ms: int = 100,
        desired_path: str | None = None,
        status_keep_last: int = 100,
        max_write_retries: int = 5,
        backoff_ms: tuple[int, int] = (10, 500),
        compact: bool = True,
        compact_interval_ms: int = 10_000,
        on_fenced: Callable[[Fenced], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        fence: bool = True,
    ) -> StorageController:
        """Open the controller over `client`'s shards.

        A writable controller (the default) takes over: it bumps the catalog
        epoch, which fences any previous writer, takes over every collection's
        critical since handle, finalizes the shards a crash left in
        `unfinalized_shards`, and creates the `system.*` introspection
        collections. A `read_only=True` controller writes nothing anywhere until
        `allow_writes()`.

        With `fence=False` a writable controller *joins* the current epoch
        instead of bumping it: several processes (jobs, a webhook server) then
        write the catalog side by side, every change still validated and CAS'd,
        and none fences the others. A later take-over (`fence=True`, or
        `allow_writes()` of a read-only controller) fences all of them at once.

        Args:
            client: `storage.open(root)`.
            clock: milliseconds since the epoch (default: the client's clock);
                managed collections write at this time.
            tick_interval_ms: how often the background thread ticks idle uppers
                forward and refreshes introspection; None: no background thread
                (call `tick()` yourself; tests do).
            batch_duration_ms: append-only collections commit at most once per this.
            desired_path: the DuckDB file for differential collections' desired
                state (default: a temporary directory, removed on close).
            status_keep_last: rows kept per object in the status histories at start-up.
            max_write_retries: differential writes re-sync and retry this often
                after a lost race, with exponential backoff in `backoff_ms`
                (first, cap), then raise InvalidUppers.
            compact: run `client.compact(shard)` after since advanced (when available).
            on_fenced: called (from whichever thread noticed) once a newer
                controller fenced this one; e.g. to stop the process.
        """
        ctl = cls(
            client,
            read_only=read_only,
            clock=clock or client.clock,
            tick_interval_ms=tick_interval_ms,
            batch_duration_ms=batch_duration_ms,
            desired_path=desired_path,
            status_keep_last=status_keep_last,
            max_write_retries=max_write_retries,
            backoff_ms=backoff_ms,
            compact=compact,
            compact_interval_ms=compact_interval_ms,
            on_fenced=on_fenced,
            sleep=sleep,
        )
        ctl._fence_on_open = fence
        try:
            ctl._start()
        except BaseException:
            ctl._desired.close()
            raise
        return ctl

    def _start(self) -> None:
        with self._lock:
            if self.read_only:
                cat = self._catalog.head()
            elif self._fence_on_open:
                cat = self._catalog.bump_epoch()
            else:
                cat = self._catalog.join_epoch()
            self.epoch = cat.epoch
            self._sync_catalog(cat)
            if not self.read_only:
                self._finalize_unfinalized(cat.unfinalized_shards)
            self._setup_introspection()
        if self.tick_interval_ms is not None:
            self._thread = threading.Thread(target=self._run, name="storage-controller", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background thread, flush queued appends (when writable), release DuckDB. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            if not self.read_only and self._fenced is None:
                for c in list(self._colls.values()):
                    if c.appender is not None and c.appender.pending():
                        try:
                            self._flush_appender(c.appender)
                        except Exception as e:  # noqa: BLE001 - closing: report, do not raise
                            log.warning("controller close: flushing %s failed: %s", c.name, e)
            for c in self._colls.values():
                if c.appender is not None:
                    c.appender._fail(IdentifierInvalid(f"collection {c.name!r}: the controller was closed"), forever=True)
            self._closed = True
            self._desired.close()

    def __enter__(self) -> StorageController:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def fenced(self) -> bool:
        return self._fenced is not None

    def _check_live(self) -> None:
        if self._fenced is not None:
            raise Fenced(str(self._fenced))
        if self._closed:
            raise InvalidInput("the storage controller is closed")

    def _fence(self, e: Fenced) -> None:
        """A newer controller took over: stop writing, fail queued work, tell the owner."""
        with self._lock:
            if self._fenced is not None:
                return
            self._fenced = e
        log.warning("storage controller epoch %s fenced: %s", self.epoch, e)
        self._stop.set()
        self._wake.set()
        for c in list(self._colls.values()):
            if c.appender is not None:
                c.appender._fail(e, forever=True)
        if self.on_fenced is not None:
            self.on_fenced(e)

    def _check_epoch(self) -> None:
        """Before any write: refuse if a newer epoch took over the catalog."""
        self._catalog.check_epoch(self.epoch)

    def _epoch_fence_op(self) -> CasOp:
        """Check the epoch and return a CAS that rewrites the catalog at the version checked.

        In the same transaction as a data write, it makes the write fail if anyone took
        over (or otherwise changed the catalog) after the check: exact fencing.
        """
        cat = self._catalog.check_epoch(self.epoch)
        nxt = replace(cat, seqno=cat.seqno + 1)
        return CasOp(CATALOG_KEY, cat.seqno, VersionedData(nxt.seqno, nxt.encode()))

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly("the storage controller is read-only; call allow_writes() to take over")

    # ------------------------------------------------------------------ catalog sync

    def _sync_catalog(self, cat: CatalogState | None = None) -> None:
        """Bring in-memory collections in line with the catalog (others' creates, drops, alters)."""
        cat = cat if cat is not None else self._catalog.head()
        if cat.seqno == self._seen_seqno:
            return
        if cat.epoch > self.epoch and not self.read_only:
            raise Fenced(f"catalog: controller epoch {self.epoch} was fenced by epoch {cat.epoch}")
        for name in [n for n in self._colls if n not in cat.collections]:
            self._on_dropped(self._colls.pop(name))
        pending = [m for n, m in cat.collections.items() if n not in self._colls]
        while pending:
            ready = [m for m in pending if all(d in self._colls for d in m.depends_on)]
            if not ready:  # INVARIANT: the catalog has no dependency cycles (create validates)
                raise InvalidInput(f"catalog: unresolvable dependencies among {[m.name for m in pending]}")
            for m in ready:
                self._setup(m)
            pending = [m for m in pending if m.name not in self._colls]
        for name, m in cat.collections.items():
            c = self._colls[name]
            if not c.meta.schema.equals(m.schema):
                self._apply_schema(c, m.schema)
            if policy_to_json(c.meta.read_policy) != policy_to_json(m.read_policy):
                # Someone (or this controller) stored another policy.
                c.policy = m.read_policy or DEFAULT_POLICY
                c.meta = m
                self._refresh_implied(c)
            c.meta = m
        self._seen_seqno = cat.seqno

    def _setup(self, meta: CollectionMeta) -> _Coll:
        """Bring up one collection: its shard, critical since handle, frontiers and input holds."""
        c = _Coll(meta=meta, policy=meta.read_policy or DEFAULT_POLICY)
        m = self.client.machine(meta.shard_id)
        s: st.ShardState | None
        try:
            s = m.fetch()
        except ShardNotFound:
            s = None
        if s is None and not self.read_only:
            s = m.fetch_or_init(meta.schema)
        if s is not None and not s.schema.equals(meta.schema) and not self.read_only:
            # An alter whose shard step did not happen (crash): the catalog is the truth.
            check_alter(meta.name, s.schema, meta.schema)
            s, _ = m.apply(st.set_schema, meta.schema)
        shard_since = s.since if s is not None else Frontier.MIN
        if s is not None and not self.read_only and not s.is_tombstone:
            c.handle = self._take_over_since(meta.shard_id)
            shard_since = max(shard_since, c.handle.since)
        c.write_frontier = s.upper if s is not None else Frontier.MIN
        c.implied = max(c.policy.frontier(c.write_frontier), shard_since)
        c.caps.update(c.implied, +1)
        c.since = c.caps.frontier()
        for dep in meta.depends_on:
            ic = self._colls[dep]
            t = max(c.since, ic.since)
            ic.caps.update(t, +1)
            c.input_holds[dep] = t
            c.inputs[dep] = ic
        self._colls[meta.name] = c
        self._push_since(c)
        return c

    def _take_over_since(self, shard: str) -> SinceHandle:
        """Open the shard's critical since handle and move its opaque to our epoch (the fence)."""
        h = self.client.open_critical_since(shard, CRITICAL_READER_ID, opaque=self.epoch)
        for _ in range(1000):
            r = self.client.state(shard).critical_readers.get(CRITICAL_READER_ID)
            assert r is not None  # INVARIANT: just registered, and only finalization removes it
            if r.opaque == self.epoch:
                h.opaque = self.epoch
                h._since = r.since
                return h
            if isinstance(r.opaque, int) and r.opaque > self.epoch:
                raise Fenced(f"shard {shard}: critical since is held by epoch {r.opaque}, this controller is epoch {self.epoch}")
            try:
                res = h.compare_and_downgrade_since(r.opaque, (self.epoch, r.since))
            except Fenced:
                continue
            if not isinstance(res, st.OpaqueMismatch):
                return h
        raise Fenced(f"shard {shard}: could not take over the critical since handle")

    def _apply_schema(self, c: _Coll, schema: pa.Schema) -> None:
        if self._desired.has(c.name):
            self._desired.alter(c.name, schema)
        c.meta = replace(c.meta, schema=schema)
        if c.writer is not None:
            c.writer = None  # reopened lazily under the new schema

    # ------------------------------------------------------------------ collections

    @_guarded
    def create_collections(self, descs: Sequence[CollectionDesc]) -> None:
        """Create collections; re-creating an identical description is a no-op.

        All descriptions are validated before anything changes. The read policy
        of a re-created collection is left as it is (change it with
        `set_read_policy`).

        Raises:
            InvalidInput: a bad name, schema or data_source.
            SourceIdReused: one name with two descriptions, or an existing name
                with another schema, data_source or depends_on.
            IdentifierMissing: a `depends_on` names an unknown collection.
            ReadOnly: something would be created by a read-only controller.
        """
        self._create(descs, system=False)

    def _create(self, descs: Sequence[CollectionDesc], *, system: bool) -> None:
        descs = list(descs)
        for d in descs:
            if not isinstance(d, CollectionDesc):
                raise InvalidInput(f"create_collections: expected CollectionDesc, got {type(d).__name__}")
            validate_name(d.name, allow_system=system)
            if not system and d.name.startswith(SYSTEM_PREFIX):
                raise InvalidInput(f"collection name {d.name!r} is reserved for the controller")
            if d.data_source not in DATA_SOURCES:
                raise InvalidInput(f"collection {d.name!r}: data_source {d.data_source!r} is not one of {list(DATA_SOURCES)}")
            from ..updates import check_row_schema

            check_row_schema(d.schema, f"collection {d.name!r}")
            for dep in d.depends_on:
                validate_name(dep, allow_system=True)
        with self._lock:
            self._sync_catalog()
            # Validate against the current catalog before any write (plan_create raises).
            cat = self._catalog.head()
            _, new = plan_create(cat, descs, ShardId.new)
            if not new:
                return
            self._writable()
            cat, _ = self._catalog.apply(self.epoch, lambda s: plan_create(s, descs, ShardId.new))
            self._sync_catalog(cat)

    @_guarded
    def drop_collections(self, names: Sequence[str]) -> None:
        """Drop collections: their read policy becomes `ValidFrom(empty)`, and each shard is
        finalized once every read hold on it is released.

        The catalog records the shards in `unfinalized_shards` in the same CAS that
        removes the collections, so a crash before finalization resumes at the next open.
        Queued appends to a dropped collection fail with IdentifierInvalid.

        Raises:
            IdentifierMissing: an unknown name (nothing is dropped).
            InvalidInput: a remaining collection depends on one being dropped.
            ReadOnly: the controller is read-only.
        """
        names = list(names)
        for n in names:
            validate_name(n, allow_system=True)
            if n.startswith(SYSTEM_PREFIX):
                raise InvalidInput(f"collection {n!r} belongs to the controller and cannot be dropped")
        with self._lock:
            self._sync_catalog()
            plan_drop(self._catalog.head(), names)  # validate first (raises)
            self._writable()
            cat, _ = self._catalog.apply(self.epoch, lambda s: plan_drop(s, names))
            _crash_point("drop_recorded")
            self._sync_catalog(cat)

    def _on_dropped(self, c: _Coll) -> None:
        """The catalog no longer has `c`: unregister it and release everything it holds."""
        c.dropped = True
        e = IdentifierInvalid(f"collection {c.name!r} was dropped; its queued writes were not applied")
        if c.appender is not None:
            c.appender._fail(e, forever=True)
        if c.diff_hold is not None:
            c.diff_hold._released = True
            c.caps.update(c.diff_hold.time, -1)
            c.diff_hold = None
        if self._desired.has(c.name):
            self._desired.unregister(c.name)
        c.kind = None
        self._dropped[c.shard_id] = c
        c.policy = ValidFrom(Frontier.EMPTY)
        self._refresh_implied(c)
        if c.since.is_empty and c.shard_id in self._dropped:
            self._finalize(c)  # since was empty already (so it did not change): finalize now

    def _finalize_unfinalized(self, shards: Iterable[str]) -> None:
        """Finalize dropped shards with no holds left (all of them, after a restart)."""
        todo = [s for s in shards if s not in self._dropped]
        for shard in todo:
            self._finalize_shard(shard)
        if todo:
            self._catalog.apply(self.epoch, lambda s: (plan_finalized(s, todo), None))
        for c in list(self._dropped.values()):
            if c.since.is_empty:
                self._finalize(c)

    def _finalize(self, c: _Coll) -> None:
        if self.read_only or self._fenced is not None:
            return  # the writer finalizes (after allow_writes(), this one)
        self._check_epoch()
        self._finalize_shard(c.shard_id)
        self._catalog.apply(self.epoch, lambda s: (plan_finalized(s, [c.shard_id]), None))
        self._dropped.pop(c.shard_id, None)

    def _finalize_shard(self, shard: str) -> None:
        try:
            self.client.finalize(shard)
            return
        except ShardNotFound:
            return  # never initialized: nothing to finalize
        except ModuleNotFoundError as e:
            if e.name not in ("storage.gc", "gc"):
                raise
        # storage.gc is not there (yet): the three pure steps; gc deletes the parts later.
        m = self.client.machine(shard)
        try:
            m.apply(st.finalize_upper, writer_id=CRITICAL_READER_ID)
            m.apply(st.finalize_since)
            m.apply(st.finalize_batches)
        except ShardNotFound:
            return

    @_guarded
    def alter_collection(self, name: str, schema: pa.Schema) -> None:
        """Change a collection's schema: only nullable columns may be added at the end.

        Raises:
            IdentifierMissing: unknown name.
            AlterError: anything but added nullable columns.
            ReadOnly: the controller is read-only.
        """
        validate_name(name)
        with self._lock:
            self._sync_catalog()
            new = plan_alter(self._catalog.head(), name, schema)  # validate first (raises)
            if new is None:
                return
            self._writable()
            cat, _ = self._catalog.apply(self.epoch, lambda s: (plan_alter(s, name, schema), None))
            c = self._colls[name]
            m = self.client.machine(c.shard_id)
            m.apply(st.set_schema, schema)
            self._sync_catalog(cat)

    @_guarded
    def collection(self, name: str) -> CollectionMeta:
        """The collection `name`, with its effective read policy.

        Raises:
            IdentifierMissing: no such collection.
        """
        with self._lock:
            self._sync_catalog()
            c = self._get(name)
            return replace(c.meta, read_policy=c.policy)

    @_guarded
    def collections(self) -> dict[str, CollectionMeta]:
        """Every user collection (not the `system.*` ones; see `introspection_shards`)."""
        with self._lock:
            self._sync_catalog()
            return {
                n: replace(c.meta, read_policy=c.policy)
                for n, c in sorted(self._colls.items())
                if not n.startswith(SYSTEM_PREFIX)
            }

    @_guarded
    def introspection_shards(self) -> dict[str, str]:
        """`{"system.frontiers": shard_id, ...}` for the introspection collections that exist."""
        with self._lock:
            self._sync_catalog()
            return {n: c.shard_id for n, c in sorted(self._colls.items()) if n.startswith(SYSTEM_PREFIX)}

    def _get(self, name: str) -> _Coll:
        c = self._colls.get(name)
        if c is None:
            validate_name(name, allow_system=True)
            raise IdentifierMissing(f"collection {name!r} does not exist")
        return c

    # ------------------------------------------------------------------ frontiers, policies, holds

    @_guarded
    def frontiers(self, name: str) -> tuple[Frontier, Frontier]:
        """`(read_frontier, write_frontier)`: the collection's since and its shard's current upper."""
        with self._lock:
            self._sync_catalog()
            c = self._get(name)
            self._refresh_upper(c)
            return c.since, c.write_frontier

    def implied_capability(self, name: str) -> Frontier:
        with self._lock:
            return self._get(name).implied

    @_guarded
    def set_read_policy(self, policies: Mapping[str, ReadPolicy] | Iterable[tuple[str, ReadPolicy]]) -> None:
        """Set read policies; the implied capability never moves back.

        Storable policies are recorded in the catalog; a `LagWriteFrontier` with an
        arbitrary function lives in memory only. A read-only controller changes
        only its in-memory view.
        """
        items = list(policies.items() if isinstance(policies, Mapping) else policies)
        ps: dict[str, ReadPolicy] = {}
        for n, p in items:
            validate_name(n, allow_system=True)
            ps[n] = coerce_policy(p)
        with self._lock:
            self._sync_catalog()
            for n in ps:
                self._get(n)
            if not self.read_only:
                cat, _ = self._catalog.apply(self.epoch, lambda s: (plan_set_policies(s, ps), None))
                self._sync_catalog(cat)
            for n, p in ps.items():
                c = self._colls[n]
                c.policy = p
                if self.read_only:
                    c.meta = replace(c.meta, read_policy=p if p.to_json() is not None else c.meta.read_policy)
                self._refresh_upper(c)

    @_guarded
    def acquire_read_holds(self, names: Sequence[str]) -> list[ReadHold]:
        """One hold per name (a repeated name gets several), each at the collection's current since.

        Raises:
            IdentifierMissing: an unknown name (no hold is taken).
        """
        with self._lock:
            self._sync_catalog()
            colls = [self._get(n) for n in names]
            holds = []
            for c in colls:
                c.caps.update(c.since, +1)
                holds.append(ReadHold(self, c, c.since))
            return holds

    def _downgrade_hold(self, h: ReadHold, t: Frontier) -> None:
        with self._lock:
            if h._released:
                return
            if t < h._time:
                raise InvalidInput(f"read hold on {h.name!r}: cannot move back from {h._time} to {t}")
            if t == h._time:
                return
            c = h._coll
            c.caps.update(h._time, -1)
            c.caps.update(t, +1)
            h._time = t
            if t.is_empty:
                h._released = True
            try:
                self._since_changed(c)
            except Fenced as e:
                self._fence(e)

    def _refresh_upper(self, c: _Coll) -> None:
        try:
            s = self.client.machine(c.shard_id).fetch()
        except ShardNotFound:
            return
        if s.upper > c.write_frontier:
            c.write_frontier = s.upper
        self._refresh_implied(c)

    def _refresh_implied(self, c: _Coll) -> None:
        new = c.policy.frontier(c.write_frontier)
        if new > c.implied:  # INVARIANT: the implied capability never moves back
            c.caps.update(c.implied, -1)
            c.caps.update(new, +1)
            c.implied = new
        self._since_changed(c)

    def _since_changed(self, c: _Coll) -> None:
        """Recompute since from the read capabilities; pass it to inputs and the shard."""
        new = c.caps.frontier()
        if new == c.since:
            return
        # INVARIANT: since only moves forward: every capability added is at or beyond it.
        if not new > c.since:
            raise InvariantViolated(f"collection {c.name!r}: since would move back from {c.since} to {new}")
        c.since = new
        for dep, held in list(c.input_holds.items()):
            ic = c.inputs[dep]
            t = max(held, new)
            if t != held:
                ic.caps.update(held, -1)
                ic.caps.update(t, +1)
                c.input_holds[dep] = t
                self._since_changed(ic)
        if c.dropped and new.is_empty:
            self._finalize(c)
        else:
            self._push_since(c)

    def _push_since(self, c: _Coll) -> None:
        """Send since to the shard's critical since handle (writable controllers only)."""
        if self.read_only or self._fenced is not None or c.handle is None or c.since.is_empty:
            return
        if c.since <= c.handle.since:
            return
        res = c.handle.compare_and_downgrade_since(self.epoch, (self.epoch, c.since))
        if isinstance(res, st.OpaqueMismatch):
            raise Fenced(f"shard {c.shard_id}: critical since taken over by {res.actual!r} (this controller: epoch {self.epoch})")

    # ------------------------------------------------------------------ collection manager

    def _managed(self, name: str, kind: str) -> _Coll:
        c = self._get(name)
        if name.startswith(SYSTEM_PREFIX) and kind != "system":
            raise InvalidInput(f"collection {name!r} is written by the controller itself")
        if c.meta.data_source in ("ingestion", "table") and kind != "system":
            raise InvalidInput(
                f"collection {name!r} has data_source {c.meta.data_source!r}: it is written by "
                f"{'a flow' if c.meta.data_source == 'ingestion' else 'append_table'}, not the collection manager"
            )
        return c

    @_guarded
    def monotonic_appender(self, name: str) -> MonotonicAppender:
        """The appender of append-only collection `name` (the same object on every call)."""
        with self._lock:
            self._sync_catalog()
            return self._appender(self._managed(name, "append"))

    def _appender(self, c: _Coll) -> MonotonicAppender:
        if c.kind == "differential":
            raise InvalidInput(f"collection {c.name!r} is a differential collection, not append-only")
        if c.appender is None:
            c.appender = MonotonicAppender(self, c)
            c.kind = "append"
        return c.appender

    def _writer(self, c: _Coll) -> WriteHandle:
        if c.writer is None:
            c.writer = self.client.open_writer(c.shard_id, writer_id=f"controller-e{self.epoch}")
        return c.writer

    def _flush_appender(self, a: MonotonicAppender) -> None:
        """Commit everything queued in `a` as one batch at `max(upper, now)` (under the lock)."""
        c = a._coll
        if not a.pending():
            return
        if self.read_only:
            a._fail(ReadOnly(f"collection {c.name!r}: the controller is read-only"), forever=False)
            return
        q = a._take()
        rows = pa.concat_tables([t for t, _ in q]) if len(q) > 1 else q[0][0]
        try:
            ts = self._append_at_now(c, rows)
        except Exception as e:
            for t, f in q:
                c.staged -= t.num_rows
                f.set_exception(e)
            if isinstance(e, Fenced):
                self._fence(e)
            raise
        a.last_flush = time.monotonic()
        a.commits += 1
        for t, f in q:
            c.staged -= t.num_rows
            f.set_result(ts)
        c.committed += rows.num_rows

    def _append_at_now(self, c: _Coll, rows: pa.Table) -> int:
        w = self._writer(c)
        for attempt in range(20):
            self._check_epoch()
            upper = w.machine.fetch().upper
            if upper.is_empty:
                raise InvalidUppers(f"collection {c.name!r}: its shard is closed (upper is empty)")
            ts = max(upper.time or 0, self.clock())
            upd = _at_time(rows, ts)
            try:
                w.compare_and_append(upd, upper, ts + 1)
            except UpperMismatch:
                self._backoff(attempt)
                continue
            self._advance(c, Frontier(ts + 1))
            return ts
        raise InvalidUppers(f"collection {c.name!r}: append lost 20 races in a row")

    def _advance(self, c: _Coll, upper: Frontier) -> None:
        if upper > c.write_frontier:
            c.write_frontier = upper
        self._refresh_implied(c)

    def _backoff(self, attempt: int) -> None:
        lo, hi = self.backoff_ms
        self._sleep(min(lo * 2**attempt, hi) / 1000.0)

    @_guarded
    def differential_write(self, name: str, op: Append | Delete | Replace) -> Frontier | None:
        """Change the desired contents of differential collection `name`, then write
        `desired - persisted` at the shard's current upper.

        The first call registers the collection; its desired starts as the persisted
        contents. A read-only controller only updates desired (returns None); the
        corrections are written once it is allowed to write.

        Returns:
            the collection's upper after the write.

        Raises:
            InvalidUppers: lost the race for the upper `max_write_retries + 1` times
                (each time after re-syncing persisted from a snapshot at upper - 1).
            InvalidInput: a bad Delete filter, or the collection is written elsewhere.
        """
        with self._lock:
            self._sync_catalog()
            c = self._managed(name, "differential")
            self._register_differential(c, init_from_persisted=True)
            self._apply_op(c, op)
            if self.read_only:
                return None
            return self._diff_commit(c)

    def _apply_op(self, c: _Coll, op: Append | Delete | Replace) -> None:
        where = f"collection {c.name!r}"
        if isinstance(op, Append):
            rows = as_rows(op.rows, c.meta.schema, where)
            self._desired.append(c.name, rows)
            c.staged += rows.num_rows
        elif isinstance(op, Delete):
            self._desired.delete(c.name, op.filter)
        elif isinstance(op, Replace):
            self._desired.replace(c.name, as_rows(op.rows, c.meta.schema, where))
        else:
            raise InvalidInput(f"{where}: differential_write takes Append, Delete or Replace, got {type(op).__name__}")

    def desired(self, name: str) -> pa.Table:
        """The consolidated desired contents of a differential collection (row columns + `_diff`)."""
        with self._lock:
            c = self._get(name)
            if c.kind != "differential":
                raise InvalidInput(f"collection {name!r} is not a differential collection")
            return self._desired.desired(name)

    def _register_differential(self, c: _Coll, *, init_from_persisted: bool) -> None:
        if c.kind == "differential":
            return
        if c.kind == "append":
            raise InvalidInput(f"collection {c.name!r} is append-only, not a differential collection")
        self._desired.register(c.name, c.meta.schema)
        c.kind = "differential"
        # Keep a hold at persisted upper - 1, so a re-sync can always read it.
        c.caps.update(c.since, +1)
        c.diff_hold = ReadHold(self, c, c.since)
        if init_from_persisted:
            upper = self._shard_upper(c)
            self._resync(c, upper)
            self._desired.desired_is_persisted(c.name)
        elif not self.read_only:
            self._resync(c, self._shard_upper(c))

    def _shard_upper(self, c: _Coll) -> Frontier:
        try:
            return self.client.machine(c.shard_id).fetch().upper
        except ShardNotFound:
            return Frontier.MIN

    def _resync(self, c: _Coll, upper: Frontier) -> None:
        """persisted := the shard's contents at `upper - 1`."""
        if upper.is_empty:
            raise InvalidUppers(f"collection {c.name!r}: its shard is closed (upper is empty); it cannot be written")
        if upper.time == 0:
            snap = rows_schema(c.meta.schema).empty_table()
        else:
            assert upper.time is not None
            snap = self._raw_snapshot(c, upper.time - 1)
        self._desired.set_persisted(c.name, snap.cast(rows_schema(c.meta.schema)))
        c.persisted_upper = upper
        self._advance(c, upper)

    def _raw_snapshot(self, c: _Coll, as_of: int) -> pa.Table:
        """A snapshot without registering a reader (so read-only controllers write nothing).

        SUBTLE: without a leased reader nothing pins the parts; a compaction plus
        gc may delete one mid-read. That surfaces as CorruptPart (never a wrong
        answer), and a fresh state names the merged parts, so retry.
        """
        m = self.client.machine(c.shard_id)
        for attempt in range(5):
            s = m.fetch()
            if not s.since.less_equal(as_of):
                raise ReadBeforeSince(f"collection {c.name!r}: as_of {as_of} is before since {s.since}")
            batches = [b for b in s.batches if b.lower.less_equal(as_of) and b.parts]
            con = duckdb.connect()
            try:
                src = parts_source(self.client, s, batches, con, "__parts")
                with overflow_checked():
                    out = con.sql(snapshot_sql(s, src, as_of)).to_arrow_table()
                return out.cast(snapshot_schema(s.schema))
            except CorruptPart:
                if attempt == 4:
                    raise
            finally:
                con.close()
        raise AssertionError("unreachable")

    def _diff_commit(self, c: _Coll) -> Frontier:
        """Write `desired - persisted` at the persisted upper, advancing it to at least now."""
        for attempt in range(self.max_write_retries + 1):
            self._check_epoch()
            if c.persisted_upper is None or c.write_frontier > c.persisted_upper:
                # Someone else wrote (we saw the upper move): what we believe is stale.
                self._resync(c, self._shard_upper(c))
            upper = c.persisted_upper
            assert upper is not None and upper.time is not None
            corr = self._desired.corrections(c.name)
            new_upper = max(upper.time + 1 if corr.num_rows else upper.time, self.clock())
            if new_upper == upper.time:
                return upper
            try:
                self._writer(c).compare_and_append(_at_time(corr, upper.time), upper, new_upper)
            except UpperMismatch as e:
                log.info("collection %s: lost the race at upper %s (now %s); re-syncing", c.name, upper, e.current)
                self._resync(c, e.current)
                if attempt:
                    self._backoff(attempt - 1)
                continue
            self._desired.persisted_is_desired(c.name)
            c.persisted_upper = Frontier(new_upper)
            c.committed += corr.num_rows
            c.staged = 0
            self._advance(c, c.persisted_upper)
            if c.diff_hold is not None:
                c.diff_hold.downgrade(max(c.diff_hold.time, Frontier(new_upper - 1)))
            return c.persisted_upper
        raise InvalidUppers(
            f"collection {c.name!r}: lost the race for the upper {self.max_write_retries + 1} times "
            f"(last seen {c.persisted_upper}); the write was not applied"
        )

    # ------------------------------------------------------------------ tables

    @_guarded
    def append_table(self, write_ts: int, advance_to: Frontier | int, updates: Mapping[str, Any]) -> None:
        """Append to several tables in ONE consensus transaction: all become visible at `write_ts`, or none.

        Each value is Arrow rows (row columns; `_diff` defaults to +1, `_time` to
        `write_ts`). Every named table's upper advances to `advance_to`.

        Raises:
            InvalidUppers: a table's upper is already past `write_ts` (nothing written).
            UpdateBeyondUpper: an update at or past `advance_to`.
            IdentifierMissing: an unknown table.
            ReadOnly: the controller is read-only.
        """
        if not isinstance(write_ts, int) or isinstance(write_ts, bool):
            raise InvalidInput(f"append_table: write_ts must be an int, got {write_ts!r}")
        adv = Frontier.of(advance_to)
        with self._lock:
            self._sync_catalog()
            writes = []
            for name, rows in updates.items():
                c = self._get(name)
                if name.startswith(SYSTEM_PREFIX):
                    raise InvalidInput(f"collection {name!r} is written by the controller itself")
                writes.append(TableWrite(name, c.shard_id, c.meta.schema, rows))
            self._writable()
            uppers = append_tables(
                self.client, writes, write_ts, adv,
                writer_id=f"controller-e{self.epoch}", now=self.clock, check=self._epoch_fence_op,
            )
            for name, u in uppers.items():
                self._advance(self._colls[name], u)

    # ------------------------------------------------------------------ introspection

    def _setup_introspection(self) -> None:
        missing = [n for n in sysc.SCHEMAS if n not in self._colls]
        if missing and not self.read_only:
            self._create(
                [CollectionDesc(n, sysc.SCHEMAS[n], "introspection") for n in missing], system=True
            )
        for n in sysc.DIFFERENTIAL:
            c = self._colls.get(n)
            if c is not None and c.kind is None:
                try:
                    self._register_differential(c, init_from_persisted=False)
                except Exception as e:  # noqa: BLE001 - see _introspection_failed
                    self._introspection_failed(c, "reading it at start-up", e)
        for n in sysc.APPEND_ONLY:
            c = self._colls.get(n)
            if c is not None and c.kind is None:
                self._appender(c)
                try:
                    self._load_statuses(c)
                except Exception as e:  # noqa: BLE001 - see _introspection_failed
                    self._introspection_failed(c, "reading its statuses at start-up", e)
        self._refresh_introspection()

    def _introspection_failed(self, c: _Coll, what: str, e: Exception) -> None:
        """A `system.*` collection could not be read or written: warn once, and go on.

        SUBTLE: introspection is the controller's own record of what it does. One
        broken part there (deleted by hand, a disk error) must not stop every
        command and job from opening the controller; the collections it
        describes are intact. Fenced is never swallowed: it means stop. Neither
        are faults of the whole store (consensus locked or unreachable, a full
        disk): they are not this collection's, and the command must stop with
        that one line.
        """
        if isinstance(e, Fenced | ConsensusUnavailable | OutOfSpace):
            raise e
        with _INTRO_WARNED_LOCK:
            first = c.shard_id not in _INTRO_WARNED
            _INTRO_WARNED.add(c.shard_id)
        if first:
            log.warning(
                "warning: collection %r: %s failed (%s: %s); going on without it (`shardflow fsck` checks it)",
                c.name, what, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
            )

    def _load_statuses(self, c: _Coll) -> None:
        """Remember each object's current status; when writable, keep only the last N per object."""
        upper = self._shard_upper(c)
        if upper.is_empty or upper.time in (None, 0):
            return
        assert upper.time is not None
        snap = self._raw_snapshot(c, upper.time - 1)
        if snap.num_rows == 0:
            return
        idc = sysc.STATUS_ID[c.name]
        con = duckdb.connect()
        try:
            con.register("snap", snap)
            ranked = (
                f"SELECT *, row_number() OVER (PARTITION BY {qident(idc)} "
                f"ORDER BY occurred_at DESC, status DESC) AS rn FROM snap"
            )
            for oid, status, error in con.execute(
                f"SELECT {qident(idc)}, status, error FROM ({ranked}) WHERE rn = 1"
            ).fetchall():
                self._last_status[(c.name, oid)] = (status, error)
            cols = ", ".join(qident(n) for n in c.meta.schema.names)
            old = con.sql(
                f"SELECT {cols}, -{DIFF} AS {DIFF} FROM ({ranked}) WHERE rn > {int(self.status_keep_last)}"
            ).to_arrow_table()
        finally:
            con.close()
        if old.num_rows == 0 or self.read_only:
            return
        # Retract the old rows at the old upper, in one batch [upper, upper + 1).
        self._check_epoch()
        try:
            self._writer(c).compare_and_append(_at_time(old.cast(rows_schema(c.meta.schema)), upper.time), upper, upper.time + 1)
            self._advance(c, Frontier(upper.time + 1))
        except UpperMismatch:
            log.info("collection %s: keep-last-N lost a race; retried at the next start", c.name)

    @_guarded
    def report_source_status(self, name: str, status: str, error: str | None = None) -> bool:
        """Record a source's status in `system.source_status_history`.

        A status equal to the source's current one (status and error) is not
        written. Returns True if a row was queued. A read-only controller records
        nothing and returns False.
        """
        return self._report(sysc.SOURCE_STATUS, name, status, error)

    @_guarded
    def report_sink_status(self, name: str, status: str, error: str | None = None) -> bool:
        """Record a sink's status in `system.sink_status_history`; see `report_source_status`."""
        return self._report(sysc.SINK_STATUS, name, status, error)

    def _report(self, coll: str, oid: str, status: str, error: str | None) -> bool:
        if not isinstance(oid, str) or not isinstance(status, str):
            raise InvalidInput(f"{coll}: object id and status must be strings, got {oid!r}, {status!r}")
        with self._lock:
            c = self._colls.get(coll)
            if self.read_only or c is None or c.appender is None:
                return False
            if self._last_status.get((coll, oid)) == (status, error):
                return False
            rows = pa.Table.from_pylist(
                [{"occurred_at": self.clock(), sysc.STATUS_ID[coll]: oid, "status": status, "error": error}],
                schema=c.meta.schema,
            )
            self._last_status[(coll, oid)] = (status, error)
        c.appender.append(rows, wait=False)
        return True

    def _refresh_introspection(self) -> None:
        """Recompute the desired contents of the differential introspection collections."""
        everything = {**{c.name: c for c in self._colls.values()}}
        fr = self._colls.get(sysc.FRONTIERS)
        if fr is not None and fr.kind == "differential":
            rows = [
                {"object_id": n, "read_frontier": c.since.time, "write_frontier": c.write_frontier.time}
                for n, c in sorted(everything.items())
            ]
            self._desired.replace(fr.name, _with_diff(rows, fr.meta.schema))
        sm = self._colls.get(sysc.SHARD_MAPPING)
        if sm is not None and sm.kind == "differential":
            rows = [{"collection": n, "shard_id": c.shard_id} for n, c in sorted(everything.items())]
            self._desired.replace(sm.name, _with_diff(rows, sm.meta.schema))
        stc = self._colls.get(sysc.STATISTICS)
        if stc is not None and stc.kind == "differential":
            rows = []
            for n, c in sorted(everything.items()):
                if n in sysc.SCHEMAS:
                    continue  # statistics of user collections only: ours change on every tick
                try:
                    s = self.client.machine(c.shard_id).fetch()
                    nrows, nbytes = sum(b.rows for b in s.batches), sum(b.bytes for b in s.batches)
                except ShardNotFound:
                    nrows = nbytes = 0
                rows.append({"object_id": n, "rows": nrows, "bytes": nbytes,
                             "updates_staged": c.staged, "updates_committed": c.committed})
            self._desired.replace(stc.name, _with_diff(rows, stc.meta.schema))

    # ------------------------------------------------------------------ ticking

    @_guarded
    def tick(self) -> None:
        """One round of background work, synchronously (tests call this; the thread calls it too).

        Re-reads the catalog and every upper, applies read policies (since goes to
        the critical since handles), flushes appenders, ticks managed collections'
        uppers forward to now, refreshes introspection, finalizes released drops
        and runs compaction. A read-only controller only refreshes its view and
        its desired states.
        """
        with self._lock:
            self._sync_catalog()
            for c in list(self._colls.values()):
                self._refresh_upper(c)
            if not self.read_only:
                self._check_epoch()
                for c in list(self._colls.values()):
                    if c.appender is not None:
                        try:
                            if c.appender.pending():
                                self._flush_appender(c.appender)
                            else:
                                self._tick_forward(c)
                        except Exception as e:  # noqa: BLE001 - only system.*: see _introspection_failed
                            if not c.name.startswith(SYSTEM_PREFIX):
                                raise
                            self._introspection_failed(c, "writing it", e)
                for c in list(self._colls.values()):
                    if c.kind == "differential" and c.name not in sysc.DIFFERENTIAL:
                        self._diff_commit(c)
                for c in list(self._dropped.values()):
                    if c.since.is_empty:
                        self._finalize(c)
            # Introspection last, so it shows this tick's frontiers.
            self._refresh_introspection()
            if not self.read_only:
                for n in sysc.DIFFERENTIAL:
                    sc = self._colls.get(n)
                    if sc is not None and sc.kind == "differential":
                        try:
                            self._diff_commit(sc)
                        except Exception as e:  # noqa: BLE001 - see _introspection_failed
                            self._introspection_failed(sc, "writing it", e)
                self._maybe_compact()
            self.ticks += 1

    def _tick_forward(self, c: _Coll) -> None:
        """An idle append-only collection's upper moves to now, so it stays readable at recent times."""
        w = self._writer(c)
        upper = w.machine.fetch().upper
        now = self.clock()
        if upper.is_empty or not upper.less_than(now):
            return
        try:
            w.compare_and_append(_empty_updates(c.meta.schema), upper, now)
        except UpperMismatch:
            return  # someone else moved it; the next tick looks again
        self._advance(c, Frontier(now))

    def _maybe_compact(self) -> None:
        """Since moved: let compaction advance times to it (at most once per interval per shard).

        Uses the client's background compactor when there is one (so the
        controller's lock is not held across merges), else `client.compact`.
        """
        if not self.compact_enabled:
            return
        now = time.monotonic()
        for c in list(self._colls.values()):
            if c.handle is None or c.handle.since <= c.compacted_since:
                continue
            if (now - c.last_compact) * 1000 < self.compact_interval_ms:
                continue
            c.last_compact = now
            c.compacted_since = c.handle.since
            try:
                compactor = getattr(self.client, "compactor", None)
                if compactor is not None:
                    compactor.request(c.shard_id)
                else:
                    self.client.compact(c.shard_id)
            except ModuleNotFoundError as e:
                if e.name not in ("storage.compact", "compact"):
                    raise
                self.compact_enabled = False  # storage.compact is not there
                return
            except Fenced:
                raise
            except Exception as e:  # noqa: BLE001 - compaction is an optimisation; log and go on
                log.warning("compaction of %s (%s) failed: %s", c.name, c.shard_id, e)

    def _run(self) -> None:
        assert self.tick_interval_ms is not None
        interval = self.tick_interval_ms / 1000.0
        batch = self.batch_duration_ms / 1000.0
        next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            due = next_tick
            for c in list(self._colls.values()):
                a = c.appender
                if a is not None and a.pending():
                    due = min(due, a.last_flush + batch)
            if due > now:
                self._wake.wait(due - now)
                self._wake.clear()
                continue
            try:
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + interval
                    self.tick()
                else:
                    with self._lock:
                        for c in list(self._colls.values()):
                            a = c.appender
                            if a is not None and a.pending() and time.monotonic() >= a.last_flush + batch:
                                self._flush_appender(a)
            except Fenced as e:
                self._fence(e)
                return
            except Exception as e:  # noqa: BLE001 - keep ticking; the error is logged
                if self._closed or self._stop.is_set():
                    return
                log.warning("storage controller tick failed: %s: %s", type(e).__name__, e)
                self._stop.wait(min(interval, 1.0))

    # ------------------------------------------------------------------ read-only -> writable

    def allow_writes(self) -> None:
        """Take over as the writer: bump the catalog epoch (fencing the previous writer),
        take over the critical since handles, finalize pending drops, and write the
        differential collections' corrections. A no-op on a writable controller."""
        self._check_live()
        with self._lock:
            if not self.read_only:
                return
            cat = self._catalog.bump_epoch()
            self.epoch = cat.epoch
            self.read_only = False
            self._seen_seqno = -1
            for c in list(self._colls.values()):
                m = self.client.machine(c.shard_id)
                try:
                    s = m.fetch()
                except ShardNotFound:
                    s = m.fetch_or_init(c.meta.schema)
                if s.is_tombstone:
                    continue
                c.handle = self._take_over_since(c.shard_id)
                # SUBTLE: while read-only, our holds did not reach the shard; the previous
                # writer may have moved the shard's since past them. Holds taken from now
                # on are exact; see the module docs.
                c.writer = None
                if c.kind == "differential":
                    self._resync(c, self._shard_upper(c))
                self._push_since(c)
            self._sync_catalog(cat)
            self._finalize_unfinalized(cat.unfinalized_shards)
            self._setup_introspection()


def _at_time(rows: pa.Table, t: int) -> pa.Table:
    """Rows (row columns + `_diff`) as updates at time `t`."""
    diff = rows.column(DIFF)
    out = rows.drop_columns([DIFF])
    out = out.append_column(pa.field(TIME, pa.int64(), nullable=False), pa.repeat(pa.scalar(t, pa.int64()), rows.num_rows))
    return out.append_column(pa.field(DIFF, pa.int64(), nullable=False), diff)


def _empty_updates(schema: pa.Schema) -> pa.Table:
    from ..updates import update_schema

    return update_schema(schema).empty_table()


def _with_diff(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    t = pa.Table.from_pylist(rows, schema=schema)
    return t.append_column(pa.field(DIFF, pa.int64(), nullable=False), pa.repeat(pa.scalar(1, pa.int64()), t.num_rows))

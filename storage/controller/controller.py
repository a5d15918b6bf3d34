"""The storage controller: coordination of names to shards, read holds, write tasks and fencing.

See `storage.controller` for the overview. The controller owns the catalog
sync, the collections' lifecycle (create, alter, drop, finalize), the critical
since handles and fencing; it delegates by the state each part owns:

- `holds.py`: each collection's `ReadState` (policy, implied capability, holds,
  since), pure;
- `collection_mgmt.py`: each collection's `WriteTask` (appenders, differential
  desired/persisted, ticking idle uppers) and `Stats`;
- `records.py`: the per-collection record `_Coll` those parts share;
- `introspection.py`: the `system.*` collections.

Concurrency: one re-entrant lock guards all in-memory state and serialises the
controller's own writes; a background thread ticks and flushes appenders under
that lock.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa

from .. import state as st
from ..client import Client, SinceHandle
from ..consensus import CasOp, VersionedData
from ..errors import (
    Fenced,
    IdentifierMissing,
    InvalidInput,
    LeaseExpired,
    ReadOnly,
    ShardNotFound,
    Tombstone,
)
from ..frontier import Frontier
from ..ids import ShardId, new_id
from ..read import DEFAULT_LEASE_MS
from ..updates import check_row_schema
from . import holds
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
    plan_set_depends_on,
    plan_set_policies,
    validate_name,
)
from .collection_mgmt import (
    Append,
    CollectionManager,
    Delete,
    MonotonicAppender,
    Replace,
)
from .holds import DEP_PREFIX, HOLD_PREFIX, POLICY_READER, ReadHold, ReadState, dep_reader_id
from .policy import (
    DEFAULT_POLICY,
    ReadPolicy,
    ValidFrom,
    coerce_policy,
    policy_to_json,
)
from .records import _Coll
from .tables import TableWrite, append_tables

log = logging.getLogger("storage.controller")

CRITICAL_READER_ID = POLICY_READER
_ROLE_RE = re.compile(r"^[A-Za-z0-9_.:/@-]{1,100}$")
CRASH_ENV = "SHARDFLOW_CONTROLLER_CRASH_AT"


def _crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named step if `$SHARDFLOW_CONTROLLER_CRASH_AT` says so."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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
        role: str = "controller",
        hold_lease_ms: int = DEFAULT_LEASE_MS,
    ):
        if not isinstance(role, str) or not _ROLE_RE.match(role):
            raise InvalidInput(f"controller role {role!r}: use 1-100 of letters, digits and _.:/@-")
        if not isinstance(hold_lease_ms, int) or hold_lease_ms < 100:
            raise InvalidInput(f"hold_lease_ms must be an int >= 100, got {hold_lease_ms!r}")
        self.role = role
        self.hold_lease_ms = hold_lease_ms
        self._holder = f"{HOLD_PREFIX}{role}:{os.getpid()}@{socket.gethostname()}:{new_id('')[-6:]}"
        self._lease_thread: threading.Thread | None = None
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
        self._mgmt = CollectionManager(self, desired_path)
        self._intro = sysc.Introspection(self)
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
        role: str = "controller",
        hold_lease_ms: int = DEFAULT_LEASE_MS,
    ) -> StorageController:
        """Open the controller over `client`'s shards.

        A writable controller (the default) takes over: it bumps the catalog
        epoch, which fences any previous writer, takes over every collection's
        critical since handle, finalizes the shards a crash left in
        `unfinalized_shards`, and creates the `system.*` introspection
        collections. A `read_only=True` controller writes nothing until
        `allow_writes()` but the leased readers behind its read holds (so they
        bind the writers too).

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
            role: who this controller is, e.g. `job:orders`; it names the
                leased readers behind its read holds (`hold:<role>:<pid>@<host>:..`),
                which `shardflow inspect` lists.
            hold_lease_ms: the lease of those readers: heartbeated every third
                of it, they expire this long after the process died.
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
            role=role,
            hold_lease_ms=hold_lease_ms,
        )
        ctl._fence_on_open = fence
        try:
            ctl._start()
        except BaseException:
            ctl._mgmt.desired.close()
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
            self._intro.setup()
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
            try:
                self._mgmt.close(self._colls.values(), flush=not self.read_only and self._fenced is None)
            finally:
                self._closed = True
                # This process's holds end with it (a crash leaves them to their lease).
                for c in [*self._colls.values(), *self._dropped.values()]:
                    if c.reader is not None:
                        self._expire_reader(c)

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
        self._mgmt.fail_appenders(list(self._colls.values()), e)
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
            if c.meta.depends_on != m.depends_on:
                # Inputs added or removed (`set_dependencies`): hold the new ones; the
                # handles on removed ones are released as orphans by the inputs' next tick.
                for gone in [n for n in c.deps if n not in m.depends_on]:
                    c.deps.pop(gone)
                c.meta = replace(c.meta, depends_on=m.depends_on)
                self._since_moved(c)
            if policy_to_json(c.meta.read_policy) != policy_to_json(m.read_policy):
                # Someone (or this controller) stored another policy.
                c.read.policy = m.read_policy or DEFAULT_POLICY
                c.meta = m
                if holds.apply_policy(c.read):
                    self._push_policy(c)
            c.meta = m
        self._seen_seqno = cat.seqno

    def _setup(self, meta: CollectionMeta) -> _Coll:
        """Bring up one collection: its shard, policy handle, frontiers and dependency holds."""
        c = _Coll(meta=meta, read=ReadState(meta.name, meta.shard_id, meta.read_policy or DEFAULT_POLICY))
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
        live = s is not None and not s.is_tombstone
        if live and not self.read_only:
            c.handle = self._take_over_since(meta.shard_id)
            shard_since = max(shard_since, c.handle.since)
        # A dependent starts no earlier than its inputs' sinces. A writer first registers
        # its dependency holds, so the inputs cannot move past where they were counted.
        input_sinces = []
        for dep in meta.depends_on:
            inp = self._colls[dep]
            if live and not self.read_only:
                input_sinces.append(self._dep_handle(c, inp).since)
            input_sinces.append(inp.read.since)
        holds.bring_up(
            c.read,
            s.upper if s is not None else Frontier.MIN,
            shard_since=shard_since,
            input_sinces=input_sinces,
        )
        self._colls[meta.name] = c
        if s is not None:
            holds.observe(c.read, st.wanted_since(s, self.clock()))
        self._push_policy(c)
        self._since_moved(c)  # the dependency holds follow since (a no-op unless writable)
        return c

    def _dep_handle(self, c: _Coll, inp: _Coll) -> SinceHandle:
        """`c`'s dependency hold on input `inp` (registered at `inp`'s since if missing)."""
        h = c.deps.get(inp.name)
        if h is None or h.shard_id != inp.shard_id:
            rid = dep_reader_id(c.shard_id)
            h = c.deps[inp.name] = self.client.open_critical_since(inp.shard_id, rid, opaque=rid)
        return h

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
        self._mgmt.alter(c, schema)
        c.meta = replace(c.meta, schema=schema)

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
    def set_dependencies(self, name: str, depends_on: Sequence[str]) -> None:
        """Record that collection `name` is derived from `depends_on` (replacing its inputs).

        Each input is then held at `name`'s since by a durable dependency hold
        (a critical since handle `dep:<name's shard>` on the input's shard), so a
        job computing `name` can resume where it stopped after its inputs moved
        on, however much later. A new input is held from its since now.

        Raises:
            IdentifierMissing: `name` or an input is unknown.
            InvalidInput: a dependency cycle.
            ReadOnly: the controller is read-only.
        """
        validate_name(name)
        deps = list(depends_on)
        for d in deps:
            validate_name(d, allow_system=True)
        with self._lock:
            self._sync_catalog()
            if plan_set_depends_on(self._catalog.head(), name, deps) is None:  # validates (raises)
                return
            self._writable()
            cat, _ = self._catalog.apply(self.epoch, lambda s: (plan_set_depends_on(s, name, deps), None))
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
        """The catalog no longer has `c`: unregister it and release everything it holds.

        Its policy handle and its dependency holds go now (a writer's job); the
        shard is finalized once no live handle of any process holds it.
        """
        c.read.dropped = True
        self._dropped[c.shard_id] = c
        self._mgmt.on_dropped(c)
        c.read.policy = ValidFrom(Frontier.EMPTY)
        if self.read_only or self._fenced is not None:
            return
        self._release_durable(c)
        self._try_finalize(c.shard_id)

    def _release_durable(self, c: _Coll) -> None:
        """Release `c`'s policy handle and its dependency holds on its inputs (it was dropped)."""
        if c.handle is not None:
            res = self._apply_quiet(c.shard_id, st.release_critical_reader, POLICY_READER, self.epoch, check_opaque=True)
            if isinstance(res, st.OpaqueMismatch) and isinstance(res.actual, int) and res.actual > self.epoch:
                raise Fenced(f"shard {c.shard_id}: policy handle taken over by epoch {res.actual} (this controller: epoch {self.epoch})")
            c.handle = None
        for h in list(c.deps.values()):
            self._apply_quiet(h.shard_id, st.release_critical_reader, h.reader_id)
        c.deps.clear()

    def _apply_quiet(self, shard: str, transition: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Apply a transition to a shard that may be gone (finalized or never created): None then."""
        try:
            _, res = self.client.machine(shard).apply(transition, *args, **kw)
        except (ShardNotFound, Tombstone):
            return None
        return res

    def _finalize_unfinalized(self, shards: Iterable[str]) -> None:
        """Finalize the dropped shards no live handle holds any more (this and earlier controllers' drops)."""
        for shard in list(shards):
            self._try_finalize(shard)

    def _try_finalize(self, shard: str) -> bool:
        """Finalize `shard` if no live handle of any process holds it; True once it is a tombstone."""
        if self.read_only or self._fenced is not None:
            return False  # the writer finalizes (after allow_writes(), this one)
        c = self._dropped.get(shard)
        if c is not None and c.reader is not None:
            return False  # this process still holds it
        self._check_epoch()
        # The dropped collection's policy handle goes first (still there after a crash mid-drop).
        self._apply_quiet(shard, st.release_critical_reader, POLICY_READER)
        try:
            held = self.client.finalize(shard)
        except ShardNotFound:
            held = {}  # never initialized: nothing to finalize
        if held:
            log.debug("dropped shard %s waits for its holders: %s", shard, sorted(held))
            return False
        _crash_point("finalized_shard")
        self._catalog.apply(self.epoch, lambda s: (plan_finalized(s, [shard]), None))
        self._dropped.pop(shard, None)
        return True

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
            return replace(c.meta, read_policy=c.read.policy)

    @_guarded
    def collections(self) -> dict[str, CollectionMeta]:
        """Every user collection (not the `system.*` ones; see `introspection_shards`)."""
        with self._lock:
            self._sync_catalog()
            return {
                n: replace(c.meta, read_policy=c.read.policy)
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
            return c.read.since, c.read.write_frontier

    def implied_capability(self, name: str) -> Frontier:
        with self._lock:
            return self._get(name).read.implied

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
                c.read.policy = p
                if self.read_only:
                    c.meta = replace(c.meta, read_policy=p if p.to_json() is not None else c.meta.read_policy)
                self._refresh_upper(c)

    @_guarded
    def acquire_read_holds(self, names: Sequence[str]) -> list[ReadHold]:
        """One hold per name (a repeated name gets several), each at or past the collection's since.

        The holds are backed by this process's leased reader on each shard, so
        they bind every process on the data directory, read-only or not.

        Raises:
            IdentifierMissing: an unknown name (no hold is taken).
        """
        with self._lock:
            self._sync_catalog()
            colls = [self._get(n) for n in names]
            return [self._hold(c) for c in colls]

    def _hold(self, c: _Coll) -> ReadHold:
        """A new hold of this process on `c`, at the time its reader holds (registered if need be)."""
        if c.reader is not None and c.reader._expired:
            # Its lease ran out (the process stalled): the old holds no longer bind; start over.
            c.reader = None
        if c.reader is None:
            self._refresh_since(c)  # not below what the shard's handles ask for now
            c.reader = self.client.open_leased_reader(
                c.shard_id, reader_id=self._holder, lease_ms=self.hold_lease_ms, heartbeat=False
            )
            self._start_heartbeats()
            # The reader registered at the shard's stored since; since may be asked further on.
            if c.read.since > c.reader.since:
                c.reader.downgrade_since(c.read.since)
        at = max(c.read.since, c.reader.since)
        return ReadHold(self, c.read, holds.acquire(c.read, at))

    def _downgrade_hold(self, h: ReadHold, t: Frontier) -> None:
        with self._lock:
            if h._released:
                return
            if t < h._time:
                raise InvalidInput(f"read hold on {h.name!r}: cannot move back from {h._time} to {t}")
            if t == h._time:
                return
            old, h._time = h._time, t
            if t.is_empty:
                h._released = True
            moved = holds.move_hold(h._read, old, t)
            c = self._owner(h._read)
            if moved is None or c is None:
                return
            try:
                if moved.is_empty:
                    self._expire_reader(c)
                    if c.read.dropped:
                        self._try_finalize(c.shard_id)
                    else:
                        self._refresh_since(c)
                else:
                    self._push_reader(c)
            except Fenced as e:
                self._fence(e)

    def _push_reader(self, c: _Coll) -> None:
        """Move this process's reader on `c` forward to its holds' frontier; then since may move."""
        f = c.read.local.frontier()
        if c.reader is None or f.is_empty or not f > c.reader.since:
            return
        try:
            c.reader.downgrade_since(f)
        except (LeaseExpired, Tombstone):
            log.warning("read hold on %r: this process's reader %s expired; its holds no longer bind", c.name, self._holder)
            c.reader = None
            return
        self._refresh_since(c)

    def _expire_reader(self, c: _Coll) -> None:
        r, c.reader = c.reader, None
        if r is not None:
            try:
                r.expire()
            except (ShardNotFound, Tombstone):
                pass

    def _start_heartbeats(self) -> None:
        if self._lease_thread is None:
            self._lease_thread = threading.Thread(target=self._heartbeat_loop, name="storage-holds", daemon=True)
            self._lease_thread.start()

    def _heartbeat_loop(self) -> None:
        """Keep this process's hold readers alive (every third of the lease), and move lazy holds on."""
        while not self._stop.wait(self.hold_lease_ms / 3000.0):
            self.heartbeat_holds()
        return

    def heartbeat_holds(self) -> None:
        """Extend the leases of this process's hold readers now (the background thread does it
        every third of `hold_lease_ms`)."""
        with self._lock:
            colls = [c for c in [*self._colls.values(), *self._dropped.values()] if c.reader is not None]
        for c in colls:
            with self._lock:
                r = c.reader
                if r is None:
                    continue
                try:
                    r.release_versions()
                    self._push_reader(c)
                except (LeaseExpired, Tombstone):
                    log.warning("read hold on %r: this process's reader %s expired (the process stalled past "
                                "its lease); its holds no longer bind", c.name, self._holder)
                    c.reader = None
                except Exception as e:  # noqa: BLE001 - retried at the next beat, before the lease ends
                    log.debug("heartbeat of the hold on %r failed: %s", c.name, e)

    def _refresh_upper(self, c: _Coll) -> None:
        try:
            s = self.client.machine(c.shard_id).fetch()
        except ShardNotFound:
            return
        self._seen(c, s)

    def _seen(self, c: _Coll, s: st.ShardState) -> None:
        """`s` is `c`'s shard now: apply the policy to its upper, follow its since, keep its holds."""
        writer = not self.read_only and self._fenced is None
        if writer and any(r.lease_expires_ms <= self.clock() for r in s.leased_readers.values()):
            # A crashed process's holds: their lease ran out; drop them, so since moves on.
            s2, gone = self.client.machine(c.shard_id).apply(st.expire_leases)
            if gone:
                log.info("collection %r: %d expired leased reader(s) dropped", c.name, gone)
            s = s2
        if holds.advance_upper(c.read, s.upper):
            self._push_policy(c)
        if holds.observe(c.read, st.wanted_since(s, self.clock())):
            self._since_moved(c)
        if writer:
            self._release_orphans(c, s)

    def _advance(self, c: _Coll, upper: Frontier) -> None:
        """`c`'s upper moved to `upper` (or not: a smaller one is ignored); re-apply its read policy."""
        if holds.advance_upper(c.read, upper):
            self._push_policy(c)

    def _owner(self, rs: ReadState) -> _Coll | None:
        c = self._colls.get(rs.name)
        if c is not None and c.read is rs:
            return c
        return self._dropped.get(rs.shard_id)

    def _push_policy(self, c: _Coll) -> bool:
        """Send the implied capability to the policy handle (writable controllers only); True if sent."""
        if self.read_only or self._fenced is not None or c.handle is None or c.read.dropped:
            return False
        since = holds.since_to_push(c.read.implied, handle_since=c.handle.since)
        if since is None:
            return False
        try:
            res = c.handle.compare_and_downgrade_since(self.epoch, (self.epoch, since))
        except (LeaseExpired, Tombstone):
            c.handle = None  # released: the collection was dropped elsewhere (the catalog says so next)
            return False
        if isinstance(res, st.OpaqueMismatch):
            raise Fenced(f"shard {c.shard_id}: critical since taken over by {res.actual!r} (this controller: epoch {self.epoch})")
        self._refresh_since(c)
        return True

    def _refresh_since(self, c: _Coll) -> None:
        """Re-read `c`'s shard since (a handle on it moved) and pass it on to its dependency holds."""
        try:
            s = self.client.machine(c.shard_id).fetch()
        except ShardNotFound:
            return
        if holds.observe(c.read, st.wanted_since(s, self.clock())):
            self._since_moved(c)

    def _since_moved(self, c: _Coll) -> None:
        """`c`'s since moved: its dependency holds follow it (a writer's job), and so do its inputs'."""
        if self.read_only or self._fenced is not None or c.read.dropped:
            return
        for dep in c.meta.depends_on:
            inp = self._colls.get(dep)
            if inp is None:
                continue
            h = self._dep_handle(c, inp)
            t = holds.since_to_push(c.read.since, handle_since=h.since)
            if t is None:
                continue
            try:
                h.compare_and_downgrade_since(h.opaque, (h.opaque, t))
            except LeaseExpired:
                # An operator released it (`shardflow holds release`): hold again from here on.
                log.warning("dependency hold of %r on %r was released; holding %r again from its since now",
                            c.name, dep, dep)
                c.deps.pop(dep, None)
                h = self._dep_handle(c, inp)
                if holds.since_to_push(c.read.since, handle_since=h.since) is not None:
                    h.compare_and_downgrade_since(h.opaque, (h.opaque, c.read.since))
            self._refresh_since(inp)

    def _release_orphans(self, c: _Coll, s: st.ShardState) -> None:
        """Release dependency holds on `c` whose dependent is gone (dropped, or a crash mid-drop)."""
        rids = [r for r in s.critical_readers if r.startswith(DEP_PREFIX)]
        if not rids:
            return
        wanted = {dep_reader_id(d.shard_id) for d in self._colls.values() if c.name in d.meta.depends_on}
        orphans = [r for r in rids if r not in wanted]
        if not orphans:
            return
        # SUBTLE: a dependent is in the catalog before it registers its holds; one created
        # since this controller last synced is in the head now, so read it again first.
        self._sync_catalog()
        wanted = {dep_reader_id(d.shard_id) for d in self._colls.values() if c.name in d.meta.depends_on}
        for r in orphans:
            if r not in wanted:
                log.info("releasing dependency hold %s on %r: its dependent is gone", r, c.name)
                self._apply_quiet(c.shard_id, st.release_critical_reader, r)

    # ------------------------------------------------------------------ collection manager

    @_guarded
    def monotonic_appender(self, name: str) -> MonotonicAppender:
        """The appender of append-only collection `name` (the same object on every call)."""
        with self._lock:
            self._sync_catalog()
            return self._mgmt.appender(self._mgmt.admit(self._get(name), "append"))

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
            c = self._mgmt.admit(self._get(name), "differential")
            self._mgmt.register_differential(c, init_from_persisted=True)
            self._mgmt.apply_op(c, op)
            if self.read_only:
                return None
            return self._mgmt.diff_commit(c)

    def desired(self, name: str) -> pa.Table:
        """The consolidated desired contents of a differential collection (row columns + `_diff`)."""
        with self._lock:
            c = self._get(name)
            if c.write.kind != "differential":
                raise InvalidInput(f"collection {name!r} is not a differential collection")
            return self._mgmt.desired.desired(name)

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

    @_guarded
    def report_source_status(self, name: str, status: str, error: str | None = None) -> bool:
        """Record a source's status in `system.source_status_history`.

        A status equal to the source's current one (status and error) is not
        written. Returns True if a row was queued. A read-only controller records
        nothing and returns False.
        """
        return self._intro.report(sysc.SOURCE_STATUS, name, status, error)

    @_guarded
    def report_sink_status(self, name: str, status: str, error: str | None = None) -> bool:
        """Record a sink's status in `system.sink_status_history`; see `report_source_status`."""
        return self._intro.report(sysc.SINK_STATUS, name, status, error)

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
                self._mgmt.tick(self._colls.values(), self._intro.failed)
                # Dropped shards (this controller's and earlier ones') whose holders let go.
                self._finalize_unfinalized(self._catalog.head().unfinalized_shards)
            # Introspection last, so it shows this tick's frontiers.
            self._intro.refresh()
            if not self.read_only:
                self._intro.commit()
                self._maybe_compact()
            self.ticks += 1

    def _maybe_compact(self) -> None:
        """Since moved: let compaction advance times to it (at most once per interval per shard).

        Uses the client's background compactor when there is one (so the
        controller's lock is not held across merges), else `client.compact`.
        """
        if not self.compact_enabled:
            return
        now = time.monotonic()
        for c in list(self._colls.values()):
            cp = c.compaction
            if c.handle is None or c.read.since <= cp.since:
                continue
            if (now - cp.at) * 1000 < self.compact_interval_ms:
                continue
            cp.at = now
            cp.since = c.read.since
            try:
                compactor = getattr(self.client, "compactor", None)
                if compactor is not None:
                    compactor.request(c.shard_id)
                else:
                    self.client.compact(c.shard_id)
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
            due = self._mgmt.next_flush(list(self._colls.values()), next_tick, batch)
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
                        self._mgmt.flush_due(list(self._colls.values()), batch)
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
        take over the critical since handles, rebase each collection's since onto its
        shard's real since, finalize pending drops, and write the differential
        collections' corrections at once. A no-op on a writable controller."""
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
                # SUBTLE: while read-only, the implied capability never reached the shard; the
                # previous writer moved the policy handle on, and a handle never moves back.
                holds.rebase(c.read, c.handle.since)
                self._push_policy(c)
                self._refresh_since(c)
                self._mgmt.take_over(c)
            for c in list(self._colls.values()):
                self._since_moved(c)  # register and move the dependency holds
            self._sync_catalog(cat)
            self._finalize_unfinalized(cat.unfinalized_shards)
            self._intro.setup()
            # Desired changes made while read-only: written now, not at the next tick.
            for c in list(self._colls.values()):
                if c.write.kind == "differential" and not c.name.startswith(SYSTEM_PREFIX):
                    self._mgmt.diff_commit(c)

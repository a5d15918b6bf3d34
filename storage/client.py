"""The client: opens shards for writing and reading over one blob and one consensus."""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from . import state as st
from .blob import Blob, LocalBlob
from .compact import BackgroundCompactor, CompactReport, compact
from .consensus import Consensus, open_consensus
from .errors import Fenced, InvalidInput
from .frontier import Frontier
from .gc import GcReport, VerifyReport, finalize, gc, verify
from .ids import ShardId, new_id
from .machine import SHARD_PREFIX, Machine
from .parts import PartStore
from .read import DEFAULT_LEASE_MS, ReadHandle, tombstone_error
from .updates import check_row_schema
from .write import WriteHandle


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class Client:
    """Entry point to shards stored under one blob and one consensus.

    Get one with `storage.open(root)`. Thread-safe: handles may be used from
    several threads; separate processes coordinate through consensus.

    A context manager: `with storage.open(root) as client:` closes it at the
    end of the block. Without `with`, call `close()`; a client left open is
    closed at interpreter exit anyway (its background work is stopped before
    DuckDB is torn down), so a script that just ends exits normally.
    """

    def __init__(self, root: str | None, consensus: Consensus, blob: Blob, clock: Callable[[], int] = wall_clock_ms):
        self.root = root
        self.consensus = consensus
        self.blob = blob
        self.clock = clock
        self.parts = PartStore(blob)  # every part file IO: write, verify, read (storage/parts.py)
        self.read_only = False  # `open(read_only=True)`: readers are not registered
        self._vlock = threading.Lock()
        self._compactor: Any = None
        self._closed = False
        _OPEN_CLIENTS.add(self)

    @property
    def closed(self) -> bool:
        """True once `close()` ran (by hand, at the end of a `with` block, or by `run_flow`)."""
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(root={self.root!r})"

    def machine(self, shard: str) -> Machine:
        return Machine(self.consensus, ShardId(shard), self.clock)

    # ---- handles ----
    def open_writer(
        self,
        shard: str,
        schema: pa.Schema | None = None,
        *,
        writer_id: str | None = None,
        compact: bool = True,
    ) -> WriteHandle:
        """A writer for `shard`. With `schema`, creates the shard if it does not exist.

        With `compact=True` (the default), every successful append wakes this
        client's background compactor, which merges batches that are out of their
        size tiers (see `storage.compact`); `compact=False` opts out (compact on
        demand with `client.compact(shard)`).

        Raises:
            SchemaMismatch: the shard exists under another schema.
            ShardNotFound: no schema given and the shard does not exist.
        """
        m = self.machine(shard)
        if schema is not None:
            check_row_schema(schema, f"shard {shard}")
        s = m.fetch_or_init(schema)
        if s.is_tombstone:
            raise tombstone_error(m.shard_id)
        return WriteHandle(self, m, s.schema, writer_id or new_id("w"), compact=compact)

    def open_leased_reader(
        self, shard: str, *, reader_id: str | None = None, lease_ms: int = DEFAULT_LEASE_MS, heartbeat: bool = True
    ) -> ReadHandle:
        """A leased reader; its since starts at the shard's since and holds it back while the lease lives."""
        return ReadHandle(self, self.machine(shard), reader_id or new_id("r"), lease_ms, heartbeat)

    def open_critical_since(self, shard: str, reader_id: str, opaque: Any) -> SinceHandle:
        """A critical since handle: it never expires; fencing is by `opaque` (e.g. an epoch)."""
        m = self.machine(shard)
        _, r = m.apply(st.register_critical_reader, reader_id, opaque)
        return SinceHandle(m, reader_id, r.opaque, r.since)

    # ---- introspection ----
    def list_shards(self) -> list[ShardId]:
        return [ShardId(k[len(SHARD_PREFIX) :]) for k in self.consensus.list_keys(SHARD_PREFIX)]

    def state(self, shard: str) -> st.ShardState:
        return self.machine(shard).fetch()

    def inspect(self, shard: str) -> dict[str, Any]:
        """A JSON-friendly description: seqno, since, upper, schema, batches, readers, holds, metadata.

        `holds` has one entry per handle on the shard, critical and leased, expired
        leases flagged: see `storage.state.hold_entries`.
        """
        s = self.state(shard)
        now = self.clock()
        return {
            "shard_id": s.shard_id,
            "seqno": s.seqno,
            "since": s.since.time,
            "upper": s.upper.time,
            "tombstone": s.is_tombstone,
            "schema": {f.name: str(f.type) for f in s.schema},
            "batches": [
                {
                    "lower": b.lower.time,
                    "upper": b.upper.time,
                    "since": b.since.time,
                    "parts": len(b.parts),
                    "rows": b.rows,
                    "bytes": b.bytes,
                }
                for b in s.batches
            ],
            "rows": sum(b.rows for b in s.batches),
            "bytes": sum(b.bytes for b in s.batches),
            "writers": sorted(s.writers),
            "leased_readers": {
                k: {"since": r.since.time, "seqno": r.seqno, "expired": r.lease_expires_ms <= now}
                for k, r in s.leased_readers.items()
            },
            "critical_readers": {k: {"since": r.since.time, "opaque": r.opaque} for k, r in s.critical_readers.items()},
            "holds": st.hold_entries(s, now),
            "metadata": dict(s.metadata),
        }

    # ---- lifecycle (storage/compact.py, storage/gc.py) ----
    def compact(self, shard: str, **kw: Any) -> CompactReport:
        return compact(self, ShardId(shard), **kw)

    @property
    def compactor(self) -> Any:
        """The background compactor (one daemon thread, started on first use).

        After `close()` it is stopped: requests are ignored.
        """
        with self._vlock:
            if self._compactor is None:
                self._compactor = BackgroundCompactor(self)
            return self._compactor

    def wait_compaction(self, timeout: float | None = None) -> bool:
        """Wait until background compaction has nothing pending; True unless timed out."""
        return self._compactor is None or self._compactor.wait_idle(timeout)

    def gc(self, shard: str, **kw: Any) -> GcReport:
        report = gc(self, ShardId(shard), **kw)
        if report.deleted and not kw.get("dry_run"):
            # Forget the checks of deleted parts, so the cache tracks live parts only.
            self.parts.forget(report.deleted)
        return report

    def reclaim_space(self) -> int:
        """Give the space of truncated consensus versions back to the file system.

        What it does depends on the consensus: SQLite returns free pages
        (`SqliteConsensus.reclaim`); others (PostgreSQL's autovacuum) need
        nothing. Returns the pages freed (0 when not applicable).
        """
        reclaim = getattr(self.consensus, "reclaim", None)
        return int(reclaim()) if reclaim is not None else 0

    def finalize(self, shard: str, *, force: bool = False) -> dict[str, Frontier]:
        """See `storage.gc.finalize`: `{}` once a tombstone, else the handles still holding it."""
        return finalize(self, ShardId(shard), force=force)

    def release_critical_since(self, shard: str, reader_id: str) -> bool:
        """Remove critical since handle `reader_id` (whatever its opaque); False if it was not there.

        An operator's tool (`shardflow holds release`): the holder's next downgrade fails.
        """
        _, res = self.machine(shard).apply(st.release_critical_reader, reader_id)
        return res is True

    def expire_leased_reader(self, shard: str, reader_id: str) -> bool:
        """Remove leased reader `reader_id` now, as if its lease ran out; False if it was not there.

        An operator's tool (`shardflow holds release`): the holder's next heartbeat,
        downgrade or read fails with LeaseExpired.
        """
        _, res = self.machine(shard).apply(st.expire_leased_reader, reader_id)
        return res is True

    def verify(self, shard: str) -> VerifyReport:
        return verify(self, ShardId(shard))

    def stop_compaction(self, *, grace: float = 1.0, timeout: float = 5.0) -> bool:
        """Stop background compaction for good (bounded; see `BackgroundCompactor.stop`).

        The client stays usable otherwise: `compact()` still works on demand.
        Returns True when no compactor thread is left running.
        """
        with self._vlock:
            compactor = self._compactor
        return True if compactor is None else bool(compactor.stop(grace=grace, timeout=timeout))

    def close(self, *, timeout: float = 5.0) -> None:
        """Stop background work and close consensus. Idempotent; bounded by about `timeout` seconds.

        Compaction requests not yet started are dropped (the next process, or the
        next request, compacts them); a merge in flight may finish for a second,
        then it is interrupted (its output parts are left for gc).

        SUBTLE: the compactor is a daemon thread; one still inside DuckDB when the
        interpreter exits aborts the process (SIGABRT). close (and the exit hook,
        for clients nobody closed) stops it and joins it first.
        """
        if self._closed:
            return
        self._closed = True
        _OPEN_CLIENTS.discard(self)
        self.stop_compaction(grace=min(1.0, timeout), timeout=timeout)
        self.consensus.close()


class SinceHandle:
    """A critical since handle: holds since until told otherwise, fenced by `opaque`."""

    def __init__(self, machine: Machine, reader_id: str, opaque: Any, since: Frontier):
        self.machine = machine
        self.shard_id = machine.shard_id
        self.reader_id = reader_id
        self.opaque = opaque
        self._since = since

    @property
    def since(self) -> Frontier:
        return self._since

    def compare_and_downgrade_since(
        self, expected_opaque: Any, new: tuple[Any, Frontier | int | None]
    ) -> Frontier | st.OpaqueMismatch:
        """Downgrade to `new = (new_opaque, new_since)` iff the stored opaque is `expected_opaque`.

        Returns the new since, or `OpaqueMismatch(actual)` (nothing changed) when another
        holder moved the opaque on. A holder whose own opaque is an int epoch lower than
        the stored one is fenced: it gets `Fenced`.
        """
        new_opaque, new_since = new
        f = Frontier.of(new_since)
        _, res = self.machine.apply(st.compare_and_downgrade_since, self.reader_id, expected_opaque, new_opaque, f)
        if isinstance(res, st.OpaqueMismatch):
            if _is_epoch(res.actual) and _is_epoch(expected_opaque) and res.actual > expected_opaque:
                raise Fenced(
                    f"shard {self.shard_id}: critical reader {self.reader_id} was taken over by epoch "
                    f"{res.actual} (this holder has epoch {expected_opaque})"
                )
            return res
        self.opaque = new_opaque
        self._since = res.since
        return res.since


def _is_epoch(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def open(
    root: str | os.PathLike[str],
    *,
    consensus: str | Consensus | None = None,
    blob: Blob | None = None,
    clock: Callable[[], int] | None = None,
    fsync: bool = True,
    read_only: bool = False,
) -> Client:
    """Open the shards under `root`: `root/consensus.sqlite` and `root/blob/` by default.

    Args:
        root: a directory; created if missing.
        consensus: None (SQLite under root), `postgresql://...`, or a Consensus object.
        blob: a Blob; default `LocalBlob(root/blob)`.
        clock: milliseconds since the epoch; injectable for tests.
        fsync: fsync parts before they are referenced (default True).
        read_only: read what is there, on a directory this process cannot write
            (a read-only mount, another user's store): nothing is created, the
            SQLite consensus is opened read-only, and leased readers are not
            registered (nothing can compact or collect under them there; a store
            that another process does write may then raise `CorruptPart` for a
            part collected during a read, never return a wrong answer). Any write
            raises `ReadOnly`.
    """
    root_s = os.fspath(root)
    if not root_s:
        raise InvalidInput("storage.open: root must be a directory path")
    if not read_only:
        os.makedirs(root_s, exist_ok=True)
    cons = consensus if consensus is not None and not isinstance(consensus, str) else open_consensus(
        consensus, os.path.join(root_s, "consensus.sqlite"), read_only=read_only
    )
    b = blob if blob is not None else LocalBlob(os.path.join(root_s, "blob"), fsync=fsync, create=not read_only)
    c = Client(root_s, cons, b, clock or wall_clock_ms)
    c.read_only = read_only
    return c


# ---- interpreter exit ----
# Every client not yet closed. Weak: a dropped client is not kept alive by this.
_OPEN_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _stop_background_work() -> None:
    """At interpreter exit: stop every open client's background threads before DuckDB goes.

    SUBTLE: registered with `threading._register_atexit` when there is one: those
    hooks run in `threading._shutdown`, before non-daemon threads are joined and
    before any `atexit` hook (DuckDB's and `storage.read`'s among them), so no
    compactor is inside DuckDB when its objects are torn down. Only the
    background threads are stopped here; consensus connections are left to the
    interpreter (another thread may still be using them).
    """
    for c in list(_OPEN_CLIENTS):
        comp = c._compactor
        if comp is not None:
            try:
                comp.stop(grace=0.0, timeout=10.0)
            except Exception:  # noqa: BLE001 - exiting: best effort, never raise
                pass


def _register_exit_hook() -> None:
    reg = getattr(threading, "_register_atexit", None)
    if reg is not None:
        try:
            reg(_stop_background_work)
            return
        except RuntimeError:  # interpreter already shutting down
            pass
    atexit.register(_stop_background_work)


_register_exit_hook()

"""Introspection collections, in schema `system`: the controller's view of itself, queryable.

| collection                    | kind         | columns                                               |
|-------------------------------|--------------|-------------------------------------------------------|
| `system.frontiers`            | differential | object_id, read_frontier, write_frontier              |
| `system.shard_mapping`        | differential | collection, shard_id                                  |
| `system.source_status_history`| append-only  | occurred_at, source_id, status, error                 |
| `system.sink_status_history`  | append-only  | occurred_at, sink_id, status, error                   |
| `system.statistics`           | differential | object_id, rows, bytes, updates_staged, updates_committed |

Frontiers are NULL when empty (closed). `occurred_at` is the controller's clock
(ms since the epoch). Status histories skip a status equal to the object's
current one, and at start-up keep only the last N rows per object.

`Introspection` keeps these collections: it creates them at start-up, reports
statuses, recomputes the differential ones from the controller's state on every
tick and writes them through the collection manager. A broken `system.*`
collection is tolerated (`failed`), never a fault of the whole store.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import duckdb
import pyarrow as pa

from ..errors import (
    ConsensusUnavailable,
    Fenced,
    InvalidInput,
    OutOfSpace,
    ShardNotFound,
    UpperMismatch,
)
from ..frontier import Frontier
from ..updates import DIFF, qident
from .catalog import CollectionDesc
from .collection_mgmt import Controller, at_time, raw_snapshot
from .desired import rows_schema
from .records import _Coll

log = logging.getLogger("storage.controller")

# The system.* shards whose failure this process already reported (`Introspection.failed`):
# one warning line per broken collection per process, however many controllers it opens.
_INTRO_WARNED: set[str] = set()
_INTRO_WARNED_LOCK = threading.Lock()

FRONTIERS = "system.frontiers"
SHARD_MAPPING = "system.shard_mapping"
SOURCE_STATUS = "system.source_status_history"
SINK_STATUS = "system.sink_status_history"
STATISTICS = "system.statistics"

SCHEMAS: dict[str, pa.Schema] = {
    FRONTIERS: pa.schema(
        [
            pa.field("object_id", pa.string(), nullable=False),
            pa.field("read_frontier", pa.int64()),
            pa.field("write_frontier", pa.int64()),
        ]
    ),
    SHARD_MAPPING: pa.schema(
        [pa.field("collection", pa.string(), nullable=False), pa.field("shard_id", pa.string(), nullable=False)]
    ),
    SOURCE_STATUS: pa.schema(
        [
            pa.field("occurred_at", pa.int64(), nullable=False),
            pa.field("source_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
        ]
    ),
    SINK_STATUS: pa.schema(
        [
            pa.field("occurred_at", pa.int64(), nullable=False),
            pa.field("sink_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
        ]
    ),
    STATISTICS: pa.schema(
        [
            pa.field("object_id", pa.string(), nullable=False),
            pa.field("rows", pa.int64(), nullable=False),
            pa.field("bytes", pa.int64(), nullable=False),
            pa.field("updates_staged", pa.int64(), nullable=False),
            pa.field("updates_committed", pa.int64(), nullable=False),
        ]
    ),
}

DIFFERENTIAL = (FRONTIERS, SHARD_MAPPING, STATISTICS)
APPEND_ONLY = (SOURCE_STATUS, SINK_STATUS)
# The id column of each status history: keep-last-N and deduplication are per value of it.
STATUS_ID = {SOURCE_STATUS: "source_id", SINK_STATUS: "sink_id"}


class Introspection:
    """The `system.*` collections of one controller (call it under the controller's lock)."""

    def __init__(self, ctl: Controller):
        self.ctl = ctl
        self._last_status: dict[tuple[str, str], tuple[str, str | None]] = {}

    def setup(self) -> None:
        """Create the missing collections (when writable), start their write tasks, load the statuses."""
        ctl, mgmt = self.ctl, self.ctl._mgmt
        missing = [n for n in SCHEMAS if n not in ctl._colls]
        if missing and not ctl.read_only:
            ctl._create([CollectionDesc(n, SCHEMAS[n], "introspection") for n in missing], system=True)
        for n in DIFFERENTIAL:
            c = ctl._colls.get(n)
            if c is not None and c.write.kind is None:
                try:
                    mgmt.register_differential(c, init_from_persisted=False)
                except Exception as e:  # noqa: BLE001 - see failed()
                    self.failed(c, "reading it at start-up", e)
        for n in APPEND_ONLY:
            c = ctl._colls.get(n)
            if c is not None and c.write.kind is None:
                mgmt.appender(c)
                try:
                    self._load_statuses(c)
                except Exception as e:  # noqa: BLE001 - see failed()
                    self.failed(c, "reading its statuses at start-up", e)
        self.refresh()

    def failed(self, c: _Coll, what: str, e: Exception) -> None:
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
        ctl = self.ctl
        upper = ctl._mgmt.shard_upper(c)
        if upper.is_empty or upper.time in (None, 0):
            return
        assert upper.time is not None
        snap = raw_snapshot(ctl.client, c.shard_id, c.name, upper.time - 1)
        if snap.num_rows == 0:
            return
        idc = STATUS_ID[c.name]
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
                f"SELECT {cols}, -{DIFF} AS {DIFF} FROM ({ranked}) WHERE rn > {int(ctl.status_keep_last)}"
            ).to_arrow_table()
        finally:
            con.close()
        if old.num_rows == 0 or ctl.read_only:
            return
        # Retract the old rows at the old upper, in one batch [upper, upper + 1).
        ctl._check_epoch()
        try:
            ctl._mgmt.writer(c).compare_and_append(
                at_time(old.cast(rows_schema(c.meta.schema)), upper.time), upper, upper.time + 1
            )
            ctl._advance(c, Frontier(upper.time + 1))
        except UpperMismatch:
            log.info("collection %s: keep-last-N lost a race; retried at the next start", c.name)

    def report(self, coll: str, oid: str, status: str, error: str | None) -> bool:
        """Queue a status row unless it equals the object's current status; True if queued."""
        ctl = self.ctl
        if not isinstance(oid, str) or not isinstance(status, str):
            raise InvalidInput(f"{coll}: object id and status must be strings, got {oid!r}, {status!r}")
        with ctl._lock:
            c = ctl._colls.get(coll)
            if ctl.read_only or c is None or c.write.appender is None:
                return False
            if self._last_status.get((coll, oid)) == (status, error):
                return False
            rows = pa.Table.from_pylist(
                [{"occurred_at": ctl.clock(), STATUS_ID[coll]: oid, "status": status, "error": error}],
                schema=c.meta.schema,
            )
            self._last_status[(coll, oid)] = (status, error)
            appender = c.write.appender
        appender.append(rows, wait=False)
        return True

    def refresh(self) -> None:
        """Recompute the desired contents of the differential introspection collections."""
        ctl = self.ctl
        desired = ctl._mgmt.desired
        everything = dict(ctl._colls)
        fr = everything.get(FRONTIERS)
        if fr is not None and fr.write.kind == "differential":
            rows = [
                {"object_id": n, "read_frontier": c.read.since.time, "write_frontier": c.read.write_frontier.time}
                for n, c in sorted(everything.items())
            ]
            desired.replace(fr.name, _with_diff(rows, fr.meta.schema))
        sm = everything.get(SHARD_MAPPING)
        if sm is not None and sm.write.kind == "differential":
            rows = [{"collection": n, "shard_id": c.shard_id} for n, c in sorted(everything.items())]
            desired.replace(sm.name, _with_diff(rows, sm.meta.schema))
        stc = everything.get(STATISTICS)
        if stc is not None and stc.write.kind == "differential":
            rows = []
            for n, c in sorted(everything.items()):
                if n in SCHEMAS:
                    continue  # statistics of user collections only: ours change on every tick
                try:
                    s = ctl.client.machine(c.shard_id).fetch()
                    nrows, nbytes = sum(b.rows for b in s.batches), sum(b.bytes for b in s.batches)
                except ShardNotFound:
                    nrows = nbytes = 0
                rows.append({"object_id": n, "rows": nrows, "bytes": nbytes,
                             "updates_staged": c.stats.staged, "updates_committed": c.stats.committed})
            desired.replace(stc.name, _with_diff(rows, stc.meta.schema))

    def commit(self) -> None:
        """Write the differential introspection collections; a broken one is tolerated (`failed`)."""
        for n in DIFFERENTIAL:
            sc = self.ctl._colls.get(n)
            if sc is not None and sc.write.kind == "differential":
                try:
                    self.ctl._mgmt.diff_commit(sc)
                except Exception as e:  # noqa: BLE001 - see failed()
                    self.failed(sc, "writing it", e)


def _with_diff(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    t = pa.Table.from_pylist(rows, schema=schema)
    return t.append_column(pa.field(DIFF, pa.int64(), nullable=False), pa.repeat(pa.scalar(1, pa.int64()), t.num_rows))

"""`PostgresSource`: change data capture from one PostgreSQL table over logical replication.

How it reads:

1. **Snapshot.** On a first run (no resume offset) it creates the logical
   replication slot over a replication connection with an *exported snapshot*
   (`CREATE_REPLICATION_SLOT ... LOGICAL pgoutput (SNAPSHOT 'export')`), and
   copies the table in a `REPEATABLE READ` transaction on that snapshot. The
   snapshot is exactly the table as of the slot's consistent point `C`: every
   transaction committed before `C` is in it, every later one is streamed. Its
   rows are emitted at `_time = C`, then `Progress(C + 1)`.
2. **Stream.** It polls `pg_logical_slot_peek_binary_changes(slot, ..., 'proto_version',
   '1', 'publication_names', publication)` and decodes the `pgoutput` messages
   (Begin, Relation, Insert, Update, Delete, Commit). An insert is `+1`, a delete
   `-1`, an update `-1` of the old row and `+1` of the new one, all at the
   transaction's time.

Times: the LSN just past the transaction's commit record (pgoutput Commit's
`end_lsn`, as an int). It is strictly increasing in commit order and larger
than the snapshot's `C`.

Offset: that same LSN of the last emitted transaction (`C` after the
snapshot). Off-by-one rule: a resumed partition emits only transactions whose
commit ends *after* the committed offset.

Delivery: **exactly-once**, given that the sink commits each batch's offsets in
the same compare-and-set as its data. The slot is only *peeked*, never consumed:
a change stays in the slot until it is known durable. The slot is advanced
(`pg_replication_slot_advance`) to the resume offset when the source starts, and
to offsets passed to `PostgresSource.ack()` (call it after the offsets are
durable) on the next poll. Without acks, each poll re-decodes the changes since
the last restart (they are skipped, not re-emitted): call `ack()` to keep polls
cheap and to let PostgreSQL recycle WAL.

Slots: one per pipeline. A slot is a cursor that only one consumer may move:
two pipelines sharing one lose rows (one's first run, or its acks, move the
other's cursor). So the slot is named after a `pipeline_id` stored with the
pipeline's collection (its shard id in `examples/postgres_cdc.py`): the same data
dir finds its slot after a restart, another data dir gets another slot. The
source drops only slots it created: its own (pipeline-named) leftover of a first
run that died before its first commit, and the slot of a first run that fails
before the snapshot is emitted. On resume, and after every peek, the slot must
exist and must not be past the source's offset; otherwise it stops with an
error naming the slot and both LSNs, rather than re-snapshotting (which would
double rows) or skipping changes.

Why `REPLICA IDENTITY FULL`: a retraction needs the *whole* old row. With the
default identity pgoutput sends only the key columns of an updated or deleted
row (or nothing), so the source refuses such tables, with the statement to fix
it. Clear errors also cover `wal_level != logical`, a missing publication or a
table not in it, and a missing slot on resume. TRUNCATE is not supported: it
raises; publish without it (`WITH (publish = 'insert, update, delete')`).

Types: integers, floats, booleans, text types, date, timestamp(tz) (as UTC) and
numeric with a declared precision map to their Arrow types; bytea to binary;
anything else (json, uuid, numeric without precision, ...) to its text form.

Example (needs a server; see tests/connectors/test_postgres_cdc.py)::

    src = PostgresSource(dsn, "public.orders", publication="orders_pub", mode="continuous",
                         pipeline_id=shard_id, resume=committed_offsets)
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql

from storage import Frontier, Progress, UpdateBatch, update_schema
from storage.errors import InvalidInput

from .base import Item, UpdatePartition, UpdateSource, awake_in, partition_key, stop_requested
from .errors import PostgresCdcError

__all__ = ["PostgresCdcError", "PostgresSource", "format_lsn", "parse_lsn", "pg_type_to_arrow", "slot_name"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def parse_lsn(text: str) -> int:
    """`'16/B374D848'` -> int."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    """int -> `'16/B374D848'`."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


_SIMPLE_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(),
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    700: pa.float32(),
    701: pa.float64(),
    1082: pa.date32(),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"),
    17: pa.binary(),
}


def pg_type_to_arrow(type_oid: int, typmod: int) -> pa.DataType:
    """The Arrow type of a column of PostgreSQL type `type_oid` (text form if not mapped)."""
    if type_oid in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[type_oid]
    if type_oid == 1700 and typmod >= 4:  # numeric(p, s)
        p, s = ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF
        if 1 <= p <= 38:
            return pa.decimal128(p, s)
    return pa.string()


def _from_text(arr: pa.Array, t: pa.DataType) -> pa.Array:
    """PostgreSQL text output (strings) -> Arrow values of type `t` (vectorised)."""
    if t == pa.string():
        return arr
    if t == pa.bool_():
        return pc.equal(arr, pa.scalar("t", pa.string()))
    if t == pa.binary():
        # bytea_output = hex: "\x0102..."; rare enough for a Python loop.
        return pa.array([None if v is None else bytes.fromhex(v[2:]) for v in arr.to_pylist()], pa.binary())
    return arr.cast(t)


@dataclass
class _Column:
    name: str
    type_oid: int
    typmod: int
    not_null: bool


@dataclass
class _Txn:
    end_lsn: int = 0
    rows: list[tuple[list[str | None], int]] = field(default_factory=list)  # (values, diff)
    messages: int = 0


class PostgresSource(UpdateSource):
    """CDC of one table (one partition, one replication slot). See the module docstring.

    Args:
        dsn: libpq connection string of the database. The role needs the
            REPLICATION attribute (for the slot) and SELECT on the table.
        table: `"schema.table"` or `"table"` (schema `public`).
        publication: A publication that includes the table.
        pipeline_id: An id stored with the pipeline's collection, e.g. its shard
            id (`ctx.collection(...)` returns it). The slot is named after it,
            `"shardflow_<name>_<12 hex of sha256(pipeline_id)>"`, so a restarted
            pipeline finds its slot again and another pipeline (another data
            dir) on the same table gets its own. Required unless `slot` is given.
        slot: An explicit replication slot name instead. The source advances the
            slot, so it must belong to this pipeline alone. An explicit slot is
            never dropped: if it exists before a first run, that is an error.
        mode: `"continuous"` streams until `request_stop()`; `"batch"` reads the
            changes committed up to when it started, then ends.
        name: Source name, the prefix of the partition key; default the table name.
        poll_interval: Seconds between polls when idle.
        max_changes: Changes decoded per poll at most (whole transactions).
        resume: `{partition key: LSN}` from the shard's metadata.

    Raises (when the partition is built):
        PostgresCdcError: the server or table is not set up for CDC; the message
            says which statement fixes it. Also: on resume, the slot is missing or
            was advanced past the committed offset (by another consumer); on a
            first run, an explicit slot already exists.

    Slots: the source drops a slot only if it created it, i.e. a slot named
    after its own `pipeline_id` that a first run left behind (it died before its
    first commit), or the slot its own first run just created when that run
    fails before emitting the snapshot.
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        *,
        publication: str,
        slot: str | None = None,
        mode: Literal["batch", "continuous"] = "continuous",
        name: str | None = None,
        pipeline_id: str | None = None,
        poll_interval: float = 0.2,
        max_changes: int = 10_000,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(resume=resume)
        schema_name, _, table_name = table.rpartition(".")
        schema_name = schema_name or "public"
        for what, ident in (("schema", schema_name), ("table", table_name), ("publication", publication)):
            if not _IDENT.match(ident):
                raise InvalidInput(f"PostgresSource: {what} name {ident!r} is not a plain identifier")
        if mode not in ("batch", "continuous"):
            raise InvalidInput(f"PostgresSource: mode must be 'batch' or 'continuous', got {mode!r}")
        self.dsn = dsn
        self.schema_name = schema_name
        self.table_name = table_name
        self.qualified = f"{schema_name}.{table_name}"
        self.publication = publication
        self.name = name or table_name
        self.pipeline_id = pipeline_id
        #: True when the slot is named after `pipeline_id`: only this pipeline creates it.
        self.own_slot = slot is None and pipeline_id is not None
        self.slot: str | None = slot
        if slot is None and pipeline_id is not None:
            if not isinstance(pipeline_id, str) or not pipeline_id:
                raise InvalidInput(f"PostgresSource {self.name!r}: pipeline_id must be a non-empty str, got {pipeline_id!r}")
            self.slot = slot_name(self.name, pipeline_id)
        if self.slot is not None and not re.match(r"^[a-z0-9_]{1,63}$", self.slot):
            raise InvalidInput(f"PostgresSource: slot name {self.slot!r} must match [a-z0-9_]{{1,63}}")
        self.mode = mode
        self.poll_interval = poll_interval
        self.max_changes = max_changes
        self.key = partition_key(self.name, 0)
        self._acked: dict[str, int] = {}
        self._ack_lock = threading.Lock()

    def list_parts(self) -> list[str]:
        return [self.key]

    def build_partition(self, key: str, resume_offset: Any) -> _PgPartition:
        if self.slot is None:
            raise InvalidInput(
                f"PostgresSource {self.name!r} on {self.qualified}: give pipeline_id= (an id stored with the "
                f"collection, e.g. the shard id ctx.collection() returns) or slot=; a slot shared by two "
                f"pipelines loses rows"
            )
        if resume_offset is not None and (not isinstance(resume_offset, int) or resume_offset < 0):
            raise InvalidInput(f"PostgresSource {self.name!r}: resume offset must be an LSN int, got {resume_offset!r}")
        return _PgPartition(self, key, resume_offset)

    def check(self) -> None:
        """Check, before the flow runs, what building its partition would check.

        The setup (as `row_schema`); on a resume, that the slot exists and was not
        advanced past the committed offset; on a first run, SELECT on the table and
        that an explicit slot does not exist yet. Raises `PostgresCdcError` as the
        partition would, but from the flow's build, where it is one clear line
        rather than an error inside the running dataflow. Nothing is created or
        dropped (on a resume the slot is advanced to the committed offset, as a run does).
        """
        part = self.build_partition(self.key, self.resume.get(self.key))
        try:
            if part.last is None:
                part.check_first_run()
        finally:
            part.close()

    def ack(self, offsets: Mapping[str, Any]) -> None:
        """Tell the source these offsets are durable; the slot advances to them on the next poll."""
        with self._ack_lock:
            for k, v in offsets.items():
                if k == self.key and isinstance(v, int):
                    self._acked[k] = max(v, self._acked.get(k, 0))

    def acked(self, key: str) -> int | None:
        with self._ack_lock:
            return self._acked.get(key)

    def row_schema(self) -> pa.Schema:
        """The table's row schema as this source emits it (connects and checks the setup).

        Use it to create the collection before the flow runs.
        """
        with _connect(self.dsn) as conn:
            return _arrow_schema(self.check_setup(conn))

    # ---- introspection, shared with the partition ----
    def check_setup(self, conn: psycopg.Connection[Any]) -> list[_Column]:
        """Validate wal_level, table, replica identity and publication; return the columns."""
        t = self.qualified
        wal = _one(conn, "SHOW wal_level")[0]
        if wal != "logical":
            raise PostgresCdcError(
                f"PostgreSQL wal_level is {wal!r}, CDC of {t} needs 'logical': run "
                f"ALTER SYSTEM SET wal_level = logical; and restart the server"
            )
        row = conn.execute(
            "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (self.schema_name, self.table_name),
        ).fetchone()
        if row is None:
            raise PostgresCdcError(f"table {t} does not exist (source {self.name!r})")
        oid, ident = row
        if ident != "f":
            kind = {"d": "DEFAULT", "n": "NOTHING", "i": "USING INDEX"}.get(ident, ident)
            raise PostgresCdcError(
                f"table {t} has REPLICA IDENTITY {kind}: updates and deletes would not carry the whole old row, "
                f"so they cannot be retracted; run ALTER TABLE {t} REPLICA IDENTITY FULL"
            )
        if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)).fetchone() is None:
            raise PostgresCdcError(
                f"publication {self.publication!r} does not exist: run CREATE PUBLICATION {self.publication} FOR TABLE {t}"
            )
        in_pub = conn.execute(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s AND tablename = %s",
            (self.publication, self.schema_name, self.table_name),
        ).fetchone()
        if in_pub is None:
            raise PostgresCdcError(
                f"table {t} is not in publication {self.publication!r}: run ALTER PUBLICATION {self.publication} ADD TABLE {t}"
            )
        cols = conn.execute(
            "SELECT attname, atttypid::int, atttypmod, attnotnull FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            (oid,),
        ).fetchall()
        return [_Column(n, int(o), int(m), bool(nn)) for n, o, m, nn in cols]


def slot_name(name: str, pipeline_id: str) -> str:
    """The replication slot of pipeline `pipeline_id`'s source `name`: `shardflow_<name>_<12 hex>` (<= 63 chars)."""
    clean = re.sub(r"[^a-z0-9_]", "_", name.lower())[:40]
    return f"shardflow_{clean}_{hashlib.sha256(pipeline_id.encode()).hexdigest()[:12]}"


class _PgPartition(UpdatePartition):
    def __init__(self, src: PostgresSource, key: str, resume: int | None) -> None:
        self.src = src
        self.key = key
        self.keys = (key,)
        self.offset = resume
        self.conn = _connect(src.dsn)
        self.columns = src.check_setup(self.conn)
        self.row_schema = _arrow_schema(self.columns)
        self.schema = update_schema(self.row_schema)
        self.last: int | None = resume  # end LSN of the last emitted transaction (or C)
        self.confirmed: int | None = None  # the slot's confirmed_flush_lsn as we last set/saw it
        self.unacked: list[tuple[int, int]] = []  # (end_lsn, messages) emitted but not yet advanced past
        self.frontier = 0  # last Progress emitted
        self.stop_at: int | None = None  # batch mode: the flush LSN when streaming started
        self._awake: datetime | None = None
        self._done = False
        self._started = False
        if resume is not None:
            self._check_slot_for_resume(resume)

    # ---- slot ----
    def _slot_row(self, slot: str | None = None) -> tuple[str, str | None, bool] | None:
        return self.conn.execute(
            "SELECT plugin, confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = %s",
            (slot or self.src.slot,),
        ).fetchone()

    def _check_slot_for_resume(self, resume: int) -> None:
        row = self._slot_row()
        s = self.src
        if row is None:
            raise self._vanished(resume)
        plugin, confirmed, _active = row
        if plugin != "pgoutput":
            raise PostgresCdcError(f"replication slot {s.slot!r} uses plugin {plugin!r}, not 'pgoutput'")
        c = parse_lsn(confirmed) if confirmed else 0
        if c > resume:
            raise self._ahead(c, resume)
        self.confirmed = c
        self._advance(resume)

    def _check_slot_unchanged(self) -> None:
        """After a peek: the slot still exists, and nobody advanced it past where this source left it.

        SUBTLE: checked *after* the peek: had another consumer advanced the slot
        before it, the peek would have silently started past changes this source
        never emitted.
        """
        row = self._slot_row()
        assert self.confirmed is not None  # INVARIANT: set by the snapshot or the resume check
        if row is None:
            raise self._vanished(self.confirmed, "acknowledged offset")
        c = parse_lsn(row[1]) if row[1] else 0
        if c > self.confirmed:
            raise self._ahead(c, self.confirmed, "acknowledged offset")

    def _vanished(self, committed: int, what: str = "committed offset") -> PostgresCdcError:
        s = self.src
        msg = (
            f"replication slot {s.slot!r} does not exist, but source {s.name!r} has {what} "
            f"LSN {format_lsn(committed)} (table {s.qualified}): the changes after it are lost, and a new "
            f"snapshot would double or lose rows. To start over, drop the collection and rerun"
        )
        legacy = re.sub(r"[^a-z0-9_]", "_", f"shardflow_{s.name}".lower())
        if s.own_slot and legacy != s.slot and self._slot_row(legacy) is not None:
            # NB: slots used to be named shardflow_<table>, shared by every pipeline on the table.
            msg += (
                f"; a slot {legacy!r} of the old naming exists: if this pipeline created it, "
                f"keep using it with slot={legacy!r}"
            )
        return PostgresCdcError(msg)

    def _ahead(self, confirmed: int, committed: int, what: str = "committed offset") -> PostgresCdcError:
        s = self.src
        return PostgresCdcError(
            f"replication slot {s.slot!r} was advanced to confirmed_flush_lsn {format_lsn(confirmed)}, past "
            f"source {s.name!r}'s {what} LSN {format_lsn(committed)} (table {s.qualified}): the "
            f"changes in between are gone; another consumer uses this slot? To start over, drop the "
            f"collection and the slot and rerun"
        )

    def _advance(self, lsn: int) -> None:
        if self.confirmed is not None and lsn <= self.confirmed:
            return
        try:
            self.conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.src.slot, format_lsn(lsn)))
        except psycopg.errors.UndefinedObject:
            raise self._vanished(lsn, "acknowledged offset") from None
        self.confirmed = lsn
        self.unacked = [u for u in self.unacked if u[0] > lsn]

    def check_first_run(self) -> tuple[str, str | None, bool] | None:
        """SELECT on the table, and an existing slot is this pipeline's own; returns the slot's row."""
        s = self.src
        self._check_select()
        row = self._slot_row()
        if row is not None and not s.own_slot:
            raise PostgresCdcError(
                f"replication slot {s.slot!r} already exists, but source {s.name!r} (table {s.qualified}) has "
                f"no committed offset, so this pipeline did not create it and will not drop it: choose "
                f"another slot, or, if it is a leftover of this pipeline, SELECT pg_drop_replication_slot('{s.slot}')"
            )
        return row

    def _snapshot(self) -> list[Item]:
        s = self.src
        row = self.check_first_run()
        if row is not None:
            # Named after this pipeline's id, so this pipeline created it; with no committed
            # offset nothing read from it was durable: a first run died before its first commit.
            if row[2]:
                raise PostgresCdcError(
                    f"replication slot {s.slot!r} of source {s.name!r} is in use by another connection "
                    f"(another copy of this pipeline still taking its first snapshot?)"
                )
            self.conn.execute("SELECT pg_drop_replication_slot(%s)", (s.slot,))
        try:
            rconn = psycopg.connect(s.dsn, replication="database", autocommit=True)
        except psycopg.Error as e:
            raise PostgresCdcError(
                f"cannot open a replication connection for slot {s.slot!r}: {e}".strip()
                + " (the role needs the REPLICATION attribute: ALTER ROLE <role> REPLICATION)"
            ) from None
        created = False
        try:
            try:
                syntax = "(SNAPSHOT 'export')" if self.conn.info.server_version >= 150000 else "EXPORT_SNAPSHOT"
                res = rconn.pgconn.exec_(f'CREATE_REPLICATION_SLOT "{s.slot}" LOGICAL pgoutput {syntax}'.encode())
                if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
                    msg = (res.error_message or b"").decode(errors="replace").strip()
                    raise PostgresCdcError(f"cannot create replication slot {s.slot!r}: {msg}")
                created = True
                consistent = parse_lsn(bytes(res.get_value(0, 1) or b"").decode())
                snapshot_name = bytes(res.get_value(0, 2) or b"").decode()
                data = self._copy_table(snapshot_name)
            finally:
                rconn.close()
            items = self._snapshot_items(data, consistent)
        except BaseException:
            # SUBTLE: nothing of this slot was emitted, so nothing can be committed against it;
            # left behind it would hold WAL until someone drops it by hand.
            if created:
                self._drop_own_slot()
            raise
        return items

    def _check_select(self) -> None:
        s = self.src
        ok = self.conn.execute(
            "SELECT has_table_privilege(c.oid, 'SELECT'), current_user FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (s.schema_name, s.table_name),
        ).fetchone()
        if ok is not None and not ok[0]:
            raise PostgresCdcError(
                f"role {ok[1]!r} lacks SELECT on table {s.qualified}, needed for the first snapshot of source "
                f"{s.name!r}: run GRANT SELECT ON {s.qualified} TO {ok[1]}"
            )

    def _drop_own_slot(self) -> None:
        # The replication connection that created the slot is closed, so it is inactive
        # (a backend may take a moment to exit: retry briefly).
        for _ in range(50):
            try:
                self.conn.execute("SELECT pg_drop_replication_slot(%s)", (self.src.slot,))
                return
            except psycopg.errors.ObjectInUse:
                threading.Event().wait(0.05)
            except psycopg.Error:
                return

    def _snapshot_items(self, data: bytes, consistent: int) -> list[Item]:
        strings = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=self.row_schema.names, use_threads=False),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in self.row_schema.names},
                strings_can_be_null=True,
                null_values=[""],
                quoted_strings_can_be_null=False,
            ),
        ) if data else None
        cols = (
            [self._convert(strings.column(i).combine_chunks(), f) for i, f in enumerate(self.row_schema)]
            if strings is not None
            else [pa.array([], f.type) for f in self.row_schema]
        )
        n = len(cols[0]) if cols else 0
        table = self._table(cols, pa.repeat(pa.scalar(consistent, pa.int64()), n), pa.repeat(pa.scalar(1, pa.int64()), n))
        self.last = consistent
        self.confirmed = consistent
        self.offset = consistent
        self.frontier = consistent + 1
        return [
            UpdateBatch(table, Frontier(consistent), Frontier(consistent + 1), offsets={self.key: consistent}),
            Progress(Frontier(self.frontier), partition=self.key, partitions=self.keys),
        ]

    def _copy_table(self, snapshot_name: str) -> bytes:
        with _connect(self.src.dsn, autocommit=False) as c:
            c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            c.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
            q = sql.SQL("COPY (SELECT {} FROM {}.{}) TO STDOUT WITH (FORMAT csv)").format(
                sql.SQL(", ").join(sql.Identifier(col.name) for col in self.columns),
                sql.Identifier(self.src.schema_name),
                sql.Identifier(self.src.table_name),
            )
            buf = io.BytesIO()
            with c.cursor().copy(q) as cp:
                for chunk in cp:
                    buf.write(chunk)
            c.rollback()
        return buf.getvalue()

    def _convert(self, arr: pa.Array, f: pa.Field) -> pa.Array:
        try:
            return _from_text(arr, f.type)
        except (pa.ArrowInvalid, ValueError) as e:
            raise PostgresCdcError(
                f"table {self.src.qualified} column {f.name!r}: a value has no {f.type} form: {e}"
            ) from None

    def _table(self, cols: list[pa.Array], times: pa.Array, diffs: pa.Array) -> pa.Table:
        try:
            return pa.Table.from_arrays([*cols, times, diffs], schema=self.schema)
        except (pa.ArrowInvalid, ValueError) as e:
            raise PostgresCdcError(f"table {self.src.qualified}: cannot build updates: {e}") from None

    # ---- streaming ----
    def next_batch(self) -> list[Item]:
        if self._done:
            raise StopIteration()
        if not self._started:
            # Initial progress, so downstream knows this partition exists before
            # the (possibly long) snapshot: nothing before the resume point comes.
            self._started = True
            self.frontier = 0 if self.last is None else self.last + 1
            return [Progress(Frontier(self.frontier), partition=self.key, partitions=self.keys)]
        if self.last is None:
            return self._snapshot()
        if self.src.mode == "continuous" and stop_requested():
            self._done = True
            return [Progress(Frontier(self.frontier), partition=self.key, partitions=self.keys)]
        acked = self.src.acked(self.key)
        if acked is not None and self.last is not None:
            self._advance(min(acked, self.last))
        return self._poll()

    def _poll(self) -> list[Item]:
        s = self.src
        flush = parse_lsn(_one(self.conn, "SELECT pg_current_wal_flush_lsn()::text")[0])
        if s.mode == "batch" and self.stop_at is None:
            self.stop_at = flush
        limit = s.max_changes + sum(m for _, m in self.unacked)
        try:
            rows = self.conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, "
                "'proto_version', '1', 'publication_names', %s)",
                (s.slot, limit, s.publication),
            ).fetchall()
        except psycopg.errors.UndefinedObject:
            assert self.confirmed is not None  # INVARIANT: set by the snapshot or the resume check
            raise self._vanished(self.confirmed, "acknowledged offset") from None
        caught_up = len(rows) < limit
        self._check_slot_unchanged()
        txns = self._decode([bytes(r[0]) for r in rows])
        assert self.last is not None
        new = [t for t in txns if t.end_lsn > self.last]
        items: list[Item] = []
        if new:
            changes = [(vals, diff, t.end_lsn) for t in new for vals, diff in t.rows]
            cols = [
                self._convert(pa.array([c[0][i] for c in changes], pa.string()), f)
                for i, f in enumerate(self.row_schema)
            ]
            times = pa.array([c[2] for c in changes], pa.int64())
            diffs = pa.array([c[1] for c in changes], pa.int64())
            table = self._table(cols, times, diffs)
            self.last = new[-1].end_lsn
            self.offset = self.last
            self.unacked.extend((t.end_lsn, t.messages) for t in new)
            items.append(UpdateBatch(table, Frontier(new[0].end_lsn), Frontier(self.last + 1), offsets={self.key: self.last}))
        # SUBTLE: every transaction whose commit record lies before `flush` (read
        # before the peek) was decoded, so later ones end after `flush`.
        frontier = max(self.last + 1, flush) if caught_up else self.last + 1
        if frontier > self.frontier:
            self.frontier = frontier
            items.append(Progress(Frontier(frontier), partition=self.key, partitions=self.keys))
        if s.mode == "batch" and caught_up and self.stop_at is not None and flush >= self.stop_at:
            self._done = True
            if not items:
                items.append(Progress(Frontier(self.frontier), partition=self.key, partitions=self.keys))
        self._awake = None if (new and not caught_up) else awake_in(s.poll_interval)
        return items

    def _decode(self, messages: list[bytes]) -> list[_Txn]:
        """pgoutput v1 messages -> complete transactions, with this table's changes."""
        out: list[_Txn] = []
        cur: _Txn | None = None
        rel_ok: dict[int, bool] = {}
        ncols = len(self.columns)
        for m in messages:
            kind = m[:1]
            if cur is not None:
                cur.messages += 1
            if kind == b"B":
                cur = _Txn(messages=1)
            elif kind == b"C":
                if cur is not None:
                    _flags, _commit_lsn, end_lsn, _ts = struct.unpack_from(">bqqq", m, 1)
                    cur.end_lsn = end_lsn
                    out.append(cur)
                cur = None
            elif kind == b"R":
                relid, ns, rel, cols, types = _decode_relation(m)
                mine = ns == self.src.schema_name and rel == self.src.table_name
                rel_ok[relid] = mine
                if mine and cols != [c.name for c in self.columns]:
                    raise PostgresCdcError(
                        f"table {self.src.qualified} changed its columns to {cols} while the source reads "
                        f"{[c.name for c in self.columns]}; schema changes are not supported: recreate the collection"
                    )
                if mine:
                    self._check_types(types)
            elif kind in (b"I", b"U", b"D"):
                (relid,) = struct.unpack_from(">i", m, 1)
                if not rel_ok.get(relid) or cur is None:
                    continue
                self._decode_change(kind, m, cur, ncols)
            elif kind == b"T":
                nrel = struct.unpack_from(">i", m, 1)[0]
                relids = struct.unpack_from(f">{nrel}i", m, 6)
                if any(rel_ok.get(r) for r in relids):
                    raise PostgresCdcError(
                        f"table {self.src.qualified} was truncated; TRUNCATE is not supported by CDC: re-snapshot "
                        f"(drop the collection) and publish without truncate: ALTER PUBLICATION {self.src.publication} "
                        f"SET (publish = 'insert, update, delete')"
                    )
            # 'Y' (type), 'O' (origin), 'M' (message): nothing to do.
        return out

    def _check_types(self, types: list[tuple[int, int]]) -> None:
        """A column whose type changed (as its Arrow type) is a schema change, even if its values would cast.

        SUBTLE: values travel as text, so `ALTER COLUMN v TYPE text` followed by '42'
        would be taken as the int 42 without this check, and 'abc' would fail later
        with an unrelated cast error.
        """
        for c, (oid, typmod) in zip(self.columns, types, strict=True):
            was, now = pg_type_to_arrow(c.type_oid, c.typmod), pg_type_to_arrow(oid, typmod)
            if was != now:
                raise PostgresCdcError(
                    f"table {self.src.qualified}: column {c.name!r} changed type from {_pg_type_name(c.type_oid, c.typmod)} "
                    f"({was}) to {_pg_type_name(oid, typmod)} ({now}); schema changes are not supported: "
                    f"recreate the collection"
                )

    def _decode_change(self, kind: bytes, m: bytes, txn: _Txn, ncols: int) -> None:
        pos = 5
        t = self.src.qualified
        if kind == b"I":
            new, _ = _decode_tuple(m, pos + 1)
            txn.rows.append((new, 1))
            return
        tag = m[pos : pos + 1]
        if tag != b"O":
            raise PostgresCdcError(
                f"table {t}: an update/delete came without the whole old row (REPLICA IDENTITY is not FULL); "
                f"run ALTER TABLE {t} REPLICA IDENTITY FULL and re-snapshot (drop the collection)"
            )
        old, pos = _decode_tuple(m, pos + 1)
        if kind == b"D":
            txn.rows.append((old, -1))
            return
        new, _ = _decode_tuple(m, pos + 1)  # skip the 'N'
        # 'u': an unchanged TOASTed value is not sent; it equals the old one.
        new = [o if v is _UNCHANGED else v for v, o in zip(new, old, strict=True)]
        txn.rows.append((old, -1))
        txn.rows.append((new, 1))

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        self.conn.close()


_UNCHANGED: Any = object()


def _arrow_schema(columns: list[_Column]) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, pg_type_to_arrow(c.type_oid, c.typmod), nullable=not c.not_null) for c in columns]
    )


_PG_TYPE_NAMES = {
    16: "boolean", 20: "bigint", 21: "smallint", 23: "integer", 25: "text", 700: "real", 701: "double precision",
    1043: "character varying", 1082: "date", 1114: "timestamp", 1184: "timestamptz", 1700: "numeric",
    2950: "uuid", 114: "json", 3802: "jsonb", 17: "bytea",
}


def _pg_type_name(oid: int, typmod: int) -> str:
    name = _PG_TYPE_NAMES.get(oid, f"type oid {oid}")
    if oid == 1700 and typmod >= 4:
        return f"numeric({((typmod - 4) >> 16) & 0xFFFF},{(typmod - 4) & 0xFFFF})"
    return name


def _cstring(m: bytes, pos: int) -> tuple[str, int]:
    end = m.index(b"\0", pos)
    return m[pos:end].decode(), end + 1


def _decode_relation(m: bytes) -> tuple[int, str, str, list[str], list[tuple[int, int]]]:
    """A Relation message -> (relid, namespace, name, column names, [(type oid, typmod)])."""
    (relid,) = struct.unpack_from(">i", m, 1)
    ns, pos = _cstring(m, 5)
    rel, pos = _cstring(m, pos)
    pos += 1  # replica identity setting
    (n,) = struct.unpack_from(">h", m, pos)
    pos += 2
    cols = []
    types = []
    for _ in range(n):
        pos += 1  # flags
        name, pos = _cstring(m, pos)
        oid, typmod = struct.unpack_from(">Ii", m, pos)
        pos += 8
        cols.append(name)
        types.append((oid, typmod))
    return relid, ns or "pg_catalog", rel, cols, types


def _decode_tuple(m: bytes, pos: int) -> tuple[list[Any], int]:
    """TupleData at `pos` -> (values as text or None or _UNCHANGED, position after it)."""
    (n,) = struct.unpack_from(">h", m, pos)
    pos += 2
    vals: list[Any] = []
    for _ in range(n):
        k = m[pos : pos + 1]
        pos += 1
        if k == b"n":
            vals.append(None)
        elif k == b"u":
            vals.append(_UNCHANGED)
        elif k == b"t":
            (ln,) = struct.unpack_from(">i", m, pos)
            pos += 4
            vals.append(m[pos : pos + ln].decode())
            pos += ln
        else:
            raise PostgresCdcError(f"pgoutput: unexpected tuple column kind {k!r}")
    return vals, pos


def _one(conn: psycopg.Connection[Any], query: str) -> tuple[Any, ...]:
    row = conn.execute(query).fetchone()
    assert row is not None  # INVARIANT: SHOW and SELECT of a function return one row
    return tuple(row)


def _connect(dsn: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit)
    except psycopg.Error as e:
        raise PostgresCdcError(f"cannot connect to PostgreSQL: {str(e).strip()}") from None
    # Text output in a fixed, parseable form (pgoutput formats values in this session).
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("SET DateStyle = 'ISO, YMD'")
    conn.execute("SET bytea_output = 'hex'")
    conn.execute("SET extra_float_digits = 3")
    if not autocommit:
        conn.commit()
    return conn


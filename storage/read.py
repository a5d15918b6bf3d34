"""The read path: snapshots and listens, with leased readers that hold back since."""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from . import state as st
from .errors import LeaseExpired, NotYetReadable, ReadBeforeSince, Tombstone
from .frontier import Frontier
from .updates import (
    DIFF,
    TIME,
    Progress,
    UpdateBatch,
    consolidate,
    diff_sum_sql,
    overflow_checked,
    qident,
    update_schema,
)

if TYPE_CHECKING:
    from .client import Client
    from .machine import Machine

DEFAULT_LEASE_MS = 60_000
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_BATCH_ROWS = 100_000  # snapshot_reader; measured, 5M rows compacted: peak RSS 218 MB vs 310 MB at 1M, same time


_SNAP_DB_LOCK = threading.Lock()
_SNAP_DB: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (pid, database)


def snapshot_cursor() -> duckdb.DuckDBPyConnection:
    """A fresh cursor on one process-wide in-memory DuckDB used for snapshot queries.

    Measured (bench/snapshot.py, 8M rows): `duckdb.connect()` + `close()` cost ~23 ms
    per snapshot (a new database each time: ~10% of a compacted snapshot), a cursor on
    a shared database ~0. Each cursor is its own DuckDB connection, so concurrent
    snapshots from several threads are safe and `register`ed tables stay per cursor.
    SUBTLE: re-created after a fork (a DuckDB instance must not cross fork()).

    Settings (global to this database, which runs nothing but snapshots):
    - preserve_insertion_order=false: a snapshot is a multiset, so DuckDB may
      aggregate and materialise in parallel without keeping input order.
    - threads = 2 x cores on machines of <= 2 cores: measured on 2 cores, the
      GROUP BY over 10M (string, int) keys takes 0.85 s with 4 threads vs 1.25 s
      with 2 (DuckDB's default; 3 threads: 0.84 s, 6: 0.87 s); plain reads are not
      slower. Larger machines keep DuckDB's default (not measured).
    """
    global _SNAP_DB
    pid = os.getpid()
    with _SNAP_DB_LOCK:
        if _SNAP_DB is None or _SNAP_DB[0] != pid:
            db = duckdb.connect()
            db.execute("SET preserve_insertion_order = false")
            cores = os.cpu_count() or 1
            if cores <= 2:
                db.execute(f"SET threads = {2 * cores}")
            _SNAP_DB = (pid, db)
        return _SNAP_DB[1].cursor()


@atexit.register
def _close_snapshot_db() -> None:
    """Close the shared database before interpreter teardown (DuckDB objects alive then
    make its bindings print "leaked instance" warnings after everything else)."""
    global _SNAP_DB
    with _SNAP_DB_LOCK:
        if _SNAP_DB is not None and _SNAP_DB[0] == os.getpid():
            _SNAP_DB[1].close()
        _SNAP_DB = None


def _sleep_backoff(attempt: int) -> None:
    # SUBTLE: cap the exponent; 1.5 ** attempt overflows a float after ~1750 polls of a long listen.
    time.sleep(min(0.005 * (1.5 ** min(attempt, 16)), 0.1))


def tombstone_error(shard_id: str) -> Tombstone:
    return Tombstone(f"shard {shard_id}: finalized (a tombstone); it takes no reads or writes")


def parts_source(client: Client, s: st.ShardState, batches: list[st.BatchMeta], con: duckdb.DuckDBPyConnection, name: str) -> str:
    """Verify the parts of `batches` and return a DuckDB FROM-clause over them.

    Local parts are read by DuckDB straight from their files; parts on a remote
    blob are fetched, verified and registered as one Arrow table under `name`.
    An empty list yields an empty relation with the shard's update schema.
    """
    parts = [(b, p) for b in batches for p in b.parts]
    schema = update_schema(s.schema)
    if not parts:
        con.register(name, schema.empty_table())
        return qident(name)
    paths = []
    tables = []
    for b, p in parts:
        path = client.verify_part(s.shard_id, b, p)
        if path is not None:
            paths.append(path)
        else:
            tables.append(client.read_part(s.shard_id, b, p))
    if tables:
        for path in paths:
            import pyarrow.parquet as pq

            tables.append(pq.read_table(path))
        t = pa.concat_tables([_conform(x, schema) for x in tables])
        con.register(name, t)
        return qident(name)
    lst = "[" + ", ".join("'" + x.replace("'", "''") + "'" for x in paths) + "]"
    if s.schema_changed:
        # Older parts lack added (nullable) columns; union_by_name fills them with NULL.
        cols = ", ".join(f"CAST({qident(f.name)} AS {_duck_type(con, f.type)}) AS {qident(f.name)}" for f in schema)
        return f"(SELECT {cols} FROM read_parquet({lst}, union_by_name=true))"
    return f"read_parquet({lst})"


def _duck_type(con: duckdb.DuckDBPyConnection, t: pa.DataType) -> str:
    rel = con.from_arrow(pa.table({"x": pa.array([], type=t)}))
    return str(rel.types[0])


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        if f.name in t.schema.names:
            cols.append(t.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def snapshot_sql(s: st.ShardState, src: str, as_of: int, *, what: str | None = None) -> str:
    """The snapshot at `as_of` over `src`; `what` names the shard in an overflow error
    (e.g. `collection 'bids' (shard s1..)`; default `shard <id>`)."""
    cols = [qident(n) for n in s.schema.names]
    sel = ", ".join(cols)
    # Overflow-checked: a count outside int64 raises (DiffOverflow under overflow_checked()).
    total = diff_sum_sql(cols, what or f"shard {s.shard_id}")
    if not cols:
        return f"SELECT {total} AS {DIFF} FROM {src} WHERE {TIME} <= {as_of} HAVING sum({DIFF}) <> 0"
    return (
        f"SELECT {sel}, {total} AS {DIFF} FROM {src} WHERE {TIME} <= {as_of} "
        f"GROUP BY {sel} HAVING sum({DIFF}) <> 0"
    )


def is_collapsed(b: st.BatchMeta, as_of: int) -> bool:
    """True iff `b` holds each row at most once, at one time `<= as_of`: its snapshot needs no GROUP BY.

    That is a consolidated batch (compaction's output) whose since reached its
    last time, so the merge advanced every update to `upper - 1` (see
    `storage.compact.advance_time`).
    """
    if not b.consolidated or b.upper.is_empty or b.since.is_empty:
        return False
    last = b.upper.time - 1  # type: ignore[operator]
    return b.since.time >= last and last <= as_of  # type: ignore[operator]


def collapsed_sql(s: st.ShardState, src: str) -> str:
    cols = ", ".join([*(qident(n) for n in s.schema.names), DIFF])
    return f"SELECT {cols} FROM {src}"


def snapshot_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field(DIFF, pa.int64(), nullable=False))


class ReadHandle:
    """A leased reader: it holds the shard's since at its own since while its lease lives.

    A background thread heartbeats the lease every `lease_ms / 3`. Use it as a
    context manager, or call `expire()` when done, so it stops holding since back.

    Example:
        >>> import pyarrow as pa, storage, tempfile
        >>> client = storage.open(tempfile.mkdtemp())
        >>> shard = storage.ShardId.new()
        >>> w = client.open_writer(shard, schema=pa.schema([("k", pa.string())]))
        >>> _ = w.compare_and_append(pa.table({"k": ["a", "a", "b"], "_time": [1, 2, 3], "_diff": [1, 1, 1]}), 0, 5)
        >>> with client.open_leased_reader(shard) as r:
        ...     sorted(r.snapshot(as_of=2).to_pylist(), key=str)
        [{'k': 'a', '_diff': 2}]
    """

    def __init__(self, client: Client, machine: Machine, reader_id: str, lease_ms: int, heartbeat: bool = True):
        self.client = client
        self.machine = machine
        self.shard_id = machine.shard_id
        self.reader_id = reader_id
        self.lease_ms = lease_ms
        self._lock = threading.Lock()
        self._inflight: Counter[int] = Counter()
        self._last_seqno = 0
        self._since = Frontier.MIN
        self._expired = False
        self._stop = threading.Event()
        s, r = self.machine.apply(lambda s, now: st.register_leased_reader(s, reader_id, lease_ms=lease_ms, now_ms=now))
        self._since = r.since
        self._last_seqno = r.seqno
        self.schema = s.schema
        self._thread: threading.Thread | None = None
        if heartbeat:
            self._thread = threading.Thread(target=self._heartbeat_loop, name=f"lease-{reader_id}", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"ReadHandle(shard={self.shard_id}, reader={self.reader_id}, since={self._since})"

    def __enter__(self) -> ReadHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.expire()

    # ---- lease ----
    def _check_live(self) -> None:
        if self._expired:
            raise LeaseExpired(f"shard {self.shard_id}: leased reader {self.reader_id} has expired; open a new reader")

    def _check_lease(self, s: st.ShardState) -> None:
        """Raise LeaseExpired if `s` no longer has this reader live (by the client's clock)."""
        r = s.leased_readers.get(self.reader_id)
        if r is None or r.lease_expires_ms <= self.client.clock():
            self._expired = True
            self._stop.set()
            self._check_live()

    def _pin(self) -> int:
        with self._lock:
            return min(self._inflight) if self._inflight else self._last_seqno

    def heartbeat(self) -> None:
        """Extend the lease and release state versions this reader no longer reads."""
        self._check_live()
        pin = self._pin()
        try:
            self.machine.apply(lambda s, now: st.heartbeat_leased_reader(s, self.reader_id, pin_seqno=pin, now_ms=now))
        except (LeaseExpired, Tombstone):
            self._expired = True
            raise

    def _heartbeat_loop(self) -> None:
        interval = max(self.lease_ms / 3000.0, 0.05)
        while not self._stop.wait(interval):
            try:
                self.heartbeat()
            except Exception:  # noqa: BLE001 - an expired or dead reader just stops beating
                return

    @property
    def since(self) -> Frontier:
        return self._since

    def downgrade_since(self, since: Frontier | int | None) -> Frontier:
        """Let compaction advance times up to `since`. A since only moves forward."""
        self._check_live()
        f = Frontier.of(since)
        try:
            _, res = self.machine.apply(lambda s, now: st.downgrade_since(s, self.reader_id, f, now_ms=now))
        except LeaseExpired:
            self._expired = True
            raise
        self._since = res.since
        return res.since

    def expire(self) -> None:
        """Stop holding since back. Idempotent."""
        self._stop.set()
        if self._expired:
            return
        self._expired = True
        try:
            self.machine.apply(lambda s, now: (st.expire_leased_reader(s, self.reader_id, now_ms=now), None))
        except Tombstone:
            pass

    @contextmanager
    def _reading(self, s: st.ShardState) -> Iterator[None]:
        with self._lock:
            self._inflight[s.seqno] += 1
            self._last_seqno = max(self._last_seqno, s.seqno)
        try:
            yield
        finally:
            with self._lock:
                self._inflight[s.seqno] -= 1
                if self._inflight[s.seqno] <= 0:
                    del self._inflight[s.seqno]

    def _fetch_live(self) -> st.ShardState:
        """The shard's state, checked: not a tombstone, and this reader's lease still live.

        An expired reader no longer holds since back, so what it would read next may
        already be compacted or collected: it must stop.
        """
        s = self.machine.fetch()
        if s.is_tombstone:
            raise tombstone_error(self.shard_id)
        self._check_lease(s)
        return s

    # ---- snapshot ----
    def wait_for_upper_past(self, as_of: int, timeout: float | None) -> st.ShardState:
        """Wait until `as_of` is readable: `since <= as_of < upper`."""
        self._check_live()
        deadline = time.monotonic() + (DEFAULT_TIMEOUT_S if timeout is None else timeout)
        attempt = 0
        while True:
            s = self._fetch_live()
            if not s.since.less_equal(as_of):
                raise ReadBeforeSince(f"shard {self.shard_id}: as_of {as_of} is before since {s.since.time}")
            if not s.upper.less_equal(as_of):
                return s
            if time.monotonic() >= deadline:
                waited = DEFAULT_TIMEOUT_S if timeout is None else timeout
                raise NotYetReadable(
                    f"shard {self.shard_id}: as_of {as_of} is not readable yet (upper {s.upper}) after waiting {waited:g}s"
                )
            _sleep_backoff(attempt)
            attempt += 1

    def snapshot(self, as_of: int, *, timeout: float | None = None) -> pa.Table:
        """The consolidated contents at `as_of`: the schema's columns plus `_diff` (never 0).

        Every update at a time `<= as_of` counts; rows whose diffs sum to zero are
        dropped. Waits up to `timeout` seconds (default 10) for the upper to pass `as_of`.

        Raises:
            ReadBeforeSince: `as_of` is before the shard's since.
            NotYetReadable: the upper did not pass `as_of` in time.
            CorruptPart: a part is missing or does not match its sha256.
            DiffOverflow: a row's diffs sum past int64 (names the shard and the row).
        """
        as_of = _as_time(as_of)
        s = self.wait_for_upper_past(as_of, timeout)
        with self._reading(s):
            batches = [b for b in s.batches if b.lower.less_equal(as_of) and b.parts]
            con = snapshot_cursor()  # insertion order not preserved: a snapshot is a multiset
            try:
                src = parts_source(self.client, s, batches, con, "__parts")
                if len(batches) == 1 and is_collapsed(batches[0], as_of):
                    sql = collapsed_sql(s, src)
                else:
                    sql = snapshot_sql(s, src, as_of)
                with overflow_checked():
                    out = con.sql(sql).to_arrow_table()
            finally:
                con.close()
        return out.cast(snapshot_schema(s.schema))

    def snapshot_reader(
        self, as_of: int, *, timeout: float | None = None, batch_size: int = DEFAULT_BATCH_ROWS
    ) -> pa.RecordBatchReader:
        """`snapshot(as_of)` as a stream of record batches of at most `batch_size` rows.

        Same rows and columns as `snapshot` (schema columns plus `_diff`), for
        results too large to hold as one table. The state version read stays
        pinned (gc keeps its parts) and the DuckDB cursor stays open until the
        reader is exhausted or closed: close it (or use it as a context manager)
        when stopping early. Errors below are raised here, not at the first batch.

        Raises:
            ReadBeforeSince: `as_of` is before the shard's since.
            NotYetReadable: the upper did not pass `as_of` in time.
            CorruptPart: a part is missing or does not match its sha256.

        Example:
            >>> import pyarrow as pa, storage, tempfile
            >>> client = storage.open(tempfile.mkdtemp())
            >>> shard = storage.ShardId.new()
            >>> w = client.open_writer(shard, schema=pa.schema([("k", pa.int64())]))
            >>> _ = w.compare_and_append(pa.table({"k": range(10), "_time": [0] * 10, "_diff": [1] * 10}), 0, 1)
            >>> with client.open_leased_reader(shard) as r, r.snapshot_reader(0, batch_size=4) as reader:
            ...     sum(b.num_rows for b in reader), reader.schema.names
            (10, ['k', '_diff'])
        """
        as_of = _as_time(as_of)
        s = self.wait_for_upper_past(as_of, timeout)
        schema = snapshot_schema(s.schema)
        with ExitStack() as stack:
            stack.enter_context(self._reading(s))
            con = snapshot_cursor()
            stack.callback(con.close)
            batches = [b for b in s.batches if b.lower.less_equal(as_of) and b.parts]
            src = parts_source(self.client, s, batches, con, "__parts")
            collapsed = len(batches) == 1 and is_collapsed(batches[0], as_of)
            sql = collapsed_sql(s, src) if collapsed else snapshot_sql(s, src, as_of)
            with overflow_checked():
                duck = con.sql(sql).to_arrow_reader(batch_size)
            stack.callback(duck.close)
            gen = _stream(stack.pop_all(), duck, schema)
        next(gen)  # start it: from now on closing the generator (or collecting it) runs its cleanup
        # SUBTLE: from_batches' close() does not drop its iterator, so the pin would
        # live until the reader is garbage; re-imported through the C stream
        # interface, close() releases the stream and with it the generator.
        return pa.RecordBatchReader.from_stream(pa.RecordBatchReader.from_batches(schema, gen))

    def snapshot_updates(self, as_of: int, *, timeout: float | None = None) -> UpdateBatch:
        """The snapshot as updates at time `as_of` (for subscribe and the shard source)."""
        t = self.snapshot(as_of, timeout=timeout)
        times = pa.repeat(pa.scalar(as_of, pa.int64()), t.num_rows)
        upd = t.drop_columns([DIFF]).append_column(pa.field(TIME, pa.int64(), nullable=False), times)
        upd = upd.append_column(pa.field(DIFF, pa.int64(), nullable=False), t.column(DIFF))
        return UpdateBatch(upd, Frontier.MIN, Frontier(as_of + 1))

    # ---- listen ----
    def listen(self, as_of: int, *, timeout: float | None = None) -> Iterator[UpdateBatch | Progress]:
        """Yield the updates at times `> as_of` as they commit, then `Progress(upper)`.

        Each `UpdateBatch` holds consolidated updates with times in
        `[lower, upper)`, followed by `Progress(upper)`. Snapshot at `as_of`
        followed by listen from `as_of` is exact: nothing lost, nothing repeated.
        The iterator ends after `Progress(Frontier.EMPTY)` (the shard was closed),
        or when nothing new came for `timeout` seconds (default: wait forever).
        """
        as_of = _as_time(as_of)
        self._check_live()
        s0 = self._fetch_live()
        if not s0.since.less_equal(as_of):
            raise ReadBeforeSince(f"shard {self.shard_id}: as_of {as_of} is before since {s0.since.time}")
        # SUBTLE: the checks above run at the call, not at the first next(): the loop is a separate generator.
        return self._listen(as_of, timeout)

    def _listen(self, as_of: int, timeout: float | None) -> Iterator[UpdateBatch | Progress]:
        frontier = Frontier(as_of + 1)
        last_event = time.monotonic()
        attempt = 0
        while True:
            s = self._fetch_live()
            # SUBTLE: exactness needs since <= frontier - 1 on every poll, not only at the start.
            # Compaction advances times below since up to since; once since passes what was
            # delivered, an update already delivered could reappear at time since >= frontier.
            assert frontier.time is not None  # INVARIANT: we return right after an empty frontier
            if not s.since.less_equal(frontier.time - 1):
                raise ReadBeforeSince(
                    f"shard {self.shard_id}: listen delivered times < {frontier.time} but since moved to "
                    f"{s.since}; hold the reader's since at or before the listen's progress"
                )
            if frontier < s.upper:
                with self._reading(s):
                    batches = [b for b in s.batches if frontier < b.upper and b.parts]
                    t = self._read_range(s, batches, frontier, s.upper)
                if t.num_rows:
                    yield UpdateBatch(t, frontier, s.upper)
                yield Progress(s.upper)
                frontier = s.upper
                last_event = time.monotonic()
                attempt = 0
                if frontier.is_empty:
                    return
                continue
            if timeout is not None and time.monotonic() - last_event >= timeout:
                return
            _sleep_backoff(attempt)
            attempt += 1

    def subscribe(self, as_of: int, *, timeout: float | None = None) -> Iterator[UpdateBatch | Progress]:
        """The snapshot at `as_of` as one batch of updates at `as_of`, then `listen(as_of)`."""
        snap = self.snapshot_updates(as_of, timeout=timeout)
        if snap.num_rows:
            yield snap
        yield Progress(Frontier(as_of + 1))
        yield from self.listen(as_of, timeout=timeout)

    def _read_range(self, s: st.ShardState, batches: list[st.BatchMeta], lo: Frontier, hi: Frontier) -> pa.Table:
        schema = update_schema(s.schema)
        if not batches:
            return schema.empty_table()
        con = duckdb.connect()
        try:
            src = parts_source(self.client, s, batches, con, "__parts")
            where = f"{TIME} >= {lo.time}" + ("" if hi.is_empty else f" AND {TIME} < {hi.time}")
            t = con.sql(f"SELECT * FROM {src} WHERE {where}").to_arrow_table()
        finally:
            con.close()
        return consolidate(t.cast(schema), where=f"shard {s.shard_id}")


def _stream(cleanup: ExitStack, duck: pa.RecordBatchReader, schema: pa.Schema) -> Iterator[pa.RecordBatch | None]:
    """Yield None once (the caller's priming `next`), then `duck`'s batches cast to `schema`; clean up at the end."""
    with cleanup:
        yield None
        with overflow_checked():
            for b in duck:
                yield b if b.schema == schema else b.cast(schema)


def _as_time(t: Any) -> int:
    from .errors import InvalidInput

    if isinstance(t, Frontier):
        if t.time is None:
            raise InvalidInput("as_of must be a time, not the empty frontier")
        t = t.time
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise InvalidInput(f"as_of must be an int64 time >= 0, got {t!r}")
    return t

"""The read path: snapshots and listens, with leased readers that hold back since."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import duckdb
import pyarrow as pa

from . import connections
from . import state as st
from ._compute import pc
from .errors import LeaseExpired, NegativeCount, NotYetReadable, ReadBeforeSince, Tombstone
from .frontier import Frontier
from .machine import Machine
from .parts import PartsSource, ShardEnv, parts_source, parts_source_with_diffs
from .updates import (
    DIFF,
    TIME,
    Progress,
    UpdateBatch,
    consolidate_sql,
    overflow_checked,
    qident,
    update_schema,
)

DEFAULT_LEASE_MS = 60_000
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_BATCH_ROWS = 100_000  # snapshot_reader; measured, 5M rows compacted: peak RSS 218 MB vs 310 MB at 1M, same time


#: A cursor on the process-wide read database (see `storage.connections`); the caller closes it.
snapshot_cursor = connections.cursor


def _sleep_backoff(attempt: int) -> None:
    # SUBTLE: cap the exponent; 1.5 ** attempt overflows a float after ~1750 polls of a long listen.
    time.sleep(min(0.005 * (1.5 ** min(attempt, 16)), 0.1))


def tombstone_error(shard_id: str) -> Tombstone:
    return Tombstone(f"shard {shard_id}: finalized (a tombstone); it takes no reads or writes")


def find_negative(
    con: duckdb.DuckDBPyConnection, s: st.ShardState, ps: PartsSource, as_of: int | None
) -> dict[str, Any] | None:
    """The first row whose count is negative, as `{columns..., _time, _diff}`; None if there is none.

    `as_of` an int: the snapshot at `as_of`. None: every readable time, i.e. the
    snapshot at each time in `[since, upper)` (times below since count at since).

    Only rows with at least one negative update can have a negative count, so
    only those are summed: a scan for the candidates, a semi-join and a GROUP BY
    over the candidates alone; cheaper than consolidating everything. Run it
    before any filter of the caller's: a filtered query must not skip the check.
    """
    src = ps.src
    cols = [qident(n) for n in s.schema.names]
    since = s.since.time if s.since.time is not None else 0
    on = " AND ".join(f"p.{c} IS NOT DISTINCT FROM c.{c}" for c in cols)
    pcols = ", ".join(f"p.{c}" for c in cols)
    if as_of is not None and cols and ps.neg is not None:
        # Two stages: updates from parts with no negative diff add >= 0 to a count, so a row
        # can only end negative if its sum over the `neg` parts is; only those rows are then
        # looked up in the `pos` parts (often none are left, and `pos` is not read at all).
        n_on = " AND ".join(f"n.{c} IS NOT DISTINCT FROM q.{c}" for c in cols)
        ncols = ", ".join(f"n.{c}" for c in cols)
        n = (f"SELECT {', '.join(cols)}, sum({DIFF}) AS __d FROM {ps.neg} WHERE {TIME} <= {as_of} "
             f"GROUP BY ALL HAVING sum({DIFF}) < 0")
        if ps.pos is None:
            q = f"SELECT {', '.join(cols)}, 0 AS __s FROM n WHERE false"
        else:
            q = (f"SELECT {pcols}, sum(p.{DIFF}) AS __s FROM {ps.pos} AS p SEMI JOIN n AS c ON {on} "
                 f"WHERE p.{TIME} <= {as_of} GROUP BY ALL")
        sql = (
            f"WITH n AS ({n}), q AS ({q}) "
            f"SELECT {ncols}, {as_of}::BIGINT AS {TIME}, (n.__d + coalesce(q.__s, 0))::BIGINT AS {DIFF} "
            f"FROM n LEFT JOIN q ON {n_on} WHERE n.__d + coalesce(q.__s, 0) < 0 LIMIT 1"
        )
    elif as_of is not None:
        if not cols:
            sql = (f"SELECT {as_of}::BIGINT AS {TIME}, sum({DIFF})::BIGINT AS {DIFF} FROM {src} "
                   f"WHERE {TIME} <= {as_of} HAVING sum({DIFF}) < 0")
        else:
            sql = (
                f"WITH c AS (SELECT DISTINCT {', '.join(cols)} FROM {src} WHERE {DIFF} < 0 AND {TIME} <= {as_of}) "
                f"SELECT {pcols}, {as_of}::BIGINT AS {TIME}, sum(p.{DIFF})::BIGINT AS {DIFF} "
                f"FROM {src} AS p SEMI JOIN c ON {on} WHERE p.{TIME} <= {as_of} "
                f"GROUP BY {pcols} HAVING sum(p.{DIFF}) < 0 LIMIT 1"
            )
    else:
        part = f"PARTITION BY {', '.join(cols)} " if cols else ""
        if not cols:
            g = f"SELECT greatest({TIME}, {since}) AS {TIME}, sum({DIFF}) AS __d FROM {src} GROUP BY 1"
        else:
            g = (
                f"WITH c AS (SELECT DISTINCT {', '.join(cols)} FROM {src} WHERE {DIFF} < 0) "
                f"SELECT {pcols}, greatest(p.{TIME}, {since}) AS {TIME}, sum(p.{DIFF}) AS __d "
                f"FROM {src} AS p SEMI JOIN c ON {on} GROUP BY ALL"
            )
        sel = ", ".join([*cols, TIME])
        sql = (
            f"SELECT {sel}, __acc::BIGINT AS {DIFF} FROM (SELECT {sel}, sum(__d) OVER ({part}ORDER BY {TIME}) AS __acc "
            f"FROM ({g})) WHERE __acc < 0 ORDER BY {TIME} LIMIT 1"
        )
    rows = con.sql(sql).to_arrow_table().to_pylist()
    return rows[0] if rows else None


def negative_count_error(what: str, row: dict[str, Any]) -> NegativeCount:
    """`NegativeCount` for a row from `find_negative`; `what` names the shard or collection."""
    vals = {k: v for k, v in row.items() if k not in (TIME, DIFF)}
    msg = (
        f"{what}: row {vals} has negative count {row[DIFF]} at time {row[TIME]} "
        f"(more retractions than insertions); the collection is invalid there"
    )
    return NegativeCount(msg)


def check_counts(con: duckdb.DuckDBPyConnection, s: st.ShardState, ps: PartsSource, as_of: int | None, what: str) -> None:
    """Raise `NegativeCount` if a count is negative (see `find_negative`); free when statistics prove none can be."""
    if ps.diffs is not None and ps.diffs[0] >= 0:
        return  # no negative update at all: no count can be negative
    row = find_negative(con, s, ps, as_of)
    if row is not None:
        raise negative_count_error(what, row)


def snapshot_sql(s: st.ShardState, src: str, as_of: int, *, what: str | None = None) -> str:
    """The snapshot at `as_of` over `src` (`updates.consolidate_sql` with `as_of`); `what` names
    the shard in an overflow error (e.g. `collection 'bids' (shard s1..)`; default `shard <id>`)."""
    return consolidate_sql(src, s.schema.names, where=what or f"shard {s.shard_id}", as_of=as_of)


def snapshot_source(
    client: ShardEnv, s: st.ShardState, as_of: int, con: duckdb.DuckDBPyConnection, *, diffs: bool = False,
    what: str | None = None,
) -> tuple[str, PartsSource]:
    """The one snapshot path: the query of the snapshot of `s` at `as_of`, over its parts registered on `con`.

    Reads the batches that start at or before `as_of` (verified, see `parts_source`);
    a single collapsed batch is a plain scan, anything else consolidates
    (`snapshot_sql`). `diffs`: the returned `PartsSource` carries the parts'
    `_diff` statistics, for `check_counts`. Run the query under `overflow_checked()`.
    No waiting, no reader, no negative-count check: the caller decides those.
    """
    batches = [b for b in s.batches if b.lower.less_equal(as_of) and b.parts]
    if diffs:
        ps = parts_source_with_diffs(client, s, batches, con, "__parts")
    else:
        ps = PartsSource(parts_source(client, s, batches, con, "__parts"))
    if len(batches) == 1 and is_collapsed(batches[0], as_of):
        return collapsed_sql(s, ps.src), ps
    return snapshot_sql(s, ps.src, as_of, what=what), ps


def read_snapshot(client: ShardEnv, s: st.ShardState, as_of: int, *, what: str | None = None) -> pa.Table:
    """The snapshot of state version `s` at `as_of` as one table: the schema's columns plus `_diff`.

    Consolidated, with no negative-count check and no reader: the caller makes
    sure the version's parts stay (a reader's pin) or retries on `CorruptPart`.

    Raises:
        CorruptPart: a part is missing or does not match its sha256.
        DiffOverflow: a row's diffs sum past int64 (names `what`, default the shard, and the row).
    """
    with connections.reading() as con:
        sql, _ = snapshot_source(client, s, as_of, con, what=what)
        with overflow_checked():
            out = con.sql(sql).to_arrow_table()
    return out.cast(snapshot_schema(s.schema))


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

    def __init__(self, client: ShardEnv, machine: Machine, reader_id: str, lease_ms: int, heartbeat: bool = True):
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
        # The listen's DuckDB cursor, kept across polls (opening one per poll was measured at
        # up to ~80 ms under load); one thread at a time, pid: not across a fork.
        self._con: tuple[int, duckdb.DuckDBPyConnection] | None = None
        self._con_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # A read-only client (`storage.open(read_only=True)`) cannot register: the reader
        # holds nothing, which is safe where nothing writes (see `storage.open`).
        self._registered = not getattr(client, "read_only", False)
        if not self._registered:
            s = self.machine.fetch()
            if s.is_tombstone:
                raise tombstone_error(self.shard_id)
            self._since, self._last_seqno, self.schema = s.since, s.seqno, s.schema
            return
        s, r = self.machine.apply(st.register_leased_reader, reader_id, lease_ms=lease_ms)
        self._since = r.since
        self._last_seqno = r.seqno
        self.schema = s.schema
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
        if not self._registered:
            return
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
        if not self._registered:
            return
        pin = self._pin()
        try:
            self.machine.apply(st.heartbeat_leased_reader, self.reader_id, pin_seqno=pin)
        except (LeaseExpired, Tombstone):
            self._expired = True
            raise

    def release_versions(self) -> None:
        """Extend the lease and unpin every state version no read of this handle has in flight.

        For a reader that only holds since and reads the shard some other way: a plain
        heartbeat keeps the version of its last read pinned, so gc could delete nothing
        written after it.
        """
        self._check_live()
        with self._lock:
            pin = min(self._inflight) if self._inflight else None
        try:
            s, _ = self.machine.apply(st.heartbeat_leased_reader, self.reader_id, pin_seqno=pin if pin is not None else 2**62)
        except (LeaseExpired, Tombstone):
            self._expired = True
            raise
        if pin is None:
            with self._lock:
                self._last_seqno = max(self._last_seqno, s.seqno)

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
            _, res = self.machine.apply(st.downgrade_since, self.reader_id, f)
        except LeaseExpired:
            self._expired = True
            raise
        self._since = res.since
        return res.since

    def expire(self) -> None:
        """Stop holding since back, and close the listen's connection. Idempotent."""
        self._stop.set()
        with self._con_lock:
            con, self._con = self._con, None
        if con is not None and con[0] == os.getpid():
            con[1].close()
        if self._expired:
            return
        self._expired = True
        if not self._registered:
            return
        try:
            self.machine.apply(st.expire_leased_reader, self.reader_id)
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

    def snapshot(self, as_of: int, *, timeout: float | None = None, validate: bool = True) -> pa.Table:
        """The consolidated contents at `as_of`: the schema's columns plus `_diff` (never 0).

        Every update at a time `<= as_of` counts; rows whose diffs sum to zero are
        dropped. Waits up to `timeout` seconds (default 10) for the upper to pass `as_of`.
        A row with a negative count is an error (`NegativeCount`), as in every read;
        `validate=False` returns it instead, with its negative `_diff`, for callers
        that work on signed contents (tests of the consolidation itself).

        Raises:
            ReadBeforeSince: `as_of` is before the shard's since.
            NotYetReadable: the upper did not pass `as_of` in time.
            NegativeCount: a row's updates sum to a negative count at `as_of`.
            CorruptPart: a part is missing or does not match its sha256.
            DiffOverflow: a row's diffs sum past int64 (names the shard and the row).
        """
        as_of = _as_time(as_of)
        s = self.wait_for_upper_past(as_of, timeout)
        with self._reading(s):
            out = read_snapshot(self.client, s, as_of)
        if validate:
            _check_snapshot(self.shard_id, out, as_of)
        return out

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
            NegativeCount: a row's updates sum to a negative count at `as_of`.
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
            sql, ps = snapshot_source(self.client, s, as_of, con, diffs=True)
            # Checked before the first batch: a stream must not stop half-way on a bad row.
            check_counts(con, s, ps, as_of, f"shard {self.shard_id}")
            with overflow_checked():
                duck = con.sql(sql).to_arrow_reader(batch_size)
            stack.callback(duck.close)
            gen = _stream(stack.pop_all(), duck, schema)
        next(gen)  # start it: from now on closing the generator (or collecting it) runs its cleanup
        # SUBTLE: from_batches' close() does not drop its iterator, so the pin would
        # live until the reader is garbage; re-imported through the C stream
        # interface, close() releases the stream and with it the generator.
        return pa.RecordBatchReader.from_stream(pa.RecordBatchReader.from_batches(schema, gen))

    def validate(self, as_of: int | None = None, *, timeout: float | None = None) -> None:
        """Check that no row has a negative count: at `as_of`, or (None) at every readable time.

        A negative count (a retraction whose insertion never came) makes the
        collection invalid wherever it holds; every snapshot there raises. With
        `as_of=None` this checks each time in `[since, upper)` of the current
        state without waiting; a shard with nothing readable (since == upper) passes.
        This is the check `fsck` runs.

        Raises:
            NegativeCount: naming the first such row (earliest time), its count and time.
            ReadBeforeSince / NotYetReadable: an explicit `as_of`, as in `snapshot`.
            CorruptPart: a part is missing or does not match its sha256.

        Example:
            >>> import pyarrow as pa, storage, tempfile
            >>> client = storage.open(tempfile.mkdtemp())
            >>> shard = storage.ShardId.new()
            >>> w = client.open_writer(shard, schema=pa.schema([("k", pa.int64())]))
            >>> _ = w.compare_and_append(pa.table({"k": [1, 2], "_time": [0, 3], "_diff": [1, -1]}), 0, 5)
            >>> with client.open_leased_reader(shard) as r:
            ...     r.validate(2)
            ...     r.validate()
            Traceback (most recent call last):
            storage.errors.NegativeCount: shard ...: row {'k': 2} has negative count -1 at time 3 (more retractions than insertions); the collection is invalid there
        """
        t: int | None = None
        if as_of is None:
            self._check_live()
            s = self._fetch_live()
            if s.since.time is not None and s.upper.less_equal(s.since.time):
                return  # since == upper: nothing is readable, so nothing can be wrong
        else:
            t = _as_time(as_of)
            s = self.wait_for_upper_past(t, timeout)
        self._check_state(s, t)

    def _check_state(self, s: st.ShardState, t: int | None) -> None:
        """`validate` on the state version `s`: at `t`, or at every time (None)."""
        with self._reading(s):
            batches = [b for b in s.batches if b.parts and (t is None or b.lower.less_equal(t))]
            con = snapshot_cursor()
            try:
                ps = parts_source_with_diffs(self.client, s, batches, con, "__parts")
                check_counts(con, s, ps, t, f"shard {self.shard_id}")
            finally:
                con.close()

    def count(self, as_of: int, *, timeout: float | None = None) -> int:
        """The number of live rows at `as_of`, with multiplicity: `snapshot(as_of)`'s `_diff` summed.

        Computed as the sum of the diffs at times `<= as_of` (one column, no
        consolidation), after the negative-count check, so it is exact.

        Raises:
            ReadBeforeSince / NotYetReadable / NegativeCount / CorruptPart: as in `snapshot`.
        """
        as_of = _as_time(as_of)
        s = self.wait_for_upper_past(as_of, timeout)
        with self._reading(s):
            batches = [b for b in s.batches if b.parts and b.lower.less_equal(as_of)]
            con = snapshot_cursor()
            try:
                ps = parts_source_with_diffs(self.client, s, batches, con, "__parts")
                check_counts(con, s, ps, as_of, f"shard {self.shard_id}")
                sql = f"SELECT coalesce(sum({DIFF}), 0)::BIGINT AS n FROM {ps.src} WHERE {TIME} <= {as_of}"
                n: int = con.sql(sql).to_arrow_table().column(0)[0].as_py()
            finally:
                con.close()
        return n

    def snapshot_updates(self, as_of: int, *, timeout: float | None = None) -> UpdateBatch:
        """The snapshot as updates at time `as_of` (for subscribe and the shard source)."""
        t = self.snapshot(as_of, timeout=timeout)
        times = pa.repeat(pa.scalar(as_of, pa.int64()), t.num_rows)
        upd = t.drop_columns([DIFF]).append_column(pa.field(TIME, pa.int64(), nullable=False), times)
        upd = upd.append_column(pa.field(DIFF, pa.int64(), nullable=False), t.column(DIFF))
        return UpdateBatch(upd, Frontier.MIN, Frontier(as_of + 1))

    # ---- listen ----
    def listen(
        self, as_of: int, *, timeout: float | None = None, validate: bool = False
    ) -> Iterator[UpdateBatch | Progress]:
        """Yield the updates at times `> as_of` as they commit, then `Progress(upper)`.

        Each `UpdateBatch` holds consolidated updates with times in
        `[lower, upper)`, followed by `Progress(upper)`. Snapshot at `as_of`
        followed by listen from `as_of` is exact: nothing lost, nothing repeated.
        The iterator ends after `Progress(Frontier.EMPTY)` (the shard was closed),
        or when nothing new came for `timeout` seconds (default: wait forever).

        Updates are differences, so a retraction is normal here. With
        `validate=True`, a batch that holds a retraction is checked first
        (`validate()` at every time up to its upper: a scan of the shard) and a
        row whose count goes negative raises `NegativeCount` before the batch
        is yielded. Off by default: it costs a scan per such batch.
        """
        as_of = _as_time(as_of)
        self._check_live()
        s0 = self._fetch_live()
        if not s0.since.less_equal(as_of):
            raise ReadBeforeSince(f"shard {self.shard_id}: as_of {as_of} is before since {s0.since.time}")
        # SUBTLE: the checks above run at the call, not at the first next(): the loop is a separate generator.
        return self._listen(as_of, timeout, validate)

    def _listen(self, as_of: int, timeout: float | None, validate: bool) -> Iterator[UpdateBatch | Progress]:
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
                if validate and t.num_rows and pc.min(t.column(DIFF)).as_py() < 0:
                    self._check_state(s, None)
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

    def subscribe(
        self, as_of: int, *, timeout: float | None = None, validate: bool = False
    ) -> Iterator[UpdateBatch | Progress]:
        """The snapshot at `as_of` as one batch of updates at `as_of`, then `listen(as_of)`.

        The snapshot is always checked (`NegativeCount`); `validate` is `listen`'s.
        """
        snap = self.snapshot_updates(as_of, timeout=timeout)
        if snap.num_rows:
            yield snap
        yield Progress(Frontier(as_of + 1))
        yield from self.listen(as_of, timeout=timeout, validate=validate)

    @contextmanager
    def _listen_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """This handle's cursor on the shared read database, opened once and reused by every poll.

        A second thread reading through the same handle meanwhile gets a cursor of its own.
        """
        if not self._con_lock.acquire(blocking=False):
            with connections.reading() as con:
                yield con
            return
        try:
            pid = os.getpid()
            if self._con is None or self._con[0] != pid:
                self._con = (pid, connections.cursor())
            con = self._con[1]
            try:
                yield con
            finally:
                try:
                    con.unregister("__parts")  # a remote part's table: not kept past the poll
                except duckdb.Error:
                    pass
        finally:
            self._con_lock.release()

    def _read_range(self, s: st.ShardState, batches: list[st.BatchMeta], lo: Frontier, hi: Frontier) -> pa.Table:
        """The consolidated updates of `batches` at times in `[lo, hi)`: one query, on the listen's cursor."""
        schema = update_schema(s.schema)
        if not batches:
            return schema.empty_table()
        with self._listen_connection() as con:
            src = parts_source(self.client, s, batches, con, "__parts")
            where = f"{TIME} >= {lo.time}" + ("" if hi.is_empty else f" AND {TIME} < {hi.time}")
            sql = consolidate_sql(f"(SELECT * FROM {src} WHERE {where})", s.schema.names, where=f"shard {s.shard_id}")
            with overflow_checked():
                t = con.sql(sql).to_arrow_table()
        return t.cast(schema)


def _check_snapshot(shard_id: str, out: pa.Table, as_of: int) -> None:
    """Raise NegativeCount if the consolidated snapshot `out` has a negative `_diff` (one vectorised min)."""
    if not out.num_rows:
        return
    lo = pc.min(out.column(DIFF)).as_py()
    if lo is not None and lo < 0:
        bad = out.filter(pc.less(out.column(DIFF), pa.scalar(0, pa.int64()))).slice(0, 1).to_pylist()[0]
        bad[TIME] = as_of
        raise negative_count_error(f"shard {shard_id}", bad)


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

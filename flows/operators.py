"""Bytewax operators over streams of `UpdateBatch` and `Progress` items.

Bytewax does not expose its frontiers, so progress travels in-band: a source
partition emits `Progress(f, partition=key, partitions=all_keys)` when no time
`< f` will come from it any more. The frontier of a stream is the minimum over
the partitions it has heard of (`FrontierTracker`). Operators here emit
`Progress(f)` with `partition=None`: the frontier of their whole output.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from typing import IO, Any

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic

from storage import (
    DIFF,
    TIME,
    Frontier,
    Progress,
    UpdateBatch,
    consolidate_sql,
    duck,
    overflow_checked,
)
from storage import consolidate as consolidate_table
from storage.errors import InvalidInput
from storage.query import qliteral

from .sqlplan import check_linear

__all__ = ["FrontierTracker", "OffsetQueue", "consolidate", "sql", "Item", "one_key", "worker_keys"]

Item = UpdateBatch | Progress
ALL = "ALL"


def one_key(step_id: str, up: Stream[Any]) -> Stream[tuple[str, Any]]:
    """Key every item with the same key, so one worker sees them all, in per-sender order."""
    return op.key_on(step_id, up, lambda _x: ALL)


_M64 = (1 << 64) - 1


def _siphash13(data: bytes) -> int:
    """SipHash-1-3 with keys (0, 0): Rust's `DefaultHasher`, which bytewax routes keys by."""

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & _M64

    v0, v1, v2, v3 = 0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573

    def rnd() -> None:
        nonlocal v0, v1, v2, v3
        v0 = (v0 + v1) & _M64
        v1 = rotl(v1, 13) ^ v0
        v0 = rotl(v0, 32)
        v2 = (v2 + v3) & _M64
        v3 = rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _M64
        v3 = rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _M64
        v1 = rotl(v1, 17) ^ v2
        v2 = rotl(v2, 32)

    n = len(data)
    end = n - n % 8
    for i in range(0, end, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        rnd()
        v0 ^= m
    m = ((n & 0xFF) << 56) | int.from_bytes(data[end:], "little")
    v3 ^= m
    rnd()
    v0 ^= m
    v2 ^= 0xFF
    rnd()
    rnd()
    rnd()
    return v0 ^ v1 ^ v2 ^ v3


def worker_of(key: str, workers: int) -> int:
    """The worker (0..workers-1, over all processes) bytewax routes state key `key` to.

    bytewax's stateful operators send a key to worker `DefaultHasher(key) % workers`
    (Rust hashes a `String` as its bytes then 0xff). Only load balance depends on
    this matching bytewax: a wrong guess moves work between workers, never results.
    """
    return _siphash13(key.encode() + b"\xff") % workers


def worker_keys(n: int) -> tuple[str, ...]:
    """`n` state keys, the i-th routed to worker i of an `n`-worker dataflow: keying
    partition i by `worker_keys(n)[i]` gives every worker exactly one partition.

    Example:
        >>> [worker_of(k, 3) for k in worker_keys(3)]
        [0, 1, 2]
    """
    out = []
    for i in range(n):
        salt = 0
        while worker_of(k := f"{i}.{salt}", n) != i:
            salt += 1
        out.append(k)
    return tuple(out)


class FrontierTracker:
    """The frontier of a stream: the minimum over the source partitions it has heard of.

    A `Progress` with `partition=None` speaks for the whole stream. A partitioned
    `Progress` names its partition and lists its siblings; siblings not heard
    from yet hold the frontier at "unknown" (`frontier()` returns None).

    SUBTLE: a partition whose source never sent anything is invisible; sources
    must emit an initial `Progress` (connectors/base.py) so that a slow partition
    cannot be overtaken.

    Example:
        >>> t = FrontierTracker()
        >>> t.observe(Progress(Frontier(5), "a", ("a", "b"))); t.frontier() is None
        True
        >>> t.observe(Progress(Frontier(3), "b", ("a", "b"))); t.frontier()
        Frontier(3)
    """

    def __init__(self) -> None:
        self.whole: Frontier | None = None
        self.parts: dict[str, Frontier] = {}
        self.expected: set[str] = set()

    def observe(self, p: Progress) -> None:
        f = Frontier.of(p.frontier)
        if p.partition is None:
            self.whole = f if self.whole is None else max(self.whole, f)
            return
        cur = self.parts.get(p.partition)
        self.parts[p.partition] = f if cur is None else max(cur, f)
        self.expected.add(p.partition)
        if p.partitions:
            self.expected.update(p.partitions)

    def frontier(self) -> Frontier | None:
        fs: list[Frontier] = []
        if self.expected:
            if any(k not in self.parts for k in self.expected):
                return None
            fs.append(min(self.parts[k] for k in self.expected))
        if self.whole is not None:
            fs.append(self.whole)
        return min(fs) if fs else None


class OffsetQueue:
    """Which source offsets are fully covered by a frontier.

    A batch's offsets may be committed only once every update of it, and of
    every earlier batch of the same partition, is at a time before the
    committed upper. `push` records a batch's max time per offset key; `pop(F)`
    returns, per key, the last offset whose batch (and all earlier ones) lies
    entirely below `F`.
    """

    def __init__(self) -> None:
        self.q: dict[str, deque[tuple[int, Any]]] = {}

    def push(self, offsets: Mapping[str, Any] | None, tmax: int) -> None:
        for k, v in (offsets or {}).items():
            self.q.setdefault(k, deque()).append((tmax, v))

    def pop(self, upper: Frontier) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, dq in self.q.items():
            while dq and (upper.time is None or dq[0][0] < upper.time):
                out[k] = dq.popleft()[1]
        return out


def tmax_of(table: pa.Table) -> int:
    """The largest `_time` of `table`, or -1 when it is empty."""
    if table.num_rows == 0:
        return -1
    return pc.max(table.column(TIME)).as_py()


def tmin_of(table: pa.Table) -> int:
    if table.num_rows == 0:
        return -1
    return pc.min(table.column(TIME)).as_py()


def check_item(step_id: str, x: Any) -> Item:
    if not isinstance(x, UpdateBatch | Progress):
        msg = f"step {step_id!r} requires UpdateBatch or Progress items; got a {type(x)!r} instead"
        raise TypeError(msg)
    return x


# --------------------------------------------------------------------------------------------
# consolidate
# --------------------------------------------------------------------------------------------


#: Pending bytes (Arrow) past which `consolidate` moves its pending updates into a DuckDB file
#: (`$SHARDFLOW_CONSOLIDATE_SPILL_MB`, default 64; 0 spills from the first update).
SPILL_BYTES = int(float(os.environ.get("SHARDFLOW_CONSOLIDATE_SPILL_MB", "64")) * (1 << 20))
#: DuckDB's memory limit, in MiB, for a spilled `consolidate` (`$SHARDFLOW_CONSOLIDATE_MEMORY_MB`):
#: past it the GROUP BY spills to the operator's temp dir too. On one DuckDB thread: a hash
#: aggregation needs memory per thread before it can spill, and two threads ran out of 192MB
#: on 10M distinct rows where one thread in 256MB did not (and was faster).
SPILL_MEMORY_MB = int(os.environ.get("SHARDFLOW_CONSOLIDATE_MEMORY_MB", "256"))


#: Rows per record batch when a spilled flush streams its result out of DuckDB.
SPILL_READ_ROWS = 1 << 20

_SPILL_PREFIX = "shardflow-consolidate-"


def arrow_of(con: duckdb.DuckDBPyConnection, q: str, memory_mb: int) -> pa.Table:
    """Run `q` on `con` (whose memory limit is `memory_mb` MiB) into an Arrow table, overflow-checked.

    The result is streamed out in record batches, so it is built outside DuckDB's
    memory limit. A query that still runs out of memory (a hash aggregation needs
    some memory per thread before it can spill; how much varies run to run) is
    retried with twice the limit, up to four times it; the limit is then set back.
    """
    mb = memory_mb
    try:
        while True:
            try:
                with overflow_checked():
                    reader = con.sql(q).to_arrow_reader(SPILL_READ_ROWS)
                    return pa.Table.from_batches(list(reader), reader.schema)
            except (duckdb.OutOfMemoryException, OSError, pa.ArrowException) as e:
                # (A streamed result reports DuckDB's error through pyarrow, as an OSError.)
                if "Out of Memory" not in str(e) or mb >= 4 * memory_mb:
                    raise
                mb *= 2
                con.execute(f"SET memory_limit = '{mb}MB'")
    finally:
        if mb != memory_mb:
            con.execute(f"SET memory_limit = '{memory_mb}MB'")


def _remove_stale_spills() -> None:
    """Remove the spill dirs of processes that died without removing theirs (SIGKILL, a crash).

    A live spill holds an exclusive `flock` on its `lock` file; the kernel drops it
    when the process dies, so a dir whose lock can be taken is nobody's.
    """
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(_SPILL_PREFIX)]
    except OSError:
        return
    for n in names:
        path = os.path.join(root, n)
        try:
            with open(os.path.join(path, "lock")) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # held (alive), not ours to read, or no lock file yet


class _Spill:
    """Pending updates in a DuckDB file of their own (a fresh temp dir, removed by `close`).

    Rows are appended as Arrow (`INSERT ... SELECT` from a registered table) and
    consolidated by one GROUP BY (`storage.consolidate_sql`) when the frontier
    passes them; DuckDB keeps at most `SPILL_MEMORY_MB` of it in memory (should a
    flush still run out, it is retried with twice the memory, up to 4x).
    """

    def __init__(self, step_id: str, schema: pa.Schema):
        self.step_id = step_id
        self.schema = schema
        _remove_stale_spills()
        self.dir = tempfile.mkdtemp(prefix=_SPILL_PREFIX)
        self.rows = 0
        try:
            # Held while this process lives: a crashed process's dir is unlocked, so stale.
            self._lock = open(os.path.join(self.dir, "lock"), "w")  # noqa: SIM115 - closed by close()
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            con = duckdb.connect(os.path.join(self.dir, "pending.duckdb"))
            con.execute(f"SET memory_limit = '{SPILL_MEMORY_MB}MB'")
            con.execute("SET threads = 1")
            con.execute(f"SET temp_directory = {qliteral(os.path.join(self.dir, 'tmp'))}")
            con.execute("SET preserve_insertion_order = false")
            con.register("__in", schema.empty_table())
            con.execute("CREATE TABLE pending AS SELECT * FROM __in")
            con.unregister("__in")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.con: duckdb.DuckDBPyConnection | None = con
        # Removed however the operator goes away (EOF, an error, interpreter exit).
        self._finalizer = weakref.finalize(self, _Spill._remove, con, self.dir, self._lock)

    @staticmethod
    def _remove(con: duckdb.DuckDBPyConnection, path: str, lock: IO[str]) -> None:
        try:
            con.close()
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock.close()

    def append(self, tables: list[pa.Table]) -> None:
        assert self.con is not None
        for t in tables:
            if not t.schema.equals(self.schema):
                msg = (
                    f"step {self.step_id!r}: an update batch's schema {t.schema} differs from the "
                    f"earlier batches' {self.schema}"
                )
                raise InvalidInput(msg)
            self.con.register("__in", t)
            try:
                self.con.execute("INSERT INTO pending SELECT * FROM __in")
            finally:
                self.con.unregister("__in")
            self.rows += t.num_rows

    def take(self, upper: Frontier, since: int | None) -> pa.Table:
        """Remove the updates at times before `upper`; return them consolidated (times advanced to `since`)."""
        assert self.con is not None
        below = "" if upper.time is None else f" WHERE {TIME} < {int(upper.time)}"
        cols = [n for n in self.schema.names if n not in (TIME, DIFF)]
        q = consolidate_sql(f"(SELECT * FROM pending{below})", cols, where=f"step {self.step_id!r}", since=since)
        out = arrow_of(self.con, q, SPILL_MEMORY_MB)
        if below:
            self.con.execute(f"DELETE FROM pending{below}")
            self.rows = self.con.execute("SELECT count(*) FROM pending").fetchall()[0][0]
        else:
            self.rows = 0
        return out.cast(self.schema)

    def close(self) -> None:
        self.con = None
        self._finalizer()


class _ConsolidateLogic(StatefulBatchLogic[Item, Item, None]):
    """Buffers updates (as Arrow tables) until the frontier passes them.

    State: a list of pending Arrow tables with their max times, the frontier
    already emitted (`emitted`), and the offsets queue. No per-row Python.
    Once the pending tables pass `spill_bytes`, they move into a `_Spill` (a
    DuckDB file), and so does every later buffer of that size; a flush then
    consolidates in DuckDB. When a flush leaves nothing pending the file is
    removed and updates are buffered in memory again.
    """

    def __init__(self, step_id: str, spill_bytes: int | None = None):
        self.step_id = step_id
        self.pending: list[tuple[pa.Table, int]] = []
        self.pending_bytes = 0
        self.spill_bytes = SPILL_BYTES if spill_bytes is None else spill_bytes
        self.spill: _Spill | None = None
        self.spills = 0  # how many times updates moved to DuckDB (introspection, tests)
        self.tracker = FrontierTracker()
        self.emitted: Frontier | None = None
        self.offsets = OffsetQueue()
        self.schema: pa.Schema | None = None

    def on_batch(self, values: list[Item]) -> tuple[Iterable[Item], bool]:
        for v in values:
            check_item(self.step_id, v)
            if isinstance(v, Progress):
                self.tracker.observe(v)
            else:
                tm = tmax_of(v.table)
                self.schema = v.table.schema
                if v.table.num_rows:
                    self.pending.append((v.table, tm))
                    self.pending_bytes += v.table.nbytes
                self.offsets.push(v.offsets, tm)
        if self.pending and self.pending_bytes > self.spill_bytes:
            self._spill()
        f = self.tracker.frontier()
        if f is None or (self.emitted is not None and f <= self.emitted):
            return [], StatefulBatchLogic.RETAIN
        return self._flush(f), StatefulBatchLogic.RETAIN

    def _spill(self) -> None:
        """Move the pending tables into the DuckDB file (opening it first if needed)."""
        if self.spill is None:
            self.spill = _Spill(self.step_id, self.pending[0][0].schema)
        self.spills += 1
        self.spill.append([t for t, _ in self.pending])
        self.pending = []
        self.pending_bytes = 0

    def _flush(self, upper: Frontier) -> list[Item]:
        lower = self.emitted if self.emitted is not None else Frontier.MIN
        # SUBTLE: an update below the emitted frontier is late (a source broke its
        # Progress promise); advancing it to `lower` keeps every accumulation
        # from `lower` on correct, which is the best that can still be done.
        since = lower.time if lower.time else None
        table: pa.Table | None
        if self.spill is not None:
            if self.pending:
                self._spill()
            table = self.spill.take(upper, since)
            if self.spill.rows == 0:
                self.spill.close()
                self.spill = None
        else:
            table = self._take(upper, since)
        out: list[Item] = []
        offsets = self.offsets.pop(upper)
        if (table is not None and table.num_rows) or offsets:
            if table is None and self.schema is not None:
                table = self.schema.empty_table()
            if table is not None:
                out.append(UpdateBatch(table, lower, upper, offsets or None))
        self.emitted = upper
        out.append(Progress(upper))
        return out

    def _take(self, upper: Frontier, since: int | None) -> pa.Table | None:
        """Remove the in-memory updates at times before `upper`; return them consolidated."""
        ready: list[pa.Table] = []
        keep: list[tuple[pa.Table, int]] = []
        ut = None if upper.is_empty else pa.scalar(upper.time, pa.int64())
        for t, tm in self.pending:
            if upper.time is None or tm < upper.time:
                ready.append(t)
                continue
            mask = pc.less(t.column(TIME), ut)
            below = t.filter(mask)
            if below.num_rows:
                ready.append(below)
                rest = t.filter(pc.invert(mask))
                keep.append((rest, tm))
            else:
                keep.append((t, tm))
        self.pending = keep
        self.pending_bytes = sum(t.nbytes for t, _ in keep)
        if not ready:
            return None
        table = pa.concat_tables(ready, promote_options="none") if len(ready) > 1 else ready[0]
        return consolidate_table(table, since=since, where=f"step {self.step_id!r}")

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.pending = []
        self.pending_bytes = 0

    def on_eof(self) -> tuple[Iterable[Item], bool]:
        # SUBTLE: updates at or beyond the final frontier are dropped, not flushed. A
        # stopped continuous source ends with its partitions at different frontiers;
        # flushing the faster ones' data would commit times the slower ones have not
        # reached, and on resume those would be below the sink's as_of and lost. Their
        # offsets are not committed, so a resumed run re-reads them. (A batch source
        # ends with Progress(last time + 1), so nothing is left here.)
        self.close()
        return [], StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        return None


@operator
def consolidate(step_id: str, up: Stream[Any], spill_bytes: int | None = None) -> Stream[Any]:
    """Buffer updates until the frontier passes them; emit consolidated `[lower, upper)` batches.

    Input: `UpdateBatch` and `Progress` items (partitioned or not). Output, each
    time the input frontier advances from `lower` to `upper`: at most one
    `UpdateBatch(table, lower, upper, offsets)` whose table is consolidated
    (unique per `(row, time)`, no zero diffs, every time in `[lower, upper)`),
    then `Progress(upper)`. Progress moves forward even when no data comes. The
    batch's `offsets` are those source offsets whose updates are now all
    emitted (see `OffsetQueue`); an offsets-only advance yields an empty batch.

    Memory: pending updates are Arrow tables until they pass `spill_bytes`
    (default `SPILL_BYTES`, 64 MiB, `$SHARDFLOW_CONSOLIDATE_SPILL_MB`); then
    they move into a DuckDB file in a temp dir of the operator's own (under
    `$TMPDIR`; removed when the input ends or the process exits), whose memory
    is capped at `$SHARDFLOW_CONSOLIDATE_MEMORY_MB` (default 256), and are
    consolidated there by one GROUP BY. The output is the same either way.
    The file is scratch, not state: after a crash the run resumes from the
    sink's committed offsets, as without it.

    Runs on one worker (one key): DuckDB consolidates with its own threads.
    At end of input, updates at or beyond the final frontier are dropped (their
    offsets are not committed, so a resumed run reads them again).
    """
    keyed = one_key("key", up)
    out = op.stateful_batch("consolidate", keyed, lambda _resume: _ConsolidateLogic(step_id, spill_bytes))
    return op.key_rm("unkey", out)


# --------------------------------------------------------------------------------------------
# sql
# --------------------------------------------------------------------------------------------


class _SqlRunner:
    def __init__(self, step_id: str, query: str):
        self.step_id = step_id
        self.query = query
        self.checked: pa.Schema | None = None

    def run(self, table: pa.Table) -> pa.Table:
        con = duck()
        con.register("updates", table)
        try:
            out = con.sql(self.query).to_arrow_table()
        except Exception as e:  # duckdb errors: name the step and the query
            msg = f"step {self.step_id!r}: query failed: {e} (query: {self.query!r})"
            raise InvalidInput(msg) from e
        finally:
            con.unregister("updates")
        return self._shape(out)

    def _shape(self, out: pa.Table) -> pa.Table:
        names = out.schema.names
        for col in (TIME, DIFF):
            if col not in names:
                msg = (
                    f"step {self.step_id!r}: the query must keep {TIME!r} and {DIFF!r} (so it stays "
                    f"linear); its result has columns {names}. Select them, e.g. "
                    f"'SELECT ..., {TIME}, {DIFF} FROM updates'"
                )
                raise InvalidInput(msg)
            if out.schema.field(col).type != pa.int64():
                msg = f"step {self.step_id!r}: column {col!r} must stay int64, the query made it {out.schema.field(col).type}"
                raise InvalidInput(msg)
        if names[-2:] != [TIME, DIFF]:
            rest = [n for n in names if n not in (TIME, DIFF)]
            out = out.select([*rest, TIME, DIFF])
        return out

    def check(self, schema: pa.Schema) -> None:
        if self.checked is not None and self.checked.equals(schema):
            return
        self.run(schema.empty_table())
        self.checked = schema


@operator
def sql(step_id: str, up: Stream[Any], query: str, schema: pa.Schema | None = None) -> Stream[Any]:
    """Run a DuckDB query over each batch; the input is the view `updates`.

    The query must be linear and keep `_time` and `_diff` as they are
    (filters, projections, `CASE` on row columns, UNION ALL, joins with
    constant VALUES): then it commutes with consolidation and stays
    differential. Anything that combines rows (aggregates, GROUP BY, HAVING,
    window functions, QUALIFY, DISTINCT, ORDER BY, LIMIT/OFFSET, UNION,
    INTERSECT, EXCEPT, joins with another table) would see one batch of
    updates, not the collection, and give wrong answers downstream: such a
    query raises `InvalidInput` when the flow is built (`flows.sqlplan.check_linear`,
    with DuckDB's parser), naming the construct and its position; maintain it
    as a view instead.

    The columns are checked up front too: with `schema` (the row columns plus
    `_time` and `_diff`, or the row columns alone) the query runs on an empty
    table when the flow is built and a query that drops `_time`/`_diff` raises
    `InvalidInput`. Without `schema` that check runs on the first batch.
    `Progress` items pass through unchanged.

    Example:
        >>> import pyarrow as pa
        >>> from storage import update_schema
        >>> from bytewax.dataflow import Dataflow
        >>> from bytewax.testing import TestingSource
        >>> flow = Dataflow("doc")
        >>> s = op.input("in", flow, TestingSource([]))
        >>> sql("bad", s, "SELECT k FROM updates", schema=pa.schema([("k", pa.string())]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        storage.errors.InvalidInput: step 'doc.bad': the query must keep '_time' and '_diff' ...
        >>> sql("agg", s, "SELECT k, count(*) AS n, _time, _diff FROM updates GROUP BY ALL")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        storage.errors.InvalidInput: step 'doc.agg': an aggregate (count_star) at character 10 is not linear ...
    """
    check_linear(query, f"step {step_id!r}")
    runner = _SqlRunner(step_id, query)
    if schema is not None:
        if TIME not in schema.names:
            schema = schema.append(pa.field(TIME, pa.int64())).append(pa.field(DIFF, pa.int64()))
        runner.check(schema)

    def apply(x: Any) -> Any:
        check_item(step_id, x)
        if isinstance(x, Progress):
            return x
        runner.check(x.table.schema)
        return UpdateBatch(runner.run(x.table), x.lower, x.upper, x.offsets)

    return op.map("query", up, apply)


"""Updates in their physical form: Arrow data whose last two columns are `_time` and `_diff`.

An update is `(row, time, diff)`. `row` is the user's columns under the shard's
schema; `_time` is an int64 >= 0; `_diff` is an int64 count. Consolidation sums
the diffs per `(row, time)` and drops zeros. Nothing here touches one Python
object per row: validation uses Arrow compute, consolidation runs in DuckDB.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InvalidInput, SchemaMismatch
from .frontier import Frontier

TIME = "_time"
DIFF = "_diff"
RESERVED = (TIME, DIFF)

_local = threading.local()


def duck() -> duckdb.DuckDBPyConnection:
    """A per-thread in-memory DuckDB connection for transient queries."""
    con = getattr(_local, "con", None)
    if con is None:
        con = duckdb.connect(":memory:")
        _local.con = con
        with _all_lock:
            # Keyed by thread id: a reused id replaces (and drops) a dead thread's connection.
            _all[threading.get_ident()] = con
    return con


_all: dict[int, duckdb.DuckDBPyConnection] = {}
_all_lock = threading.Lock()


@atexit.register
def _close_duck() -> None:
    """Close every thread's transient connection before interpreter teardown.

    SUBTLE: daemon threads (the compactor, bytewax workers) may still hold one at
    exit; DuckDB objects alive during teardown make its bindings print pages of
    "leaked instance" warnings after everything else, e.g. after pytest's summary.
    """
    with _all_lock:
        cons = list(_all.values())
        _all.clear()
    for con in cons:
        try:
            con.close()
        except Exception:  # noqa: BLE001 - closing at exit is best effort
            pass
    _local.__dict__.pop("con", None)


def qident(name: str) -> str:
    """Quote an SQL identifier for DuckDB."""
    return '"' + name.replace('"', '""') + '"'


def as_table(data: Any, what: str = "updates") -> pa.Table:
    """Accept a pa.Table, a RecordBatch, a RecordBatchReader, or any Arrow PyCapsule producer."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    if hasattr(data, "__arrow_c_stream__") or hasattr(data, "__arrow_c_array__"):
        return pa.table(data)
    raise InvalidInput(f"{what}: expected an Arrow table or record batch, got {type(data).__name__}")


def update_schema(schema: pa.Schema) -> pa.Schema:
    """The physical schema of updates under row schema `schema`."""
    return schema.append(pa.field(TIME, pa.int64(), nullable=False)).append(
        pa.field(DIFF, pa.int64(), nullable=False)
    )


def check_row_schema(schema: pa.Schema, where: str) -> None:
    """A row schema may not use the reserved names and may not repeat a name."""
    if not isinstance(schema, pa.Schema):
        raise InvalidInput(f"{where}: schema must be a pyarrow.Schema, got {type(schema).__name__}")
    seen: set[str] = set()
    for name in schema.names:
        if name in RESERVED:
            raise InvalidInput(f"{where}: column name {name!r} is reserved for the update's time/diff")
        if name in seen:
            raise InvalidInput(f"{where}: column {name!r} appears twice in the schema")
        seen.add(name)


def check_columns(table: pa.Table, schema: pa.Schema, where: str) -> None:
    """Every column of `schema` in `table` has the schema's type, and no nulls where it says not null."""
    for field in schema:
        got = table.schema.field(field.name).type
        if not got.equals(field.type):
            raise SchemaMismatch(f"{where}: column {field.name!r} has type {got}, the schema says {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaMismatch(f"{where}: column {field.name!r} holds nulls but the schema says not null")


def validate_updates(data: Any, schema: pa.Schema, where: str) -> pa.Table:
    """Check `data` against row schema `schema`; return it with columns in schema order.

    Raises:
        SchemaMismatch: a column is missing, extra, of another type, or null where
            the schema says not null; `_time`/`_diff` missing or not int64.
        InvalidInput: a null or negative `_time`, or a null `_diff`.
    """
    table = as_table(data, where)
    names = table.schema.names
    expected = list(schema.names) + [TIME, DIFF]
    missing = [n for n in expected if n not in names]
    if missing:
        raise SchemaMismatch(f"{where}: missing column {missing[0]!r} (expected columns {expected})")
    extra = [n for n in names if n not in expected]
    if extra:
        raise SchemaMismatch(f"{where}: unexpected column {extra[0]!r} (expected columns {expected})")
    if len(names) != len(set(names)):
        dup = next(n for n in names if names.count(n) > 1)
        raise SchemaMismatch(f"{where}: column {dup!r} appears twice")
    if names != expected:
        table = table.select(expected)
    check_columns(table, schema, where)
    for col in RESERVED:
        got = table.schema.field(col).type
        if got != pa.int64():
            raise SchemaMismatch(f"{where}: column {col!r} must be int64, got {got}")
        if table.column(col).null_count:
            raise InvalidInput(f"{where}: column {col!r} holds nulls")
    if table.num_rows:
        tmin = pc.min(table.column(TIME)).as_py()
        if tmin < 0:
            raise InvalidInput(f"{where}: update time {tmin} is negative (times are int64 >= 0)")
    if table.schema != update_schema(schema):
        # Normalise field nullability/metadata so parts of one shard share one schema.
        table = table.cast(update_schema(schema))
    return table


def time_bounds(table: pa.Table) -> tuple[int, int] | None:
    """(min, max) of `_time`, or None for an empty table."""
    if table.num_rows == 0:
        return None
    mm = pc.min_max(table.column(TIME))
    return mm["min"].as_py(), mm["max"].as_py()


def consolidate(table: pa.Table, since: int | None = None) -> pa.Table:
    """Advance times to `since` (if given), sum diffs per `(row, time)`, drop zeros.

    Afterwards the table is unique per `(row, time)` and has no zero diffs; its
    columns and types are unchanged. Order is unspecified.

    Example:
        >>> t = pa.table({"k": ["a", "a", "b"], "_time": [1, 2, 1], "_diff": [1, -1, 1]})
        >>> sorted(consolidate(t).to_pylist(), key=str)
        [{'k': 'a', '_time': 1, '_diff': 1}, {'k': 'a', '_time': 2, '_diff': -1}, {'k': 'b', '_time': 1, '_diff': 1}]
        >>> consolidate(t, since=5).to_pylist()
        [{'k': 'b', '_time': 5, '_diff': 1}]
    """
    if table.num_rows == 0:
        return table
    cols = [n for n in table.schema.names if n not in RESERVED]
    sel = ", ".join(qident(c) for c in cols)
    t_expr = f"greatest({TIME}, {int(since)})" if since is not None else TIME
    keys = (sel + ", " if sel else "") + t_expr
    sql = (
        f"SELECT {sel + ', ' if sel else ''}{t_expr} AS {TIME}, sum({DIFF})::BIGINT AS {DIFF} "
        f"FROM __t GROUP BY {keys} HAVING sum({DIFF}) <> 0"
    )
    con = duck()
    con.register("__t", table)
    try:
        out = con.sql(sql).to_arrow_table()
    finally:
        con.unregister("__t")
    return out.cast(table.schema)


@dataclass(frozen=True)
class UpdateBatch:
    """Updates travelling between steps or out of a listen: `table` has `_time`/`_diff` last.

    `lower`/`upper`, when known, bound the batch's times: `[lower, upper)`.
    `offsets` maps a source partition (e.g. `"orders/0"`) to the JSON-able offset
    to resume *after* once this batch is durable; the sink commits it in the
    same CAS as the data.
    """

    table: pa.Table
    lower: Frontier | None = None
    upper: Frontier | None = None
    offsets: Mapping[str, Any] | None = None

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


@dataclass(frozen=True)
class Progress:
    """In-band progress: no update at a time before `frontier` will come any more.

    A source partition speaks for itself: `partition` names it (unique across
    the flow, e.g. `"orders/0"`) and `partitions` lists every partition of its
    source, so a downstream operator knows whom to wait for. The frontier of a
    stream is the minimum over those partitions. `partition=None` means the
    frontier of the whole stream (what operators emit downstream).
    """

    frontier: Frontier
    partition: str | None = None
    partitions: tuple[str, ...] | None = None

"""Updates in their physical form: Arrow data whose last two columns are `_time` and `_diff`.

An update is `(row, time, diff)`. `row` is the user's columns under the shard's
schema; `_time` is an int64 >= 0; `_diff` is an int64 count. Consolidation sums
the diffs per `(row, time)` and drops zeros. Nothing here touches one Python
object per row: validation uses Arrow compute, consolidation runs in DuckDB.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from ._compute import pc
from .connections import thread_connection
from .errors import DiffOverflow, InvalidInput, SchemaMismatch
from .frontier import Frontier

TIME = "_time"
DIFF = "_diff"
RESERVED = (TIME, DIFF)
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: This thread's transient connection (see `storage.connections`, kind 2); kept for flows' operators.
duck = thread_connection


def qident(name: str) -> str:
    """Quote an SQL identifier for DuckDB."""
    return '"' + name.replace('"', '""') + '"'


def as_table(data: Any, what: str = "updates", schema: pa.Schema | None = None) -> pa.Table:
    """Accept a pa.Table, a RecordBatch, a RecordBatchReader, any Arrow PyCapsule producer
    (pandas, polars, ...), a dict of columns, or a list of dicts (one per row).

    The column types of a dict or a list of dicts are inferred by Arrow (then cast to
    the schema's where that loses nothing, see `conform_columns`); an empty list of
    rows is an empty table of `schema`, if given.
    """
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    if hasattr(data, "__arrow_c_stream__") or hasattr(data, "__arrow_c_array__"):
        return pa.table(data)
    if isinstance(data, Mapping):
        try:
            return pa.table(dict(data))
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise InvalidInput(f"{what}: cannot read the dict of columns as a table: {_first_line(e)}") from None
    if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
        if not data and schema is not None:
            return schema.empty_table()
        try:
            return pa.Table.from_pylist(data)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise InvalidInput(f"{what}: cannot read the list of rows as a table: {_first_line(e)}") from None
    raise InvalidInput(
        f"{what}: expected an Arrow table or record batch, a dict of columns or a list of dicts, "
        f"got {type(data).__name__}"
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _family(t: pa.DataType) -> Any:
    """Types whose values convert one to one (a safe cast checks the rest, e.g. int ranges)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_timestamp(t):
        return ("timestamp", t.tz)
    return None


def conform_columns(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast the columns of `table` whose type differs from `schema`'s, where the cast loses nothing.

    Covered: `large_string`/`string_view` -> `string` (and back), `large_binary`/
    `binary_view` -> `binary`, dictionary-encoded columns (decoded), an all-null column
    of type null, and integers or timestamps whose values fit (a safe cast). Anything
    else, or a value that does not fit, is a `SchemaMismatch` naming the column and
    both types. Columns of the schema's type are left as they are (no copy).
    """
    for field in schema:
        i = table.schema.get_field_index(field.name)
        if i < 0:
            continue
        col = table.column(i)
        got = col.type
        if got.equals(field.type):
            continue
        msg = f"{where}: column {field.name!r} has type {got}, the schema says {field.type}"
        src = got
        if pa.types.is_dictionary(src) and not pa.types.is_dictionary(field.type):
            col = col.cast(src.value_type)  # decoding a dictionary loses nothing
            src = src.value_type
        if src.equals(field.type):
            pass
        elif pa.types.is_null(src):
            col = pa.chunked_array([pa.nulls(len(col), field.type)])
        elif _family(src) is not None and _family(src) == _family(field.type):
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaMismatch(f"{msg}, and a value cannot be cast without loss: {_first_line(e)}") from None
        else:
            raise SchemaMismatch(msg)
        table = table.set_column(i, pa.field(field.name, field.type, nullable=table.schema.field(i).nullable), col)
    return table


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


def check_diffs(table: pa.Table, where: str) -> None:
    """Refuse a batch whose diffs could overflow a consolidated count on their own.

    Accepted iff the absolute values of the batch's diffs sum to at most
    INT64_MAX. Then no sum of diffs within the batch (per `(row, time)`, per
    row) can leave int64, so consolidating it alone never overflows.

    NB: this is deliberately not a cap on each diff. A self-correcting sink
    writes `desired - persisted`, which is as large as a count, so a cap on
    |diff| would refuse legitimate corrections; and no per-write cap bounds the
    sum over an unbounded number of batches. Overflow across batches (a row at
    count 2**62 plus a batch of +2**62) is caught on read instead: every
    consolidation sums in HUGEINT and raises `DiffOverflow` (`diff_sum_sql`).

    Cost: one `min_max` over `_diff`; the exact check runs only when
    `max|diff| * rows` passes INT64_MAX, i.e. never for +1/-1 updates.
    """
    if table.num_rows == 0:
        return
    d = table.column(DIFF)
    mm = pc.min_max(d)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if lo == INT64_MIN:
        row = pc.index(d, pa.scalar(INT64_MIN, pa.int64())).as_py()
        raise InvalidInput(
            f"{where}: column {DIFF!r} row {row}: diff {INT64_MIN} cannot be retracted "
            f"(diffs are int64 in [{INT64_MIN + 1}, {INT64_MAX}])"
        )
    if max(-lo, hi) * table.num_rows <= INT64_MAX:
        return
    a = pc.abs(d.combine_chunks())
    try:
        pc.cumulative_sum_checked(a)
        return
    except pa.ArrowInvalid:
        pass
    # Error path: the first row at which the running sum of |diff| passes int64.
    lo_n, hi_n = 1, len(a)  # INVARIANT: the prefix of length hi_n overflows, that of lo_n - 1 does not
    while lo_n < hi_n:
        mid = (lo_n + hi_n) // 2
        try:
            pc.cumulative_sum_checked(a.slice(0, mid))
            lo_n = mid + 1
        except pa.ArrowInvalid:
            hi_n = mid
    row = hi_n - 1
    raise InvalidInput(
        f"{where}: column {DIFF!r} row {row}: diff {d[row].as_py()} brings the batch's |diffs| past "
        f"{INT64_MAX}; a count summed from them could overflow int64 (split the batch or use smaller diffs)"
    )


def _has_string(t: pa.DataType) -> bool:
    """Whether values of type `t` contain UTF-8 strings (at any depth)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return True
    if pa.types.is_dictionary(t):
        return _has_string(t.value_type)
    return any(_has_string(t.field(i).type) for i in range(t.num_fields))


def _bad_utf8(arr: pa.Array) -> int | None:
    """The index of the first value of `arr` that holds invalid UTF-8, or None.

    -1: the only invalid string is a dictionary entry no row uses.
    Vectorised: `validate(full=True)` checks UTF-8; a bisection over slices
    finds the row only on the error path. SUBTLE: a slice of a nested array
    validates its whole child, so nested types descend into their children
    (sliced by `flatten()`) and map a child index back to its parent row.
    """
    t = arr.type
    if not _has_string(t):
        return None
    if pa.types.is_dictionary(t):
        j = _bad_utf8(arr.dictionary)
        if j is None:
            return None
        i = pc.index(arr.indices, pa.scalar(j, arr.indices.type)).as_py()
        return i if i >= 0 else -1
    if pa.types.is_struct(t):
        bad = [i for i in (_bad_utf8(c) for c in arr.flatten()) if i is not None]
        return min(bad) if bad else None
    if pa.types.is_map(t):  # as list<struct<key, value>>, which flatten() takes
        arr = arr.cast(pa.list_(pa.struct([t.key_field, t.item_field])))
    if t.num_fields:  # list, large_list, fixed_size_list, map
        c = _bad_utf8(arr.flatten())
        if c is None:
            return None
        return pc.list_parent_indices(arr)[c].as_py()
    try:
        arr.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    lo, hi = 0, len(arr)  # INVARIANT: arr[lo:hi] holds an invalid value
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            arr.slice(lo, mid - lo).validate(full=True)
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def first_bad_string(table: pa.Table) -> tuple[str, int] | None:
    """(column, row) of the first string value (at any nesting depth) that is not valid UTF-8, or None.

    Row -1: the only invalid strings are dictionary entries that no row uses.
    """
    unused: tuple[str, int] | None = None  # a bad dictionary entry no row of its chunk uses
    for name, col in zip(table.schema.names, table.columns, strict=True):
        if not _has_string(col.type):
            continue
        off = 0
        for chunk in col.chunks:
            i = _bad_utf8(chunk)
            if i is not None and i >= 0:
                return name, off + i
            if i is not None and unused is None:
                unused = (name, -1)
            off += len(chunk)
    return unused


def check_strings(table: pa.Table, where: str) -> None:
    """Refuse string values that are not valid UTF-8 (including nested, large and dictionary strings).

    SUBTLE: Arrow and Parquet store such bytes without a word, but DuckDB refuses
    to read them ("Invalid string encoding"): accepted, they would make the shard
    unreadable for good. Measured cost: ~7 ms per 1M short strings (bench/append.py).
    """
    bad = first_bad_string(table)
    if bad is not None:
        name, row = bad
        at = "an unused dictionary entry" if row < 0 else f"row {row}"
        raise InvalidInput(f"{where}: column {name!r} {at}: string is not valid UTF-8")


def validate_updates(data: Any, schema: pa.Schema, where: str) -> pa.Table:
    """Check `data` against row schema `schema`; return it with columns in schema order.

    Raises:
        SchemaMismatch: a column is missing, extra, of another type, or null where
            the schema says not null; `_time`/`_diff` missing or not int64.
        InvalidInput: a null or negative `_time`, or a null `_diff`; diffs whose
            absolute values sum past int64 (see `check_diffs`); a string value
            that is not valid UTF-8 (see `check_strings`).
    """
    table = as_table(data, where, update_schema(schema))
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
    table = conform_columns(table, schema, where)
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
        check_diffs(table, where)
    check_strings(table, where)
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


# Marks the DuckDB error that `diff_sum_sql` raises, so callers can tell it from others.
_OVERFLOW_MARK = "outside int64"


def qliteral(s: str) -> str:
    """Quote a string literal for DuckDB (and PostgreSQL with standard strings): `'` doubled."""
    return "'" + s.replace("'", "''") + "'"


def diff_sum_sql(cols: list[str], where: str, time_expr: str | None = None) -> str:
    """`sum(_diff)` as a BIGINT, overflow-checked: the one aggregation expression of consolidation.

    DuckDB sums BIGINT into a HUGEINT (int128), which cannot overflow here (it
    would take 2**64 updates). A sum that does not fit int64 raises a DuckDB
    error that names `where`, the row (its first 200 characters) and the sum;
    run the query under `overflow_checked()` to get it as `DiffOverflow`.
    `cols` are the quoted row columns (the GROUP BY keys), `time_expr` the
    grouped time, if any. Use it as `SELECT cols, <this> AS _diff ... GROUP BY
    cols HAVING sum(_diff) <> 0`.
    """
    row = "struct_pack(" + ", ".join(f"{c} := {c}" for c in cols) + ")::VARCHAR" if cols else "'()'"
    at = f"' at time ', ({time_expr})::VARCHAR, " if time_expr is not None else ""
    msg = (
        f"concat({qliteral(where + ': the diffs of row ')}, left({row}, 200), {at}"
        f"' sum to ', sum({DIFF})::VARCHAR, {qliteral(', ' + _OVERFLOW_MARK + '; the count cannot be represented')})"
    )
    return (
        f"CASE WHEN sum({DIFF}) BETWEEN {INT64_MIN} AND {INT64_MAX} THEN sum({DIFF})::BIGINT "
        f"ELSE error({msg})::BIGINT END"
    )


def as_overflow(e: BaseException) -> DiffOverflow | None:
    """The `DiffOverflow` that DuckDB error `e` stands for (raised by `diff_sum_sql`), or None.

    SUBTLE: a query streamed through Arrow (`snapshot_reader`) can report the
    same DuckDB error as pyarrow's `OSError` ("IOError: Invalid Input Error: ...
    Detail: Python exception: ..."), depending on which batch hits it first; both
    forms mean the same overflow.
    """
    if not isinstance(e, duckdb.Error | OSError | pa.ArrowException):
        return None
    msg = str(e)
    line = next((ln for ln in msg.splitlines() if _OVERFLOW_MARK in ln), None)
    if line is None:
        return None
    mark = line.index(_OVERFLOW_MARK)
    start = line.rfind("Error: ", 0, mark)
    text = line[start + len("Error: "):] if start >= 0 else line
    return DiffOverflow(text.split(" Detail: ")[0])


@contextmanager
def overflow_checked() -> Iterator[None]:
    """Turn the DuckDB error of an overflowing `diff_sum_sql` into `DiffOverflow`."""
    try:
        yield
    except (duckdb.Error, OSError, pa.ArrowException) as e:
        ov = as_overflow(e)
        if ov is not None:
            raise ov from None
        raise


def consolidate_sql(
    src: str,
    names: Sequence[str],
    *,
    where: str,
    as_of: int | None = None,
    since: int | None = None,
    drop_time: bool = False,
    minus: str | None = None,
    order_by_time: bool = False,
) -> str:
    """The one consolidation query: sum the diffs per (row, time), drop zeros, overflow-checked.

    `src` is a FROM-clause (a table, a view, a parenthesised subquery) with the
    row columns `names` (unquoted), `_time` and `_diff`. Times, one of:
    - default: kept, each `(row, _time)` its own group;
    - `since=t`: advanced to `greatest(_time, t)` (compaction; `consolidate`);
    - `as_of=t`: only times `<= t` count and every time is advanced to `t`, so
      the output has no `_time` (a snapshot: row columns + `_diff`);
    - `drop_time=True`: times ignored (or absent: the controller's desired
      tables have row columns + `_diff` only); the output has no `_time`.
    `minus`: a second FROM-clause of the same shape whose diffs are subtracted
    (`src - minus`: a sink's `desired - persisted`); filter each side by time in
    its FROM-clause where the two differ. `order_by_time`: sort the output by
    `_time` (compaction writes parts in time order). `where` names the data in
    the `DiffOverflow` message; run the query under `overflow_checked()`.

    Example:
        >>> consolidate_sql("t", ["k"], where="x", as_of=5)[:64]
        'SELECT "k", CASE WHEN sum(_diff) BETWEEN -9223372036854775808 AN'
        >>> con = duckdb.connect()
        >>> _ = con.execute("CREATE TABLE d AS SELECT * FROM (VALUES ('a', 1), ('b', 2)) v(k, _diff)")
        >>> _ = con.execute("CREATE TABLE p AS SELECT * FROM (VALUES ('a', 1)) v(k, _diff)")
        >>> con.sql(consolidate_sql("d", ["k"], where="x", minus="p", drop_time=True)).fetchall()
        [('b', 2)]
    """
    cols = [qident(n) for n in names]
    keep_time = as_of is None and not drop_time
    if minus is not None:
        proj = ", ".join([*cols, TIME] if (as_of is not None or keep_time) else cols)
        proj = proj + ", " if proj else ""
        src = f"(SELECT {proj}{DIFF} FROM {src} UNION ALL SELECT {proj}-{DIFF} AS {DIFF} FROM {minus})"
    t_expr = None
    if keep_time:
        t_expr = TIME if since is None else f"greatest({TIME}, {int(since)})::BIGINT"
    keys = [*cols, t_expr] if t_expr is not None else cols
    sel = [*cols, f"{t_expr} AS {TIME}"] if t_expr is not None else [*cols]
    sel.append(f"{diff_sum_sql(cols, where, t_expr)} AS {DIFF}")
    filt = f" WHERE {TIME} <= {int(as_of)}" if as_of is not None else ""
    group = f" GROUP BY {', '.join(keys)}" if keys else ""
    order = f" ORDER BY {TIME}" if order_by_time and t_expr is not None else ""
    return f"SELECT {', '.join(sel)} FROM {src}{filt}{group} HAVING sum({DIFF}) <> 0{order}"


def consolidate(table: pa.Table, since: int | None = None, *, where: str = "updates") -> pa.Table:
    """Advance times to `since` (if given), sum diffs per `(row, time)`, drop zeros.

    Afterwards the table is unique per `(row, time)` and has no zero diffs; its
    columns and types are unchanged. Order is unspecified.

    Raises:
        DiffOverflow: a row's diffs sum past int64 (the message names `where` and the row).

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
    sql = consolidate_sql("__t", cols, where=where, since=since)
    # The per-thread connection, recycled (see connections.thread_connection): jobs call this
    # several times a second for as long as they run.
    con = thread_connection()
    con.register("__t", table)
    try:
        with overflow_checked():
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

"""Desired and persisted contents of differential collections, kept in a DuckDB file.

For each differential collection there are two tables of `(row columns..., _diff)`:
- `desired`: what the collection should contain (Append adds, Delete removes);
- `persisted`: what this controller believes the shard contains at its upper,
  updated after each successful write and re-synced from a snapshot after a
  lost race.

Their difference, `desired - persisted`, is the correction the next write
carries. Both live in DuckDB on disk, not in Python memory, so memory stays
bounded however large a collection grows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from .. import connections
from ..errors import InvalidInput, SchemaMismatch
from ..updates import (
    DIFF,
    TIME,
    as_table,
    check_columns,
    conform_columns,
    consolidate_sql,
    overflow_checked,
)


def rows_schema(schema: pa.Schema) -> pa.Schema:
    """Row columns plus `_diff`: what desired and persisted hold."""
    return schema.append(pa.field(DIFF, pa.int64(), nullable=False))


def as_rows(data: Any, schema: pa.Schema, where: str) -> pa.Table:
    """`data` (any Arrow input) as rows under `schema` with `_diff` (default +1); no `_time` allowed."""
    t = as_table(data, where, schema)
    if TIME in t.schema.names:
        raise InvalidInput(f"{where}: rows carry no {TIME!r}; the controller picks the time")
    if DIFF not in t.schema.names:
        t = t.append_column(pa.field(DIFF, pa.int64(), nullable=False), pa.repeat(pa.scalar(1, pa.int64()), t.num_rows))
    want = rows_schema(schema)
    missing = [n for n in want.names if n not in t.schema.names]
    extra = [n for n in t.schema.names if n not in want.names]
    if missing or extra:
        raise SchemaMismatch(f"{where}: columns {t.schema.names} do not match the schema's {schema.names}")
    t = t.select(want.names)
    t = conform_columns(t, schema, where)
    check_columns(t, schema, where)
    if t.column(DIFF).null_count or not pa.types.is_integer(t.schema.field(DIFF).type):
        raise InvalidInput(f"{where}: {DIFF!r} must be a non-null integer")
    return t.cast(want)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class DesiredStore:
    """One DuckDB database file holding `desired` and `persisted` per differential collection.

    Not thread-safe: the controller serialises access under its lock.
    """

    def __init__(self, path: str | None = None):
        self._tmpdir = None
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="shardflow-desired-")
            path = os.path.join(self._tmpdir, "desired.duckdb")
        self.path = path
        self.con = connections.private(path)  # a file: desired is bounded by disk, not memory
        self._ops = 0
        self._schemas: dict[str, pa.Schema] = {}
        self._ids: dict[str, int] = {}
        self._next = 0

    def _recycle(self) -> None:
        """Every `connections.RECYCLE_QUERIES` operations, close the database and open its file again.

        SUBTLE: a DuckDB database keeps native memory per query until it closes
        (see `connections.thread_connection`), and the controller ticks every
        second for as long as a job runs. The tables live in the file, so nothing
        is lost. Called only at the start of an operation (nothing registered, no
        open result).
        """
        self._ops += 1
        if self._ops < connections.RECYCLE_QUERIES:
            return
        self._ops = 0
        self.con.close()
        self.con = connections.private(self.path)

    def _t(self, key: str, which: str) -> str:
        return f"{which}_{self._ids[key]}"

    def has(self, key: str) -> bool:
        return key in self._ids

    def schema(self, key: str) -> pa.Schema:
        return self._schemas[key]

    def register(self, key: str, schema: pa.Schema) -> None:
        self._recycle()
        if key in self._ids:
            return
        self._ids[key] = self._next
        self._next += 1
        self._schemas[key] = schema
        empty = rows_schema(schema).empty_table()
        self.con.register("__empty", empty)
        try:
            for which in ("desired", "persisted"):
                self.con.execute(f"CREATE OR REPLACE TABLE {self._t(key, which)} AS SELECT * FROM __empty")
        finally:
            self.con.unregister("__empty")

    def unregister(self, key: str) -> None:
        self._recycle()
        if key not in self._ids:
            return
        for which in ("desired", "persisted"):
            self.con.execute(f"DROP TABLE IF EXISTS {self._t(key, which)}")
        del self._ids[key]
        del self._schemas[key]

    def _insert(self, table: str, rows: pa.Table) -> None:
        self._recycle()
        if rows.num_rows == 0:
            return
        self.con.register("__rows", rows)
        try:
            self.con.execute(f"INSERT INTO {table} SELECT * FROM __rows")
        finally:
            self.con.unregister("__rows")

    def _replace(self, table: str, rows: pa.Table) -> None:
        self._recycle()
        self.con.register("__rows", rows)
        try:
            self.con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM __rows")
        finally:
            self.con.unregister("__rows")

    def append(self, key: str, rows: pa.Table) -> None:
        """Add `rows` (row columns + `_diff`) to desired."""
        self._insert(self._t(key, "desired"), rows)

    def delete(self, key: str, filter_sql: str) -> int:
        """Remove every desired row matching the SQL predicate `filter_sql`; return how many."""
        self._recycle()
        if not isinstance(filter_sql, str) or not filter_sql.strip():
            raise InvalidInput(f"Delete: filter must be a non-empty SQL predicate, got {filter_sql!r}")
        table = self._t(key, "desired")
        sql = f"DELETE FROM {table} WHERE ({filter_sql})"
        try:
            stmts = duckdb.extract_statements(sql)
        except duckdb.Error as e:
            raise InvalidInput(f"Delete: cannot parse filter {filter_sql!r}: {_first_line(e)}") from None
        if len(stmts) != 1:
            raise InvalidInput(f"Delete: filter {filter_sql!r} must be one SQL predicate")
        try:
            # Validate on a read first, so a bad predicate changes nothing.
            n = self.con.execute(f"SELECT count(*) FROM {table} WHERE ({filter_sql})").fetchone()
            self.con.execute(sql)
        except duckdb.Error as e:
            raise InvalidInput(f"Delete: filter {filter_sql!r} failed: {_first_line(e)}") from None
        return int(n[0]) if n else 0

    def replace(self, key: str, rows: pa.Table) -> None:
        """Desired becomes exactly `rows`."""
        self._replace(self._t(key, "desired"), rows)

    def set_persisted(self, key: str, rows: pa.Table) -> None:
        self._replace(self._t(key, "persisted"), rows)

    def _consolidated(self, table: str, key: str) -> str:
        return consolidate_sql(table, self._schemas[key].names, where=f"collection {key!r} (desired)", drop_time=True)

    def consolidate_desired(self, key: str) -> None:
        self._recycle()
        t = self._t(key, "desired")
        with overflow_checked():
            self.con.execute(f"CREATE OR REPLACE TABLE {t} AS {self._consolidated(t, key)}")

    def persisted_is_desired(self, key: str) -> None:
        """After a successful write: persisted := consolidated desired."""
        self.consolidate_desired(key)
        d, p = self._t(key, "desired"), self._t(key, "persisted")
        self.con.execute(f"CREATE OR REPLACE TABLE {p} AS SELECT * FROM {d}")

    def desired_is_persisted(self, key: str) -> None:
        """desired := persisted (a collection that starts from what is stored)."""
        self._recycle()
        d, p = self._t(key, "desired"), self._t(key, "persisted")
        self.con.execute(f"CREATE OR REPLACE TABLE {d} AS SELECT * FROM {p}")

    def corrections(self, key: str) -> pa.Table:
        """`desired - persisted`, consolidated: row columns + `_diff`, no zero diffs."""
        self._recycle()
        d, p = self._t(key, "desired"), self._t(key, "persisted")
        where = f"collection {key!r} (corrections)"
        sql = consolidate_sql(d, self._schemas[key].names, where=where, minus=p, drop_time=True)
        with overflow_checked():
            out = self.con.sql(sql).to_arrow_table()
        return out.cast(rows_schema(self._schemas[key]))

    def desired(self, key: str) -> pa.Table:
        """The consolidated desired contents (for tests and inspection)."""
        self._recycle()
        t = self._t(key, "desired")
        with overflow_checked():
            out = self.con.sql(self._consolidated(t, key)).to_arrow_table()
        return out.cast(rows_schema(self._schemas[key]))

    def count(self, key: str, which: str = "desired") -> int:
        self._recycle()
        r = self.con.execute(f"SELECT count(*) FROM {self._t(key, which)}").fetchone()
        return int(r[0]) if r else 0

    def alter(self, key: str, schema: pa.Schema) -> None:
        """Add the new (nullable) columns of `schema` to both tables, as NULL."""
        self._recycle()
        old = self._schemas[key]
        for which in ("desired", "persisted"):
            t = self._t(key, which)
            cur = self.con.sql(f"SELECT * FROM {t}").to_arrow_table()
            cols = [cur.column(n) for n in old.names]
            for f in list(schema)[len(old) :]:
                cols.append(pa.nulls(cur.num_rows, f.type))
            cols.append(pc.cast(cur.column(DIFF), pa.int64()))
            self._replace(t, pa.Table.from_arrays(cols, schema=rows_schema(schema)))
        self._schemas[key] = schema

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

"""Query shards with DuckDB: every collection is a view of its snapshot.

`connect(client, {"orders": shard})` returns a DuckDB connection in which
`orders` is the snapshot of that shard at `as_of` (the latest readable time by
default), one row per unit of count: a row whose updates sum to `_diff = 3`
appears three times. A negative count is an error that names the row; it is
never silently dropped. The table function `changes(name, from, to)` returns the
raw updates with `from < _time <= to`, with their `_time` and `_diff`, so that
snapshot(a) + changes(a, b) = snapshot(b). `from` must be `>= since` (below it,
compaction may have moved times), else the query fails rather than answer wrong.

Names are validated as `[a-z_][a-z0-9_]*`, optionally prefixed by one schema
(`sys.frontiers`); identifiers are always quoted.

SUBTLE: DuckDB has a built-in catalog named `system`, which makes a schema of
that name ambiguous in every query. Introspection collections live in schema
`sys` instead (DESIGN.md says `system`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import duckdb

from .errors import InvalidInput, NotYetReadable, ReadBeforeSince
from .frontier import MAX_TIME
from .read import ReadHandle, parts_source, snapshot_sql
from .updates import DIFF, TIME, qident

NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


def check_name(name: str) -> tuple[str | None, str]:
    """Split and validate `name` or `schema.name`; raise InvalidInput naming the bad part."""
    if not isinstance(name, str):
        raise InvalidInput(f"collection name must be a str, got {type(name).__name__}")
    parts = name.split(".")
    if len(parts) > 2 or not all(NAME_RE.match(p) for p in parts):
        raise InvalidInput(f"collection name {name!r} is not valid: use [a-z_][a-z0-9_]*, optionally schema.name")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def _schema_alias(parts: tuple[str | None, str]) -> tuple[str | None, str]:
    """`system.x` (the controller's introspection names) is queried as `sys.x`: see the module doc."""
    schema, base = parts
    return ("sys", base) if schema == "system" else (schema, base)


def _qualified(schema: str | None, name: str) -> str:
    return f"{qident(schema)}.{qident(name)}" if schema else qident(name)


def _hidden(name: str) -> str:
    return "__changes_" + name.replace(".", "__")


class QueryConnection:
    """A DuckDB connection over collection snapshots. Close it to release the readers.

    Everything else is the DuckDB connection's own API (`sql`, `execute`, ...).
    `as_of` maps each collection to the time its view shows (None: nothing readable yet).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, stack: ExitStack, as_of: dict[str, int | None]):
        self.con = con
        self._stack = stack
        self.as_of = as_of

    def __getattr__(self, item: str) -> Any:
        return getattr(self.con, item)

    def sql(self, query: str, **kw: Any) -> duckdb.DuckDBPyRelation:
        return self.con.sql(query, **kw)

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            self._stack.close()

    def __enter__(self) -> QueryConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(
    client: Any,
    collections: Mapping[str, str],
    as_of: int | None = None,
    *,
    timeout: float | None = None,
) -> QueryConnection:
    """Open a DuckDB connection with one view per collection.

    Args:
        client: a `storage.Client`.
        collections: view name (`name` or `schema.name`) -> shard id.
        as_of: the time to read at; None reads each collection at its latest
            readable time (`upper - 1`). An explicit `as_of` must be `>= since`
            and waits up to `timeout` for the upper to pass it.

    Raises:
        InvalidInput: a bad view name. ReadBeforeSince / NotYetReadable: see snapshot.
    """
    checked = {name: _schema_alias(check_name(name)) for name in collections}
    con = duckdb.connect(":memory:")
    stack = ExitStack()
    as_ofs: dict[str, int | None] = {}
    try:
        con.execute("CREATE TABLE __since (hidden VARCHAR PRIMARY KEY, since BIGINT)")
        schemas = {s for s, _ in checked.values() if s}
        for s in sorted(schemas):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {qident(s)}")
        for name, shard in collections.items():
            schema, base = checked[name]
            reader: ReadHandle = client.open_leased_reader(shard)
            stack.callback(reader.expire)
            try:
                as_ofs[name] = _create_views(con, stack, reader, name, schema, base, as_of, timeout)
            except (ReadBeforeSince, NotYetReadable) as e:
                # Say which collection: the user named collections, not shards.
                raise type(e)(f"collection {name}: {e}") from None
        # SUBTLE: below since, compaction may have advanced times (to since), so raw updates
        # there may not be where they were: changes() from a time below since would be
        # silently wrong. It is an error instead, like a snapshot before since. (With
        # since 0 nothing can have moved, so from = -1 means "everything".)
        key = "'__changes_' || replace(regexp_replace(name, '^system[.]', 'sys.'), '.', '__')"
        con.execute(
            "CREATE MACRO changes(name, t_from, t_to) AS TABLE "
            f"SELECT * FROM query_table({key}) "
            f"WHERE CASE WHEN t_from < (SELECT since FROM __since WHERE hidden = {key}) "
            f"AND (SELECT since FROM __since WHERE hidden = {key}) > 0 "
            f"THEN error('changes(' || name || ', ' || t_from || ', ...): from is before since ' || "
            f"(SELECT since FROM __since WHERE hidden = {key}) || '; times below since are compacted') "
            f"ELSE {TIME} > t_from AND {TIME} <= t_to END"
        )
    except BaseException:
        con.close()
        stack.close()
        raise
    return QueryConnection(con, stack, as_ofs)


def _create_views(
    con: duckdb.DuckDBPyConnection,
    stack: ExitStack,
    reader: ReadHandle,
    name: str,
    schema: str | None,
    base: str,
    as_of: int | None,
    timeout: float | None,
) -> int | None:
    s = reader.machine.fetch()
    if as_of is None:
        if s.upper.is_empty:
            t: int | None = MAX_TIME
        elif s.upper.time == 0:
            t = None
        else:
            assert s.upper.time is not None  # INVARIANT: the empty upper was handled above
            t = s.upper.time - 1
            if s.since.time is not None and t < s.since.time:
                # since == upper: no time is readable until the upper moves on. Say so now.
                raise NotYetReadable(
                    f"nothing is readable yet: since {s.since.time} has reached upper {s.upper.time}"
                )
    else:
        t = as_of
    if t is not None:
        s = reader.wait_for_upper_past(t, timeout if as_of is not None else (timeout or 10.0))
    # SUBTLE: views are lazy; the reader pins this state version until the connection
    # closes, so gc cannot delete a part a view still reads.
    stack.enter_context(reader._reading(s))
    hidden = _hidden(f"{schema}.{base}" if schema else base)
    con.execute("INSERT INTO __since VALUES (?, ?)", [hidden, s.since.time if s.since.time is not None else MAX_TIME])
    src = parts_source(reader.client, s, [b for b in s.batches if b.parts], con, f"__parts_{hidden}")
    con.execute(f"CREATE VIEW {qident(hidden)} AS SELECT * FROM {src}")
    cols = [qident(c) for c in s.schema.names]
    if t is None:
        body = f"SELECT {', '.join(cols)} FROM {qident(hidden)} WHERE false"
    else:
        struct = "{" + ", ".join(f"'{c}': {qident(c)}" for c in s.schema.names) + "}"
        msg = f"'collection {name}: row ' || CAST({struct} AS VARCHAR) || ' has negative count ' || {DIFF} || ' at as_of {t}'"
        agg = snapshot_sql(s, qident(hidden), t)
        body = (
            f"SELECT * EXCLUDE ({DIFF}, __n) FROM (SELECT *, unnest(CASE WHEN {DIFF} < 0 THEN error({msg}) "
            f"ELSE range({DIFF}) END) AS __n FROM ({agg}))"
        )
    con.execute(f"CREATE VIEW {_qualified(schema, base)} AS {body}")
    return t

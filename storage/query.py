"""Query shards with DuckDB: every collection is a view of its snapshot, all at one time.

`connect(client, {"orders": shard})` returns a DuckDB connection in which
`orders` is the snapshot of that shard at `as_of`, one row per unit of count: a
row whose updates sum to `_diff = 3` appears three times. Every collection of a
connection is read at the SAME `as_of` (by default the latest time all of them
can read), so a join never mixes times.

A negative count is an error that names the row (`NegativeCount`), raised by
`connect` for every collection it opens, before any query: DuckDB pushes a
query's filters below the view, so a check inside the view could be skipped by
`WHERE k = 2`. The check is free when Parquet statistics show no negative
`_diff`; otherwise only rows with a negative update are summed.

The table function `changes(name, from, to)` returns the raw updates with
`from < _time <= to`, with their `_time` and `_diff`, so that
snapshot(a) + changes(a, b) = snapshot(b).
- `from` defaults to -1 and `to` to the query's `as_of`: `changes('x')` is every
  update up to `as_of`. Only `from = -1` (or less) includes time 0, since the
  range is open below.
- `from` must be `>= since` once since is past 0 (below it, compaction may have
  moved times), and `to` must be `<= as_of` (later updates are not known yet, or
  are not part of this query); otherwise the query fails rather than answer wrong.

Names are validated as `[a-z_][a-z0-9_]*` (a full match: no trailing newline), at
most 63 characters and not starting with `__` (the connection's own tables and
views: `__since`, `__changes_<name>`), optionally prefixed by one schema
(`sys.frontiers`); identifiers are always quoted, and literals escaped.

SUBTLE: DuckDB has a built-in catalog named `system`, which makes a schema of
that name ambiguous in every query. Introspection collections live in schema
`sys` instead (DESIGN.md says `system`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import duckdb

from . import connections
from . import state as st
from .errors import InvalidInput, NotYetReadable, ReadBeforeSince
from .frontier import MAX_TIME
from .ids import NAME_RULE, name_problem, shown_name
from .parts import PartsSource
from .read import (
    DEFAULT_TIMEOUT_S,
    ReadHandle,
    _sleep_backoff,
    check_counts,
    is_collapsed,
    negative_count_error,
    parts_source_with_diffs,
    snapshot_sql,
)
from .updates import DIFF, TIME, overflow_checked, qident, qliteral  # noqa: F401 - flows/ quote with both


def check_name(name: str) -> tuple[str | None, str]:
    """Split and validate `name` or `schema.name`; raise InvalidInput naming the bad part."""
    if not isinstance(name, str):
        raise InvalidInput(f"collection name must be a str, got {type(name).__name__}")
    parts = name.split(".")
    why = "more than one '.'" if len(parts) > 2 else next(filter(None, map(name_problem, parts)), None)
    if why is not None:
        raise InvalidInput(
            f"collection name {shown_name(name)} is not valid ({why}): use {NAME_RULE}, optionally schema.name"
        )
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
    confine: bool = False,
) -> QueryConnection:
    """Open a DuckDB connection with one view per collection, all at ONE time.

    Every view shows its collection at the same `as_of`, as Materialize picks one
    timestamp per query: a join or a subquery over several collections never
    mixes times. Only the collections given are opened (give the ones a query
    mentions: a broken, unrelated collection cannot break it).

    Each collection is checked before any query runs: a row with a negative
    count at `as_of` raises `NegativeCount` here, so no filter of the query can
    skip it.

    Args:
        client: a `storage.Client`.
        collections: view name (`name` or `schema.name`) -> shard id.
        as_of: the time to read at. None: the latest time every collection can
            read, `min(upper) - 1`, which must be `>= max(since)`; if there is
            none yet (one collection's upper is behind another's since), wait up
            to `timeout` (default 10 s) for the uppers to move. An explicit
            `as_of` must be `>= since` of each, and waits up to `timeout` for
            every upper to pass it.
        timeout: seconds to wait, in total, for a readable time.
        confine: keep the connection's SQL away from the store (what `shardflow
            query` does). The negative-count checks read the parts natively; then
            the views are re-pointed at Arrow datasets of them (DuckDB opens no
            part itself), and DuckDB may open no file under the store's
            directories (the client's root, the blob directory, the consensus
            file's directory), to read or to write, and its configuration is
            locked. Every other path that exists when the connection opens stays
            readable and writable, as in DuckDB's own CLI; see `confine_connection`.

    Raises:
        InvalidInput: a bad view name.
        ReadBeforeSince: an explicit `as_of` before a collection's since.
        NotYetReadable: no readable time came within `timeout` (the message
            names each collection with its since and upper).
        NegativeCount: a collection has a row with a negative count at `as_of`.

    Example:
        >>> import pyarrow as pa, storage, tempfile
        >>> client = storage.open(tempfile.mkdtemp())
        >>> x, y = storage.ShardId.new(), storage.ShardId.new()
        >>> one = pa.table({"k": [1], "_time": [0], "_diff": [1]})
        >>> wx = client.open_writer(x, schema=pa.schema([("k", pa.int64())]))
        >>> wy = client.open_writer(y, schema=pa.schema([("k", pa.int64())]))
        >>> _ = wx.compare_and_append(one, 0, 10), wy.compare_and_append(one, 0, 10)
        >>> _ = wx.compare_and_append(pa.table({"k": [1, 2], "_time": [10, 10], "_diff": [-1, 1]}), 10, 20)
        >>> with storage.query.connect(client, {"x": x, "y": y}) as con:
        ...     con.as_of, con.sql("SELECT * FROM x FULL JOIN y USING (k)").fetchall()
        ({'x': 9, 'y': 9}, [(1,)])
    """
    checked = {name: _schema_alias(check_name(name)) for name in collections}
    con = connections.private()  # the user's: it holds the views and the changes() macro
    stack = ExitStack()
    try:
        readers: dict[str, ReadHandle] = {}
        for name, shard in collections.items():
            reader: ReadHandle = client.open_leased_reader(shard)
            stack.callback(reader.expire)
            readers[name] = reader
        # SUBTLE: the readers are registered first. Each holds its shard's since where it
        # is now, so no since can pass the time chosen below while we wait and read.
        t, states = _common_as_of(readers, as_of, timeout)
        con.execute("CREATE TABLE __since (hidden VARCHAR PRIMARY KEY, since BIGINT, as_of BIGINT)")
        for sch in sorted({sch for sch, _ in checked.values() if sch}):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {qident(sch)}")
        for name, s in states.items():
            schema, base = checked[name]
            hidden, batches = _create_views(con, stack, readers[name], s, name, schema, base, t)
            if confine:
                # The checks above read the parts natively; what the user's SQL reads is
                # re-pointed at Arrow datasets, before DuckDB loses access to the store.
                arrow = readers[name].client.parts.source(s, batches, con, f"__arrow_{hidden}", by_path=False)
                con.execute(f"CREATE OR REPLACE VIEW {qident(hidden)} AS SELECT * FROM {arrow.src}")
        # SUBTLE: below since, compaction may have advanced times (to since), so raw updates
        # there may not be where they were: changes() from a time below since would be
        # silently wrong. It is an error instead, like a snapshot before since. (With
        # since 0 nothing can have moved, so from = -1 means "everything".) Past the
        # query's as_of, updates may not be known yet (or are later than what the views
        # show): a `to` past it is an error too. The check is an uncorrelated scalar
        # subquery, so it runs even when the collection is empty or the query filters.
        key = "'__changes_' || replace(regexp_replace(name, '^system[.]', 'sys.'), '.', '__')"
        call = "'changes(' || name || ', ' || t_from || ', ' || coalesce(CAST(t_to AS VARCHAR), 'as_of') || ')'"
        con.execute(
            "CREATE MACRO changes(name, t_from := -1, t_to := NULL) AS TABLE "
            f"SELECT * FROM query_table({key}) WHERE (SELECT CASE "
            f"WHEN t_from < since AND since > 0 THEN error({call} || ': from is before since ' || since || "
            "'; times below since are compacted') "
            f"WHEN t_to > as_of THEN error({call} || ': to is past the query''s as_of ' || as_of || "
            "'; later updates are not part of this query (use --as-of to read at a later time)') "
            f"ELSE true END FROM __since WHERE hidden = {key}) "
            f"AND {TIME} > t_from AND {TIME} <= coalesce(t_to, (SELECT as_of FROM __since WHERE hidden = {key}))"
        )
        if confine:
            confine_connection(con, store_dirs(client))
    except BaseException:
        con.close()
        stack.close()
        raise
    return QueryConnection(con, stack, {name: t for name in collections})


def store_dirs(client: Any) -> list[str]:
    """The directories of `client`'s store on this machine: its root, a local blob's, a SQLite consensus's."""
    out = [client.root] if getattr(client, "root", None) else []
    local = getattr(client.blob, "local_path", None)
    part = local("k") if local is not None else None  # where a part would be, on this machine
    if isinstance(part, str):
        out.append(os.path.dirname(part))
    path = getattr(client.consensus, "path", None)
    if isinstance(path, str):
        out.append(os.path.dirname(os.path.abspath(path)))
    return out


def confine_connection(con: duckdb.DuckDBPyConnection, keep_out: Sequence[str]) -> None:
    """Forbid `con` to open any file under `keep_out`, and allow every other existing path.

    DuckDB has only allow-lists (`allowed_directories`, `allowed_paths`, which grant
    reading AND writing, OVERWRITE included), so the allowed set is built by
    walking down from `/` to each kept-out directory: every entry beside the path
    to it is allowed, whole. Not allowed, hence: the kept-out trees; a symlink beside
    that path that leads into one or to one of its ancestors; and a path that does not exist yet
    directly in an ancestor of one (`COPY ... TO 'out.csv'` next to `./data`: write
    into a subdirectory, or use `shardflow query -o`). Then `enable_external_access`
    goes off (only the allowed paths stay open) and `lock_configuration` on, so the
    SQL cannot undo it. DuckDB normalizes `..` before it checks.

    NB: DuckDB checks a path as written. A symlink deeper inside an allowed
    directory that leads into the store is not found by this walk (it would cost a
    walk of every allowed tree): such a link reaches the store.
    """
    outs = [os.path.realpath(p) for p in keep_out]

    def under(p: str, roots: Sequence[str]) -> bool:
        return any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    dirs: list[str] = []
    files: list[str] = []
    todo = [(os.sep, os.sep)] if outs else []  # (path, its real path)
    while todo:
        d, real_d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            # Only a symlink needs resolving (scandir knows which entries are symlinks).
            real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_d, e.name)
            if under(real, outs):
                continue  # the store, or a symlink into it
            if any(under(o, [real]) for o in outs):
                if not e.is_symlink():
                    todo.append((e.path, real))  # an ancestor of the store: allow what is beside the path
                continue
            (dirs if e.is_dir() else files).append(e.path)

    # Parameters, not literals: a long /tmp makes thousands of entries (and no quoting to get wrong).
    con.execute("SET allowed_directories = $1", [dirs])
    con.execute("SET allowed_paths = $1", [files])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _describe(states: Mapping[str, st.ShardState]) -> str:
    return ", ".join(f"{n} (since {s.since}, upper {s.upper})" for n, s in states.items())


def _common_as_of(
    readers: Mapping[str, ReadHandle], as_of: int | None, timeout: float | None
) -> tuple[int | None, dict[str, st.ShardState]]:
    """The one time every collection is read at, and each one's state, readable there.

    None (with each state) when every collection is still empty with upper 0:
    the views are then empty.
    """
    wait = DEFAULT_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + wait
    if as_of is not None:
        states = {}
        for name, r in readers.items():
            try:
                states[name] = r.wait_for_upper_past(as_of, max(deadline - time.monotonic(), 0.0))
            except (ReadBeforeSince, NotYetReadable) as e:
                # Say which collection: the user named collections, not shards.
                raise type(e)(f"collection {name}: {e}") from None
        return as_of, states
    attempt = 0
    while True:
        states = {name: r._fetch_live() for name, r in readers.items()}
        if not states or all(s.upper.time == 0 for s in states.values()):
            return None, states
        # The largest time every collection can read: below every upper, at or past every since.
        # (A since that has reached its own upper, or an upper behind another's since, leaves
        # none until the uppers move on.)
        hi = min((MAX_TIME if s.upper.time is None else s.upper.time - 1) for s in states.values())
        lo = max((s.since.time or 0) for s in states.values())
        if lo <= hi:
            return hi, {name: readers[name].wait_for_upper_past(hi, 0.0) for name in readers}
        if time.monotonic() >= deadline:
            where = f"collection {next(iter(states))}" if len(states) == 1 else "every collection of the query"
            raise NotYetReadable(
                f"no time is readable yet in {where}: min(upper) - 1 = {hi} is before max(since) = {lo} "
                f"after waiting {wait:g}s: {_describe(states)}"
            )
        _sleep_backoff(attempt)
        attempt += 1


# DuckDB's range() makes a list, and lists hold at most 2^32 elements.
_UNNEST_MAX = 2**32
INT64_MAX = 2**63 - 1

#: Off: every view consolidates (the general path). Tests compare the two.
FAST_PATHS = True


def view_plan(batches: Sequence[st.BatchMeta], diffs: tuple[int, int] | None, t: int) -> tuple[str, bool]:
    """How a collection's view at `t` is computed from the updates of `batches` (those with parts
    and `lower <= t`), and whether it needs the `_time <= t` filter. Pure: no IO.

    The kinds, each exact (the same multiset as consolidating) and each only where no
    `DiffOverflow` can be missed; the caller runs the negative-count check before any
    query (`check_counts`, or `_split`'s, which also handles what is `consolidate` here
    when retractions are few):
    - `scan`: one row per update. Every `_diff` is 1 (Parquet statistics), so a row's
      count is its number of updates. Or: one collapsed batch (`read.is_collapsed`: each
      row at most once, at a time `<= t`) whose max `_diff` is 1: its min is >= 1
      because, each row being one update, the negative-count check has proved none is
      negative, and a consolidated batch holds no zero.
    - `unnest`: each update repeated `_diff` times, no GROUP BY. Every `_diff` is
      >= 0 and the sum of all of them cannot pass int64 (updates x max `_diff`), so no
      row's sum can overflow; or one collapsed batch (no sums at all). Needs `_diff <
      2^32` (a DuckDB list holds at most that many elements).
    - `consolidate`: the GROUP BY (`snapshot_sql`), overflow-checked.
    The time filter is left out when every batch ends at or before `t + 1`: an
    update's time lies in its batch's `[lower, upper)` (compaction advances times to
    at most `upper - 1`).
    """
    needs_filter = any(b.upper.is_empty or b.upper.time > t + 1 for b in batches)  # type: ignore[operator]
    if not FAST_PATHS or diffs is None or not batches:
        return "consolidate", True
    lo, hi = diffs
    collapsed = len(batches) == 1 and is_collapsed(batches[0], t)
    if collapsed:
        if hi == 1:
            return "scan", False
        if hi < _UNNEST_MAX:
            return "unnest", False
        return "consolidate", True
    if lo >= 1 and hi == 1:
        return "scan", needs_filter
    rows = sum(b.rows for b in batches)
    if lo >= 0 and hi < _UNNEST_MAX and rows * hi <= INT64_MAX:
        return "unnest", needs_filter
    return "consolidate", True


def _create_views(
    con: duckdb.DuckDBPyConnection,
    stack: ExitStack,
    reader: ReadHandle,
    s: st.ShardState,
    name: str,
    schema: str | None,
    base: str,
    t: int | None,
) -> tuple[str, list[st.BatchMeta]]:
    """Create the view of one collection; return its hidden view's name and the batches it reads."""
    # SUBTLE: views are lazy; the reader pins this state version until the connection
    # closes, so gc cannot delete a part a view still reads.
    stack.enter_context(reader._reading(s))
    hidden = _hidden(f"{schema}.{base}" if schema else base)
    since = s.since.time if s.since.time is not None else MAX_TIME
    con.execute("INSERT INTO __since VALUES (?, ?, ?)", [hidden, since, -1 if t is None else t])
    # Only the batches that start at or before t: later ones hold no update at a time <= t,
    # which is all the views and changes() (whose `to` is at most t) may show. Their parts
    # are not verified or opened, and the _diff statistics below are those of what is read.
    batches = [b for b in s.batches if b.parts and (t is None or b.lower.less_equal(t))]
    ps = parts_source_with_diffs(reader.client, s, batches, con, f"__parts_{hidden}")
    con.execute(f"CREATE VIEW {qident(hidden)} AS SELECT * FROM {ps.src}")
    names = s.schema.names
    cols = ", ".join(qident(c) for c in names)
    if t is None:
        body = f"SELECT {cols} FROM {qident(hidden)} WHERE false"
    else:
        kind, filt = view_plan(batches, ps.diffs, t) if names else ("consolidate", True)
        src = qident(hidden)
        checked = False
        if kind == "consolidate" and names and FAST_PATHS and _splittable(batches, ps.diffs):
            kind, filt = _split(con, s, ps, batches, src, hidden, t, f"collection {name}")
            # `split` checked the rows with a retraction; `unnest` here: there is none at <= t.
            checked = kind != "consolidate"
        if not checked:
            # Validate before any filter of the query's: see the module doc.
            check_counts(con, s, ps, t, f"collection {name}")
        where = f" AND {TIME} <= {t}" if filt else ""
        if kind == "scan":
            # DESIGN.md §3 Query: a plain scan; DuckDB pushes the query's projections and
            # filters into the Parquet reader.
            body = f"SELECT {cols} FROM {src}" + (f" WHERE {TIME} <= {t}" if filt else "")
        elif kind == "unnest":
            # Rows of count 1 (usually most) are a plain scan; only the others are repeated
            # (`range` makes a list per row). DuckDB pushes a query's filter into both branches.
            body = (f"SELECT {cols} FROM {src} WHERE {DIFF} = 1{where} UNION ALL "
                    f"SELECT {cols} FROM (SELECT {cols}, unnest(range({DIFF})) AS __n FROM {src} "
                    f"WHERE {DIFF} > 1{where})")
        elif kind == "split":
            # Rows with no retraction at <= t: each update repeated by its diff (>= 0), an
            # anti-join against the few rows that have one; those few were consolidated
            # and checked at connect (`_split`).
            on = " AND ".join(f"p.{c} IS NOT DISTINCT FROM n.{c}" for c in map(qident, names))
            pcols = ", ".join(f"p.{c}" for c in map(qident, names))
            neg, cons = qident(f"__neg_{hidden}"), qident(f"__cons_{hidden}")
            body = (f"SELECT {pcols} FROM {src} AS p ANTI JOIN {neg} AS n ON {on} WHERE p.{DIFF} = 1{where}")
            if ps.diffs is not None and ps.diffs[1] > 1:
                body = (f"SELECT {cols} FROM (SELECT {pcols}, unnest(range(p.{DIFF})) AS __n FROM {src} AS p "
                        f"ANTI JOIN {neg} AS n ON {on} WHERE p.{DIFF} >= 1{where})")
            body += f" UNION ALL SELECT {cols} FROM (SELECT {cols}, unnest(range({DIFF})) AS __n FROM {cons})"
        else:
            agg = snapshot_sql(s, src, t)
            # INVARIANT: check_counts above proved every _diff here is > 0.
            body = f"SELECT * EXCLUDE ({DIFF}, __n) FROM (SELECT *, unnest(range({DIFF})) AS __n FROM ({agg}))"
    con.execute(f"CREATE VIEW {_qualified(schema, base)} AS {body}")
    return hidden, batches


#: `split` when the updates with a negative diff at <= as_of are at most this share of all.
#: Measured (2M updates, 200 batches, 10% retractions, connect + count/sum, 2 cores):
#: split 1.23-1.29 s vs consolidate 1.94-2.12 s (which groups everything twice: the
#: negative-count check, then the view). Not measured past 10%.
SPLIT_MAX_SHARE = 0.5


def _splittable(batches: Sequence[st.BatchMeta], diffs: tuple[int, int] | None) -> bool:
    """Statistics allow `_split`: every diff below 2^32 (unnest) and no sum of the rows
    without a retraction can pass int64 (updates x max diff)."""
    if diffs is None:
        return False
    hi = max(diffs[1], 1)
    return hi < _UNNEST_MAX and sum(b.rows for b in batches) * hi <= INT64_MAX


def _split(
    con: duckdb.DuckDBPyConnection, s: st.ShardState, ps: PartsSource, batches: Sequence[st.BatchMeta],
    src: str, hidden: str, t: int, what: str,
) -> tuple[str, bool]:
    """Consolidate only the rows that have a retraction at <= t; read the others as they are.

    A row with no negative update at <= t has a count that is the sum of non-negative
    diffs: repeating each of its updates by its diff is exact without grouping (and
    cannot overflow: `_splittable`). Only the rows with a negative update (`N`, a temp
    table of the connection, as small as the retractions are few) are consolidated,
    here, overflow-checked, and their counts checked: only they can be negative, so
    this is the whole negative-count check, before any filter of the query's. Returns
    the plan: `unnest` (no negative update at <= t at all), `split`, or `consolidate`
    (more than `SPLIT_MAX_SHARE` of the updates are retractions; `check_counts` follows).
    """
    cand = ps.neg or src
    filt = any(b.upper.is_empty or b.upper.time > t + 1 for b in batches)  # type: ignore[operator]
    negs = int(con.sql(f"SELECT count(*) FROM {cand} WHERE {DIFF} < 0 AND {TIME} <= {t}").fetchall()[0][0])
    if negs == 0:
        return "unnest", filt
    if negs > SPLIT_MAX_SHARE * sum(b.rows for b in batches):
        return "consolidate", True
    names = s.schema.names
    cols = ", ".join(qident(c) for c in names)
    on = " AND ".join(f"p.{c} IS NOT DISTINCT FROM n.{c}" for c in map(qident, names))
    neg, cons = qident(f"__neg_{hidden}"), qident(f"__cons_{hidden}")
    con.execute(f"CREATE TEMP TABLE {neg} AS SELECT DISTINCT {cols} FROM {cand} WHERE {DIFF} < 0 AND {TIME} <= {t}")
    rows = f"(SELECT p.* FROM {src} AS p SEMI JOIN {neg} AS n ON {on})"
    with overflow_checked():
        con.execute(f"CREATE TEMP TABLE {cons} AS {snapshot_sql(s, rows, t, what=what)}")
    bad = con.sql(f"SELECT {cols}, {t}::BIGINT AS {TIME}, {DIFF} FROM {cons} WHERE {DIFF} < 0 LIMIT 1")
    row = bad.to_arrow_table().to_pylist()
    if row:
        raise negative_count_error(what, row[0])
    return "split", filt

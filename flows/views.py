"""Incremental views: SQL over collections, maintained differentially in DuckDB.

A view's contents at every time `t` equal its SQL evaluated over its inputs'
contents at `t` (one time across all inputs). `ViewEngine` keeps that true
batch by batch; `view` wraps it as a bytewax operator; `FlowContext.view` and
`shardflow view` wire sources, the operator and the self-correcting sink.

The method (corrections against DuckDB-backed state):

1. **Arrangements.** Each input's updates live in a DuckDB table
   `(row..., _time, _diff)` (on disk when the engine has a path), compacted
   to the times still needed. Nothing is held whole in Python.
2. **Affected keys.** `flows.sqlplan.plan_view` finds, per input, key
   expressions by which the view's output partitions: group keys, DISTINCT
   columns, a window's partition key, or an equi-join key. The keys a
   time's delta touches are hashed (`hash(k1, k2, ..)`; a collision only
   adds work, never changes a result).
3. **Recompute only those.** At each distinct time `t` of a batch, the view's
   SQL runs twice over the arrangements restricted to the affected keys: at
   `t` (`_time <= t`) and just before it (`_time < t`). The difference,
   consolidated, is the correction at `t`. Retractions need no special
   case: MIN/MAX, top-k and DISTINCT are recomputed for the keys they touch.
4. **Linear queries** (projections, filters, UNION ALL) skip the
   arrangements: the correction is the SQL over the positive part of the
   delta minus the SQL over its negative part.
5. **Invertible aggregates** (`flows.invertible`): a single-input GROUP BY
   (or global aggregate) whose aggregates are all count/sum/avg keeps no
   arrangement, only a state table of per-group partial sums (row count,
   weighted sums, non-NULL counts). At each time the delta's partial sums
   are added in; the correction is the select list (and HAVING) over the
   touched groups' state after the addition minus before it. Work per time
   is proportional to the delta, not to the groups' rows.
6. **Anything else** with no usable key is recomputed whole at each time:
   correct, and as slow as that sounds (`plan_view` says when).

The SQL runs verbatim: each input's name is a temporary view over its
arrangement, redefined for every evaluation.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from bytewax.operators import StatefulBatchLogic

from storage import Frontier, Progress, UpdateBatch, consolidate_sql, overflow_checked
from storage.errors import InvalidInput

from .invertible import Invertible
from .invertible import invertible as find_invertible

TIME, DIFF = "_time", "_diff"
_ARR = "__sf_arr_"  # arrangement table prefix
_KEYS = "__sf_keys"  # the affected key hashes of one evaluation
_STATE = "__sf_state"  # the invertible fast path's per-group partial sums


class PlanLike(Protocol):
    """What the engine needs of a plan (`flows.sqlplan.Plan`)."""

    @property
    def sql(self) -> str: ...
    @property
    def inputs(self) -> tuple[str, ...]: ...
    @property
    def linear(self) -> bool: ...
    @property
    def keys(self) -> Mapping[str, tuple[str, ...]] | None: ...


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


@dataclass
class _Input:
    name: str
    schema: pa.Schema  # row columns only
    keys: tuple[str, ...] | None  # key expressions over its columns; () constant; None no key
    rows_since_compaction: int = 0
    rows_at_compaction: int = 0
    cols: str = field(init=False)

    def __post_init__(self) -> None:
        self.cols = ", ".join(_q(f.name) for f in self.schema)


class ViewEngine:
    """One view's incremental state: its inputs' arrangements in DuckDB, and the SQL.

    Feed it each input's updates with `step`, a batch of times at once; it
    returns the view's corrections at those times. `load` fills the
    arrangements from snapshots without producing output (a restart).

    Args:
        plan: `flows.sqlplan.plan_view(sql, schemas)`.
        schemas: each input's row schema (no `_time`/`_diff`).
        path: a DuckDB file for the arrangements (default: a temporary file, removed by `close`).
        memory_limit: DuckDB's memory limit for this engine (it spills to disk past it).
        invertible: use the invertible-aggregate fast path when the plan qualifies
            (`flows.invertible`; `self.invertible` is then not None). False forces the generic path.

    Example:
        >>> import pyarrow as pa
        >>> from flows.sqlplan import plan_view
        >>> s = {"bids": pa.schema([("auction", pa.int64()), ("amount", pa.int64())])}
        >>> e = ViewEngine(plan_view("SELECT auction, max(amount) AS top FROM bids GROUP BY auction", s), s)
        >>> b = pa.table({"auction": [1, 1, 2], "amount": [5, 9, 3], "_time": [1, 1, 1], "_diff": [1, 1, 1]})
        >>> sorted(e.step({"bids": b}).to_pylist(), key=str)
        [{'auction': 1, 'top': 9, '_time': 1, '_diff': 1}, {'auction': 2, 'top': 3, '_time': 1, '_diff': 1}]
        >>> sorted(e.step({"bids": b.slice(1, 1).set_column(2, "_time", pa.array([2])).set_column(3, "_diff", pa.array([-1]))}).to_pylist(), key=str)
        [{'auction': 1, 'top': 5, '_time': 2, '_diff': 1}, {'auction': 1, 'top': 9, '_time': 2, '_diff': -1}]
        >>> e.close()
    """

    def __init__(
        self,
        plan: PlanLike,
        schemas: Mapping[str, pa.Schema],
        *,
        path: str | None = None,
        memory_limit: str | None = None,
        invertible: bool = True,
    ):
        self.plan = plan
        self.sql = plan.sql
        self.where = f"view over {', '.join(plan.inputs)}"  # names the data in a DiffOverflow
        missing = [n for n in plan.inputs if n not in schemas]
        if missing:
            raise InvalidInput(f"view: no schema for input(s) {missing}")
        self._tmpdir: str | None = None
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="shardflow-view-")
            path = os.path.join(self._tmpdir, "arrangements.duckdb")
        self.path = path
        self.con = duckdb.connect(path)
        if memory_limit:
            self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute("SET preserve_insertion_order = false")
        keys = plan.keys
        self.inputs: dict[str, _Input] = {}
        for n in plan.inputs:
            k = None if keys is None else keys.get(n)
            self.inputs[n] = _Input(n, schemas[n], None if k is None else tuple(k))
            cols = ", ".join(f"{_q(f.name)} {_duck_type(self.con, f.type)}" for f in schemas[n])
            self.con.execute(
                f"CREATE OR REPLACE TABLE {_q(_ARR + n)} ({cols}{', ' if cols else ''}{TIME} BIGINT, {DIFF} BIGINT)"
            )
        # Restricting by key works only if every input has one (a constant key restricts nothing).
        self.keyed = keys is not None and all(self.inputs[n].keys is not None for n in plan.inputs)
        # Inner equi-joins, nothing else: the SQL is linear in each input separately, so a
        # change is the delta joined with the other inputs (the delta rules), no recompute.
        constructs = getattr(plan, "constructs", None)
        self.bilinear = (
            self.keyed and len(plan.inputs) > 1 and constructs is not None and set(constructs) == {"inner_join"}
            and all(self.inputs[n].keys for n in plan.inputs)
        )
        self.schema = self._output_schema()
        self.compacted_to: int | None = None
        self.invertible: Invertible | None = None
        if invertible and not plan.linear:
            self.invertible = find_invertible(plan, schemas, self.schema.names)
        if self.invertible is not None:
            self._inv_setup(self.invertible)

    # ------------------------------------------------------------------ set-up

    def _output_schema(self) -> pa.Schema:
        for i in self.inputs.values():
            self._define(i, "false", restrict=False)
        try:
            t = self.con.sql(self.sql).to_arrow_table()
        except duckdb.Error as e:
            raise InvalidInput(f"view: {str(e).splitlines()[0]}") from None
        names = t.schema.names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvalidInput(f"view: output column(s) {dup} appear more than once; name each column (AS ...)")
        bad = [n for n in names if n in (TIME, DIFF)]
        if bad:
            raise InvalidInput(f"view: output column(s) {bad} are reserved for the update's time and diff; rename them")
        return t.schema

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            if self._tmpdir is not None:
                import shutil

                shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ------------------------------------------------------------------ feeding

    def load(self, name: str, snapshot: pa.Table, time: int) -> None:
        """Add `snapshot` (row columns and `_diff`, e.g. a consolidated snapshot) at `time`, producing no output."""
        if self.invertible is not None:
            if name not in self.inputs:
                raise InvalidInput(f"view: {name!r} is not an input of this view (inputs: {list(self.inputs)})")
            self.con.register("__sf_in", snapshot)
            try:
                self._inv_merge("__sf_in")
            finally:
                self.con.unregister("__sf_in")
            return
        self._insert(self.inputs[name], snapshot, time)

    def step(self, deltas: Mapping[str, pa.Table]) -> pa.Table:
        """Apply each input's updates (row columns, `_time`, `_diff`); return the view's corrections.

        The times of all deltas must be at or past every time given before
        (the caller feeds whole frontier ranges in order). Returns the
        corrections consolidated per time, with `_time` and `_diff` last.
        """
        times: set[int] = set()
        for n, t in deltas.items():
            if n not in self.inputs:
                raise InvalidInput(f"view: {n!r} is not an input of this view (inputs: {list(self.inputs)})")
            if t.num_rows:
                times.update(pc.unique(t.column(TIME)).to_pylist())
        if not times:
            return self.empty()
        if self.plan.linear:
            return self._linear(deltas, sorted(times))
        if self.invertible is not None:
            return self._inv_step(deltas, sorted(times))
        for n, t in deltas.items():
            if t.num_rows:
                self._insert(self.inputs[n], t, None)
        if self.bilinear:
            outs = [self._delta_rules(t, deltas) for t in sorted(times)]
        else:
            outs = [self._at(t, deltas) for t in sorted(times)]
        return pa.concat_tables(outs) if len(outs) > 1 else outs[0]

    def baseline(self, t: int) -> pa.Table:
        """The SQL over the arrangements as they are (all of it), as insertions at time `t`.

        A new view starts from this: over empty inputs it is empty, except for
        a global aggregate, which has its one row (`count(*)` = 0) from the start.
        """
        if self.invertible is not None:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE __sf_new AS {self.invertible.output_sql(_STATE)}")
        else:
            self._run("true", False, "__sf_new")
        self.con.execute("CREATE OR REPLACE TEMP TABLE __sf_old AS SELECT * FROM __sf_new LIMIT 0")
        return self._difference(t)

    def empty(self) -> pa.Table:
        return self.schema.append(pa.field(TIME, pa.int64())).append(pa.field(DIFF, pa.int64())).empty_table()

    def _insert(self, i: _Input, t: pa.Table, time: int | None) -> None:
        cols = [f.name for f in i.schema]
        data = t.select(cols + ([TIME] if time is None else []) + [DIFF])
        self.con.register("__sf_in", data)
        try:
            tsel = TIME if time is None else str(int(time))
            sel = ", ".join([*(_q(c) for c in cols), f"{tsel}::BIGINT", f"{DIFF}::BIGINT"])
            self.con.execute(f"INSERT INTO {_q(_ARR + i.name)} SELECT {sel} FROM __sf_in")
        finally:
            self.con.unregister("__sf_in")
        i.rows_since_compaction += t.num_rows

    # ------------------------------------------------------------------ evaluation

    def _define(self, i: _Input, time_cond: str, *, restrict: bool) -> None:
        """(Re)define the view named like input `i`: its rows at a time (`time_cond`), repeated by count."""
        where = time_cond
        if restrict and i.keys:
            where += f" AND hash({', '.join(i.keys)}) IN (SELECT h FROM {_KEYS})"
        inner = consolidate_sql(
            f"(SELECT * FROM {_q(_ARR + i.name)} WHERE {where})", i.schema.names, drop_time=True, where=self.where
        )
        sel = i.cols if i.cols else "NULL AS __none"
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {_q(i.name)} AS SELECT {sel} FROM ({inner}) AS s, range(s.{DIFF})")

    def _affected(self, t: int, deltas: Mapping[str, pa.Table]) -> None:
        """Fill `__sf_keys` with the hashes of the keys the deltas at time `t` touch."""
        parts = []
        for n, d in deltas.items():
            i = self.inputs[n]
            if not d.num_rows or not i.keys:
                continue
            self.con.register(f"__sf_d_{n}", d)
            parts.append(f"SELECT hash({', '.join(i.keys)}) AS h FROM __sf_d_{n} WHERE {TIME} = {t}")
        q = " UNION ".join(parts) if parts else "SELECT NULL::UBIGINT AS h WHERE false"
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_KEYS} AS {q}")
        for n in deltas:
            try:
                self.con.unregister(f"__sf_d_{n}")
            except Exception:  # noqa: BLE001 - not registered (no rows)
                pass

    def _run(self, time_cond: str, restrict: bool, into: str) -> None:
        for i in self.inputs.values():
            self._define(i, time_cond, restrict=restrict)
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {into} AS {self.sql}")

    def _at(self, t: int, deltas: Mapping[str, pa.Table]) -> pa.Table:
        restrict = self.keyed
        if restrict:
            self._affected(t, deltas)
        self._run(f"{TIME} <= {t}", restrict, "__sf_new")
        self._run(f"{TIME} < {t}", restrict, "__sf_old")
        return self._difference(t)

    def _delta_rules(self, t: int, deltas: Mapping[str, pa.Table]) -> pa.Table:
        """The change at `t` of an inner-join view: for each input i whose delta has rows at `t`,
        the SQL over (delta of i) with the inputs before i at `t` and those after i just
        before `t` (so no pair of deltas is counted twice), each restricted to the keys
        of i's delta; positive and negative parts of the delta separately."""
        names = list(self.inputs)
        terms: list[pa.Table] = []
        for pos, n in enumerate(names):
            d = deltas.get(n)
            if d is None or not d.num_rows:
                continue
            self._affected(t, {n: d})
            for other_pos, m in enumerate(names):
                if m != n:
                    cond = f"{TIME} <= {t}" if other_pos < pos else f"{TIME} < {t}"
                    self._define(self.inputs[m], cond, restrict=True)
            i = self.inputs[n]
            self.con.register("__sf_in", d)
            try:
                for into, cond in (("__sf_new", f"{DIFF} > 0"), ("__sf_old", f"{DIFF} < 0")):
                    sel = i.cols if i.cols else "NULL AS __none"
                    self.con.execute(
                        f"CREATE OR REPLACE TEMP TABLE {_q(_ARR + n + '__d')} AS SELECT {sel} FROM "
                        f"(SELECT * FROM __sf_in WHERE {TIME} = {t} AND {cond}) AS s, range(abs(s.{DIFF}))"
                    )
                    self.con.execute(f"CREATE OR REPLACE TEMP VIEW {_q(n)} AS SELECT * FROM {_q(_ARR + n + '__d')}")
                    self.con.execute(f"CREATE OR REPLACE TEMP TABLE {into} AS {self.sql}")
            finally:
                self.con.unregister("__sf_in")
            terms.append(self._difference(t))
        if not terms:
            return self.empty()
        if len(terms) == 1:
            return terms[0]
        self.con.register("__sf_terms", pa.concat_tables(terms))
        try:
            with overflow_checked():
                out = self.con.sql(consolidate_sql("__sf_terms", self.schema.names, where=self.where)).to_arrow_table()
        finally:
            self.con.unregister("__sf_terms")
        return out.cast(self.empty().schema)

    def _difference(self, t: int, new: str = "SELECT * FROM __sf_new", old: str = "SELECT * FROM __sf_old") -> pa.Table:
        """The consolidated difference of the queries `new` and `old` (default: the tables `__sf_new`, `__sf_old`)."""
        cols = ", ".join(_q(n) for n in self.schema.names)
        sel = f"{cols}, " if cols else ""

        def side(q: str) -> str:
            return f"(SELECT {sel}{t}::BIGINT AS {TIME}, 1::BIGINT AS {DIFF} FROM ({q}))"

        with overflow_checked():
            q = consolidate_sql(side(new), self.schema.names, minus=side(old), where=self.where)
            out = self.con.sql(q).to_arrow_table()
        return out.cast(self.empty().schema) if out.schema != self.empty().schema else out

    def _linear(self, deltas: Mapping[str, pa.Table], times: list[int]) -> pa.Table:
        outs = []
        for t in times:
            for sign, cond in ((1, f"{DIFF} > 0"), (-1, f"{DIFF} < 0")):
                for n, i in self.inputs.items():
                    d = deltas.get(n)
                    self.con.register("__sf_in", d if d is not None and d.num_rows else _with_td(i.schema))
                    sel = i.cols if i.cols else "NULL AS __none"
                    self.con.execute(
                        f"CREATE OR REPLACE TEMP TABLE {_q(_ARR + n + '__d')} AS SELECT {sel} FROM "
                        f"(SELECT * FROM __sf_in WHERE {TIME} = {t} AND {cond}) AS s, range(abs(s.{DIFF}))"
                    )
                    self.con.unregister("__sf_in")
                    self.con.execute(f"CREATE OR REPLACE TEMP VIEW {_q(n)} AS SELECT * FROM {_q(_ARR + n + '__d')}")
                self.con.execute(f"CREATE OR REPLACE TEMP TABLE {'__sf_new' if sign > 0 else '__sf_old'} AS {self.sql}")
            outs.append(self._difference(t))
        return pa.concat_tables(outs) if len(outs) > 1 else outs[0]

    # ------------------------------------------------------------------ invertible aggregates

    def _inv_setup(self, inv: Invertible) -> None:
        """The state table (empty; a global aggregate's one row of zeros) and the views over a merge."""
        arr = _q(_ARR + inv.input)
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_STATE} AS {inv.partial_sql(arr)} LIMIT 0")
        cols = inv.state_columns()
        if inv.global_:
            self.con.execute(f"INSERT INTO {_STATE} VALUES ({', '.join('0' for _ in cols)})")
        keys = [c for c in cols if c.startswith("__sf_g")]
        vals = [c for c in cols if c not in keys]
        # __sf_m: per touched group, its state before (__sf_o*) and after the merge.
        old = ", ".join([*keys, *(f"{c} AS __sf_o{c[5:]}" for c in vals), *vals])
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE __sf_m AS SELECT {old} FROM {_STATE} LIMIT 0")
        live = "" if inv.global_ else " WHERE __sf_oc > 0"
        sel = ", ".join([*keys, *(f"__sf_o{c[5:]} AS {c}" for c in vals)])
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW __sf_inv_old AS SELECT {sel} FROM __sf_m{live}")
        live = "" if inv.global_ else " WHERE __sf_c > 0"
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW __sf_inv_new AS SELECT {', '.join(cols)} FROM __sf_m{live}")
        self._inv_cols = (keys, vals)
        self._inv_deleted = 0  # state rows deleted since the table was last rewritten
        # Different groups give different rows: a group's old and new row need no consolidation with others.
        self._inv_distinct = inv.distinct_groups

    def _inv_merge(self, source: str) -> None:
        """Add the partial sums of the updates in `source` into the state (filling `__sf_m`)."""
        inv = self.invertible
        assert inv is not None
        keys, vals = self._inv_cols
        part = f"({inv.partial_sql(source)})"
        new = []
        for c in vals:
            add = f"coalesce(s.{c}, 0) + coalesce(p.{c}, 0)"
            if c.startswith("__sf_s"):
                n = "__sf_n" + c[6:]
                t = inv.sum_types[int(c[6:])]
                # a sum whose values all went away restarts from an exact 0 (no floating-point residue)
                new.append(f"CAST(CASE WHEN coalesce(s.{n}, 0) + coalesce(p.{n}, 0) = 0 THEN 0 ELSE {add} END AS {t}) AS {c}")
            else:
                new.append(f"CAST({add} AS BIGINT) AS {c}")
        olds = [f"coalesce(s.{c}, 0) AS __sf_o{c[5:]}" for c in vals]
        sel = ", ".join([*(f"p.{k}" for k in keys), *olds, *new])
        if keys:
            on = " AND ".join(f"s.{k} IS NOT DISTINCT FROM p.{k}" for k in keys)
            src = f"{part} AS p LEFT JOIN {_STATE} AS s ON {on}"
        else:
            src = f"{part} AS p, {_STATE} AS s"
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE __sf_m AS SELECT {sel} FROM {src}")
        cols = ", ".join([*keys, *vals])
        if keys:
            on = " AND ".join(f"s.{k} IS NOT DISTINCT FROM m.{k}" for k in keys)
            gone = self.con.execute(f"DELETE FROM {_STATE} AS s USING __sf_m AS m WHERE {on} AND m.__sf_oc <> 0")
            self._inv_deleted += int(gone.fetchall()[0][0])
            self.con.execute(f"INSERT INTO {_STATE} ({cols}) SELECT {cols} FROM __sf_m WHERE __sf_c <> 0")
        else:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_STATE} AS SELECT {cols} FROM __sf_m")

    def _inv_step(self, deltas: Mapping[str, pa.Table], times: list[int]) -> pa.Table:
        inv = self.invertible
        assert inv is not None
        d = deltas[inv.input]
        self.con.register("__sf_in", d)
        outs = []
        try:
            for t in times:
                self._inv_merge(f"(SELECT * FROM __sf_in WHERE {TIME} = {int(t)})")
                if self._inv_distinct:
                    out = self.con.sql(inv.change_sql("__sf_m", t)).to_arrow_table()
                    outs.append(out.cast(self.empty().schema) if out.schema != self.empty().schema else out)
                else:
                    outs.append(self._difference(t, inv.output_sql("__sf_inv_new"), inv.output_sql("__sf_inv_old")))
        finally:
            self.con.unregister("__sf_in")
        return pa.concat_tables(outs) if len(outs) > 1 else outs[0]

    # ------------------------------------------------------------------ upkeep

    def compact(self, to: int) -> None:
        """Advance every arrangement time below `to` to `to` and consolidate (the engine never
        evaluates below `to` again). Cheap to call often: it works only when an
        arrangement has grown by half since its last compaction."""
        if self.invertible is not None:
            # No arrangements; the state is always consolidated, but its deleted rows stay in the
            # table until it is rewritten: rewrite it when they outnumber the live ones.
            live = self.arrangement_rows()[self.invertible.input]
            if self._inv_deleted > max(10000, live):
                self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_STATE} AS SELECT * FROM {_STATE}")
                self._inv_deleted = 0
            self.compacted_to = to
            return
        if self.plan.linear:
            return
        for i in self.inputs.values():
            if i.rows_since_compaction <= max(1000, i.rows_at_compaction // 2):
                continue
            arr = _q(_ARR + i.name)
            tmp = _q(_ARR + i.name + "__c")
            with overflow_checked():
                self.con.execute(
                    f"CREATE OR REPLACE TABLE {tmp} AS "
                    + consolidate_sql(arr, i.schema.names, since=to, where=self.where)
                )
            self.con.execute(f"DROP TABLE {arr}")
            self.con.execute(f"ALTER TABLE {tmp} RENAME TO {_q(_ARR + i.name)}")
            n = self.con.execute(f"SELECT count(*) FROM {arr}").fetchall()[0][0]
            i.rows_at_compaction, i.rows_since_compaction = int(n), 0
        self.compacted_to = to

    def arrangement_rows(self) -> dict[str, int]:
        """Rows held per input: its arrangement's, or the fast path's state rows (one per live group)."""
        if self.invertible is not None:
            n = self.con.execute(f"SELECT count(*) FROM {_STATE}").fetchall()[0][0]
            return {self.invertible.input: int(n)}
        return {n: int(self.con.execute(f"SELECT count(*) FROM {_q(_ARR + n)}").fetchall()[0][0]) for n in self.inputs}


def _with_td(schema: pa.Schema) -> pa.Table:
    return schema.append(pa.field(TIME, pa.int64())).append(pa.field(DIFF, pa.int64())).empty_table()


def _duck_type(con: duckdb.DuckDBPyConnection, t: pa.DataType) -> str:
    """The DuckDB type of an Arrow type (as DuckDB maps it on import)."""
    con.register("__sf_t", pa.table({"x": pa.array([], t)}))
    try:
        return str(con.execute("DESCRIBE SELECT x FROM __sf_t").fetchall()[0][1])
    finally:
        con.unregister("__sf_t")


# --------------------------------------------------------------------------------------------
# the operator
# --------------------------------------------------------------------------------------------


class _ViewLogic(StatefulBatchLogic[Any, Any, None]):
    """Buffers each input's updates until every input's frontier passed them, then asks
    the engine for the view's corrections over the whole ready range.

    One consistent time: the view's frontier is the minimum over its inputs'
    frontiers, so a correction at `t` reflects every input's updates up to `t`.
    """

    def __init__(self, step_id: str, make_engine: Callable[[], ViewEngine], start: int | None, fresh: bool):
        from .operators import FrontierTracker, OffsetQueue

        self.step_id = step_id
        self.engine = make_engine()
        self.trackers = {n: FrontierTracker() for n in self.engine.inputs}
        self.pending: dict[str, list[pa.Table]] = {n: [] for n in self.engine.inputs}
        self.offsets = OffsetQueue()
        self.emitted: Frontier | None = None if start is None else Frontier(start)
        self.fresh = fresh

    def on_batch(self, values: list[tuple[str, Any]]) -> tuple[Iterable[Any], bool]:
        from .operators import check_item, tmax_of

        for name, v in values:
            check_item(self.step_id, v)
            if isinstance(v, Progress):
                self.trackers[name].observe(v)
                continue
            if v.table.num_rows:
                self.pending[name].append(v.table)
            self.offsets.push(v.offsets, tmax_of(v.table))
        fs = [t.frontier() for t in self.trackers.values()]
        if any(f is None for f in fs):
            return [], StatefulBatchLogic.RETAIN
        f = min(x for x in fs if x is not None)
        if self.emitted is not None and f <= self.emitted:
            return [], StatefulBatchLogic.RETAIN
        return self._flush(f), StatefulBatchLogic.RETAIN

    def _flush(self, upper: Frontier) -> list[Any]:
        lower = self.emitted if self.emitted is not None else Frontier.MIN
        ready: dict[str, pa.Table] = {}
        for n, tables in self.pending.items():
            if not tables:
                continue
            t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            if upper.time is None:
                ready[n], keep = t, None
            else:
                below = pc.less(t.column(TIME), pa.scalar(upper.time, pa.int64()))
                ready[n], keep = t.filter(below), t.filter(pc.invert(below))
            self.pending[n] = [keep] if keep is not None and keep.num_rows else []
        outs = []
        if self.fresh:
            # A new view starts from the SQL over empty inputs (a global aggregate has a row).
            first = lower.time or 0
            if ready:
                first = min([first, *(pc.min(t.column(TIME)).as_py() for t in ready.values() if t.num_rows)])
            outs.append(self.engine.baseline(first))
            self.fresh = False
        outs.append(self.engine.step(ready))
        if upper.time is not None and upper.time > 0:
            self.engine.compact(upper.time - 1)
        table = pa.concat_tables(outs) if len(outs) > 1 else outs[0]
        offsets = self.offsets.pop(upper)
        self.emitted = upper
        out: list[Any] = []
        if table.num_rows or offsets:
            out.append(UpdateBatch(table, lower, upper, offsets or None))
        out.append(Progress(upper))
        return out

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        self.engine.close()
        return [], StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        return None


def view(
    step_id: str,
    inputs: Mapping[str, Any],
    sql: str | PlanLike,
    *,
    schemas: Mapping[str, pa.Schema],
    preload: Callable[[ViewEngine], None] | None = None,
    start: int | None = None,
    path: str | None = None,
    fresh: bool | None = None,
    memory_limit: str | None = None,
    offsets: Mapping[str, Any] | None = None,
) -> Any:
    """The incremental view operator: `inputs` (input name -> stream of `UpdateBatch`/`Progress`)
    in, the view's corrections out (`UpdateBatch` per frontier advance, then `Progress`).

    `sql` is the view's SQL over the input names (or its `flows.sqlplan.plan_view`
    plan); `schemas` gives each input's row schema. A resumed view passes
    `preload` (fills the engine's arrangements from the inputs' snapshots at
    its committed frontier minus one, with no output) and `start` (that
    frontier); a new one passes neither and starts from the SQL over empty
    inputs. Runs on one worker (one key); DuckDB uses its own threads.

    `fresh=True` with a `preload` starts a new view from loaded snapshots: its
    first output is the SQL over them, at `start` (the snapshots' time), and
    the inputs go on after it; `offsets` (each input's partition key -> that
    frontier) are then committed with it, as a snapshot's offsets would be.
    `memory_limit` is the engine's (`ViewEngine`).
    """
    import bytewax.operators as op

    from .operators import one_key
    from .sqlplan import plan_view

    plan: PlanLike = plan_view(sql, schemas) if isinstance(sql, str) else sql
    if set(inputs) != set(plan.inputs):
        raise InvalidInput(f"view {step_id!r}: streams for {sorted(inputs)}, but the SQL reads {sorted(plan.inputs)}")

    def make_engine() -> ViewEngine:
        e = ViewEngine(plan, schemas, path=path, memory_limit=memory_limit)
        if preload is not None:
            preload(e)
        return e

    def tagger(n: str) -> Callable[[Any], tuple[str, Any]]:
        return lambda x: (n, x)

    tagged = [op.map(f"{step_id}_tag_{n}", s, tagger(n)) for n, s in inputs.items()]
    merged = op.merge(f"{step_id}_merge", *tagged) if len(tagged) > 1 else tagged[0]
    keyed = one_key(f"{step_id}_key", merged)

    def builder(_resume: Any) -> _ViewLogic:
        logic = _ViewLogic(step_id, make_engine, start, fresh=preload is None if fresh is None else fresh)
        logic.offsets.push(offsets, -1)  # covered by the first output
        return logic

    out = op.stateful_batch(f"{step_id}_maintain", keyed, builder)
    return op.key_rm(f"{step_id}_unkey", out)


def output_schema(plan: PlanLike, schemas: Mapping[str, pa.Schema]) -> pa.Schema:
    """The row schema of the view `plan` over inputs of `schemas` (the SQL run on empty inputs)."""
    e = ViewEngine(plan, schemas)
    try:
        return e.schema
    finally:
        e.close()

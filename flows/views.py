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
   (or global aggregate) whose aggregates are all count/sum/avg/min/max keeps
   a state table of per-group partial sums (row count, weighted sums, non-NULL
   counts, extremes). At each time the delta's partial sums are added in; the
   correction is the select list (and HAVING) over the touched groups' state
   after the addition minus before it. Work per time is proportional to the
   delta, not to the groups' rows. Without min/max there is no arrangement at
   all; with them, a group whose extreme was retracted is recomputed from the
   arrangement (only those groups).
6. **Anything else** with no usable key is recomputed whole at each time:
   correct, and as slow as that sounds (`plan_view` says when).

The SQL runs verbatim: each input's name is a temporary view over its
arrangement, redefined for every evaluation.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from bytewax.operators import StatefulBatchLogic

from storage import Frontier, Progress, UpdateBatch, consolidate_sql, overflow_checked
from storage.errors import InvalidInput, InvariantViolated
from storage.query import qident, qliteral

from .invertible import Invertible
from .invertible import invertible as find_invertible

TIME, DIFF = "_time", "_diff"
_ARR = "__sf_arr_"  # arrangement table prefix
_KEYS = "__sf_keys"  # the affected key hashes of one step: (_time, src, h)
_DELTA = "__sf_d_"  # a step's delta of an input, registered
_OUT = "__sf_out"  # the view's contents as emitted, each row with its key's hash (`_exact_step`)
_KH = "__sf_kh"
_STATE = "__sf_state"  # the invertible fast path's per-group partial sums
_H = "__sf_h"  # an arrangement row's key hash
_MAX_TERMS = 64  # evaluations (a time, a sign) per statement


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


_q = qident


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
            self.con.execute(f"SET memory_limit = {qliteral(memory_limit)}")
        self.con.execute("SET preserve_insertion_order = false")
        keys = plan.keys
        self.inputs: dict[str, _Input] = {}
        for n in plan.inputs:
            k = None if keys is None else keys.get(n)
            self.inputs[n] = _Input(n, schemas[n], None if k is None else tuple(k))
            cols = ", ".join(f"{_q(f.name)} {_duck_type(self.con, f.type)}" for f in schemas[n])
            # A keyed input's rows carry their key's hash (`__sf_h`), computed once on insert.
            h = f", {_H} UBIGINT" if self.inputs[n].keys else ""
            self.con.execute(
                f"CREATE OR REPLACE TABLE {_q(_ARR + n)} ({cols}{', ' if cols else ''}{TIME} BIGINT, {DIFF} BIGINT{h})"
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
        # The generic path's "before" side: what the view emitted (see `_exact_step`), when each
        # output row shows which key it belongs to; else it is recomputed (`_recompute_terms`).
        self.key_hash: str | None = None
        if self.invertible is None and not plan.linear and not self.bilinear and self.keyed:
            self.key_hash = _output_key_hash(plan, self.inputs, self.schema.names)
        self._inputs_loaded = self._out_ready = False
        if self.key_hash is not None:
            cols = ", ".join(f"{_q(f.name)} {_duck_type(self.con, f.type)}" for f in self.schema)
            self.con.execute(
                f"CREATE OR REPLACE TABLE {_OUT} ({cols}{', ' if cols else ''}{_KH} UBIGINT, {DIFF} BIGINT)"
            )
            self._out_deleted = 0

    # ------------------------------------------------------------------ set-up

    def _output_schema(self) -> pa.Schema:
        try:
            t = self.con.sql(self._over({n: self._rows(i, "false") for n, i in self.inputs.items()})).to_arrow_table()
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
            if self.invertible.extremes:
                self._insert(self.inputs[name], snapshot, time)
                self._loaded(name, snapshot.num_rows)
            self.con.register("__sf_in", snapshot)
            try:
                self._inv_merge("__sf_in", time)
            finally:
                self.con.unregister("__sf_in")
            return
        self._insert(self.inputs[name], snapshot, time)
        self._loaded(name, snapshot.num_rows)
        self._inputs_loaded = True

    def load_output(self, snapshot: pa.Table, part: tuple[int, int] | None = None) -> None:
        """Add the view's own contents (row columns and `_diff`: its snapshot where the inputs were
        loaded) on a restart; with `part=(i, n)`, only the rows whose key hash is i modulo n.

        The engine then retracts exactly what the view holds; without it, a resumed engine
        recomputes what the view held instead (exact only for deterministic SQL)."""
        if self.key_hash is None:
            return
        self.con.register("__sf_in", snapshot)
        try:
            cols = ", ".join(_q(n) for n in self.schema.names)
            sel = f"{cols}, " if cols else ""
            q = f"SELECT {sel}hash({self.key_hash}) AS {_KH}, {DIFF}::BIGINT FROM __sf_in"
            if part is not None:
                q = f"SELECT * FROM ({q}) WHERE {_KH} % {int(part[1])} = {int(part[0])}"
            self.con.execute(f"INSERT INTO {_OUT} {q}")
        finally:
            self.con.unregister("__sf_in")
        self._out_ready = True

    def _loaded(self, name: str, n: int) -> None:
        """A consolidated snapshot of `n` rows went in: it counts as compacted rows, not new ones."""
        i = self.inputs[name]
        i.rows_since_compaction -= n
        i.rows_at_compaction += n

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
        if self.invertible is not None:
            return self._inv_step(deltas, sorted(times))
        live = {n: t for n, t in deltas.items() if t.num_rows}
        if self.key_hash is not None and self._inputs_loaded and not self._out_ready:
            self.key_hash = None  # restarted without the view's contents: recompute the old side
        if not self.plan.linear:
            for n, t in live.items():
                self._insert(self.inputs[n], t, None)
        for n, t in live.items():
            self.con.register(_q(_DELTA + n)[1:-1], t)
        try:
            if self.plan.linear:
                terms = self._linear_terms(live, sorted(times))
            else:
                self._affected(live)
                if self.bilinear:
                    terms = self._delta_rule_terms(live, sorted(times))
                elif self.key_hash is not None:
                    return self._exact_step(sorted(times))
                else:
                    terms = self._recompute_terms(sorted(times))
            return self._consolidated(terms)
        finally:
            for n in live:
                self.con.unregister(_q(_DELTA + n)[1:-1])

    def baseline(self, t: int) -> pa.Table:
        """The SQL over the arrangements as they are (all of it), as insertions at time `t`.

        A new view starts from this: over empty inputs it is empty, except for
        a global aggregate, which has its one row (`count(*)` = 0) from the start.
        """
        if self.invertible is not None:
            return self._consolidated([(t, 1, f"({self.invertible.output_sql(_STATE)})")])
        if self.key_hash is not None:
            q = self._over({n: self._rows(i, "true") for n, i in self.inputs.items()})
            self.con.execute(f"INSERT INTO {_OUT} SELECT *, hash({self.key_hash}), 1 FROM {q}")
            self._out_ready = True
        return self._consolidated([(t, 1, self._over({n: self._rows(i, "true") for n, i in self.inputs.items()}))])

    def empty(self) -> pa.Table:
        return self.schema.append(pa.field(TIME, pa.int64())).append(pa.field(DIFF, pa.int64())).empty_table()

    def _insert(self, i: _Input, t: pa.Table, time: int | None) -> None:
        cols = [f.name for f in i.schema]
        data = t.select(cols + ([TIME] if time is None else []) + [DIFF])
        self.con.register("__sf_in", data)
        try:
            tsel = TIME if time is None else str(int(time))
            sel = ", ".join([*(_q(c) for c in cols), f"{tsel}::BIGINT", f"{DIFF}::BIGINT"])
            if i.keys:
                sel += f", hash({', '.join(i.keys)})"
            self.con.execute(f"INSERT INTO {_q(_ARR + i.name)} SELECT {sel} FROM __sf_in")
        finally:
            self.con.unregister("__sf_in")
        i.rows_since_compaction += t.num_rows

    # ------------------------------------------------------------------ evaluation
    #
    # Every evaluation is one term `(time, sign, query)`: the view's SQL, verbatim, inside a
    # WITH that binds each input's name to some rows (the arrangement at a time, restricted
    # to some keys; or a delta). All of a step's terms go into one statement, consolidated:
    # the per-statement cost of DuckDB is paid once per step, not once per time.

    def _rows(self, i: _Input, cond: str, *, keys: str | None = None) -> str:
        """Input `i`'s rows in its arrangement where `cond` (on `_time`), each repeated by its count;
        only the keys whose hashes `keys` (a subquery) gives, if set."""
        where = cond
        if keys is not None and i.keys:
            where += f" AND {_H} IN ({keys})"
        inner = consolidate_sql(
            f"(SELECT * FROM {_q(_ARR + i.name)} WHERE {where})", i.schema.names, drop_time=True, where=self.where
        )
        sel = i.cols if i.cols else "NULL AS __none"
        return f"SELECT {sel} FROM ({inner}) AS s, range(s.{DIFF})"

    def _delta_rows(self, i: _Input, t: int, sign: int) -> str:
        """The positive (`sign` 1) or negative (-1) part of input `i`'s delta at `t`, as rows."""
        sel = i.cols if i.cols else "NULL AS __none"
        cond = f"{DIFF} > 0" if sign > 0 else f"{DIFF} < 0"
        return f"SELECT {sel} FROM (SELECT * FROM {_q(_DELTA + i.name)} WHERE {TIME} = {t} AND {cond}) AS s, range(abs(s.{DIFF}))"

    def _over(self, rows: Mapping[str, str]) -> str:
        """The view's SQL with each input's name bound to `rows[name]` (a query)."""
        ctes = ", ".join(f"{_q(n)} AS ({q})" for n, q in rows.items())
        return f"(WITH {ctes} SELECT * FROM ({self.sql}))"

    def _affected(self, deltas: Mapping[str, pa.Table]) -> None:
        """Fill `__sf_keys (_time, src, h)`: per time and input, the hashes of the keys its delta touches."""
        parts = [
            f"SELECT DISTINCT {TIME}, {qliteral(n)} AS src, hash({', '.join(self.inputs[n].keys or ())}) AS h FROM {_q(_DELTA + n)}"
            for n in deltas if self.inputs[n].keys
        ]
        q = " UNION ALL ".join(parts) if parts else f"SELECT NULL::BIGINT AS {TIME}, NULL AS src, NULL::UBIGINT AS h WHERE false"
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_KEYS} AS {q}")

    def _recompute_terms(self, times: list[int]) -> list[tuple[int, int, str]]:
        """At each time, the SQL over the arrangements at `t` minus just before `t`, restricted to the
        keys the deltas at `t` touch (unrestricted when the view has no key)."""
        terms = []
        for t in times:
            keys = f"SELECT h FROM {_KEYS} WHERE {TIME} = {t}" if self.keyed else None
            for sign, cond in ((1, f"{TIME} <= {t}"), (-1, f"{TIME} < {t}")):
                terms.append((t, sign, self._over({n: self._rows(i, cond, keys=keys) for n, i in self.inputs.items()})))
        return terms

    def _exact_step(self, times: list[int]) -> pa.Table:
        """The change at each time, with the old side exactly what the view emitted.

        `__sf_n`: per time `t`, the SQL over the arrangements at `t` restricted to the keys the
        deltas at `t` touch, each row with its key's hash (`key_hash`, over the output).
        The old side of key `h` at `t` is its rows of `__sf_n` at the previous time of this
        step that touched `h`, else its rows in `__sf_out` (what the view holds). So a SQL
        whose answer is not a function of its input (a DOUBLE sum added in another order, a
        tie in ORDER BY) still retracts exactly the rows it once emitted.
        """
        cols = [_q(n) for n in self.schema.names]
        sel = "".join(f"{c}, " for c in cols)
        nsel = "".join(f"n.{c}, " for c in cols)
        if self.inputs and all(i.keys for i in self.inputs.values()):
            kt = f"SELECT DISTINCT {TIME}, h FROM {_KEYS}"
        else:  # a constant key: every time touches the one key
            kt = f"SELECT unnest([{', '.join(str(int(t)) for t in times)}])::BIGINT AS {TIME}, hash({self.key_hash}) AS h"
        self.con.execute(
            f"CREATE OR REPLACE TEMP TABLE __sf_kt AS SELECT {TIME}, h, "
            f"lag({TIME}) OVER (PARTITION BY h ORDER BY {TIME}) AS prev FROM ({kt})"
        )
        for k in range(0, len(times), _MAX_TERMS):
            parts = []
            for t in times[k : k + _MAX_TERMS]:
                keys = f"SELECT h FROM {_KEYS} WHERE {TIME} = {t}"
                q = self._over({n: self._rows(i, f"{TIME} <= {t}", keys=keys) for n, i in self.inputs.items()})
                parts.append(f"(SELECT *, {int(t)}::BIGINT AS {TIME} FROM {q})")
            new = f"SELECT *, hash({self.key_hash}) AS {_KH} FROM ({' UNION ALL '.join(parts)})"
            verb = "CREATE OR REPLACE TEMP TABLE __sf_n AS" if k == 0 else "INSERT INTO __sf_n"
            self.con.execute(f"{verb} {new}")
        stray = self.con.execute(
            f"SELECT count(*) FROM __sf_n n ANTI JOIN __sf_kt k ON n.{_KH} = k.h AND n.{TIME} = k.{TIME}"
        ).fetchall()[0][0]
        if stray:
            raise InvariantViolated(
                f"{self.where}: {stray} output row(s) carry a key the change did not touch (key hash {self.key_hash})"
            )
        terms = (
            f"SELECT {sel}{TIME}, 1::BIGINT AS {DIFF} FROM __sf_n UNION ALL "
            f"SELECT {nsel}k.{TIME}, -1::BIGINT FROM __sf_kt AS k JOIN __sf_n AS n ON n.{_KH} = k.h AND n.{TIME} = k.prev "
            f"UNION ALL SELECT {''.join(f'o.{c}, ' for c in cols)}k.{TIME}, -o.{DIFF} FROM __sf_kt AS k "
            f"JOIN {_OUT} AS o ON o.{_KH} = k.h WHERE k.prev IS NULL"
        )
        with overflow_checked():
            out = self.con.sql(consolidate_sql(f"({terms})", self.schema.names, where=self.where)).to_arrow_table()
        gone = self.con.execute(f"DELETE FROM {_OUT} WHERE {_KH} IN (SELECT h FROM __sf_kt)").fetchall()[0][0]
        self._out_deleted += int(gone)
        self.con.execute(
            f"INSERT INTO {_OUT} SELECT {nsel}n.{_KH}, 1 FROM __sf_n AS n JOIN "
            f"(SELECT h, max({TIME}) AS last FROM __sf_kt GROUP BY h) AS l ON n.{_KH} = l.h AND n.{TIME} = l.last"
        )
        return out.cast(self.empty().schema) if out.schema != self.empty().schema else out

    def _delta_rule_terms(self, deltas: Mapping[str, pa.Table], times: list[int]) -> list[tuple[int, int, str]]:
        """The change at each `t` of an inner-join view: for each input i whose delta has rows at `t`,
        the SQL over (delta of i) with the inputs before i at `t` and those after i just
        before `t` (so no pair of deltas is counted twice), each restricted to the keys
        of i's delta; positive and negative parts of the delta separately."""
        names = list(self.inputs)
        times_of = {
            n: set(pc.unique(d.column(TIME)).to_pylist()) for n, d in deltas.items()
        }  # fmt: skip
        terms = []
        for t in times:
            for pos, n in enumerate(names):
                if t not in times_of.get(n, ()):
                    continue
                keys = f"SELECT h FROM {_KEYS} WHERE {TIME} = {t} AND src = {qliteral(n)}"
                for sign in (1, -1):
                    rows = {}
                    for other_pos, m in enumerate(names):
                        if m == n:
                            rows[m] = self._delta_rows(self.inputs[m], t, sign)
                        else:
                            cond = f"{TIME} <= {t}" if other_pos < pos else f"{TIME} < {t}"
                            rows[m] = self._rows(self.inputs[m], cond, keys=keys)
                    terms.append((t, sign, self._over(rows)))
        return terms

    def _linear_terms(self, deltas: Mapping[str, pa.Table], times: list[int]) -> list[tuple[int, int, str]]:
        """A linear view's change at `t`: the SQL over the deltas' positive parts minus over their negative parts."""
        terms = []
        for t in times:
            for sign in (1, -1):
                rows = {
                    n: self._delta_rows(i, t, sign) if n in deltas else self._rows(i, "false")
                    for n, i in self.inputs.items()
                }
                terms.append((t, sign, self._over(rows)))
        return terms

    def _consolidated(self, terms: list[tuple[int, int, str]]) -> pa.Table:
        """The terms' rows, each at its time with its sign, consolidated: the corrections."""
        cols = ", ".join(_q(n) for n in self.schema.names)
        sel = f"{cols}, " if cols else ""
        outs = []
        for k in range(0, len(terms), _MAX_TERMS):
            parts = [
                f"(SELECT {sel}{int(t)}::BIGINT AS {TIME}, {int(sign)}::BIGINT AS {DIFF} FROM {q})"
                for t, sign, q in terms[k : k + _MAX_TERMS]
            ]
            with overflow_checked():
                q = consolidate_sql("(" + " UNION ALL ".join(parts) + ")", self.schema.names, where=self.where)
                outs.append(self.con.sql(q).to_arrow_table())
        if not outs:
            return self.empty()
        out = pa.concat_tables(outs) if len(outs) > 1 else outs[0]
        return out.cast(self.empty().schema) if out.schema != self.empty().schema else out

    # ------------------------------------------------------------------ invertible aggregates

    def _inv_setup(self, inv: Invertible) -> None:
        """The state table (empty; a global aggregate's one row of zeros) and the views over a merge."""
        arr = _q(_ARR + inv.input)
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_STATE} AS {inv.partial_sql(arr)} LIMIT 0")
        cols = inv.state_columns()
        if inv.global_:
            zero = ", ".join("NULL" if c.startswith(("__sf_hi", "__sf_lo")) else "0" for c in cols)
            self.con.execute(f"INSERT INTO {_STATE} VALUES ({zero})")
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

    def _inv_merge(self, source: str, at: int) -> None:
        """Add the partial sums of the updates in `source` (at time `at`) into the state (filling `__sf_m`).

        A min/max whose group lost a row at or beyond its extreme cannot be updated from
        the partial sums: that group is marked dirty and its extremes are recomputed from
        the arrangement (the input's rows at `at`), restricted to the dirty groups."""
        inv = self.invertible
        assert inv is not None
        keys, vals = self._inv_cols
        part = f"({inv.partial_sql(source, retracted=bool(inv.extremes))})"
        new = []
        dirty = []
        for c in vals:
            add = f"coalesce(s.{c}, 0) + coalesce(p.{c}, 0)"
            if c.startswith(("__sf_hi", "__sf_lo")):
                side, i = c[5:7], int(c[7:])
                n = f"__sf_n{i}"
                worse = ">=" if side == "hi" else "<="
                d = f"(p.__sf_r{side}{i} IS NOT NULL AND (s.{c} IS NULL OR p.__sf_r{side}{i} {worse} s.{c}))"
                dirty.append(d)
                pick = "greatest" if side == "hi" else "least"
                new.append(
                    f"CAST(CASE WHEN coalesce(s.{n}, 0) + coalesce(p.{n}, 0) = 0 OR {d} THEN NULL "
                    f"ELSE {pick}(s.{c}, p.{c}) END AS {inv.arg_types[i]}) AS {c}"
                )
            elif c.startswith("__sf_s"):
                n = "__sf_n" + c[6:]
                t = inv.sum_types[int(c[6:])]
                # a sum whose values all went away restarts from an exact 0 (no floating-point residue)
                new.append(f"CAST(CASE WHEN coalesce(s.{n}, 0) + coalesce(p.{n}, 0) = 0 THEN 0 ELSE {add} END AS {t}) AS {c}")
            else:
                new.append(f"CAST({add} AS BIGINT) AS {c}")
        olds = [
            f"s.{c} AS __sf_o{c[5:]}" if c.startswith(("__sf_hi", "__sf_lo")) else f"coalesce(s.{c}, 0) AS __sf_o{c[5:]}"
            for c in vals
        ]
        sel = ", ".join([*(f"p.{k}" for k in keys), *olds, *new])
        if dirty:
            sel += f", ({' OR '.join(dirty)}) AS __sf_dirty"
        if keys:
            on = " AND ".join(f"s.{k} IS NOT DISTINCT FROM p.{k}" for k in keys)
            src = f"{part} AS p LEFT JOIN {_STATE} AS s ON {on}"
        else:
            src = f"{part} AS p, {_STATE} AS s"
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE __sf_m AS SELECT {sel} FROM {src}")
        if dirty:
            self._inv_recompute(at)
        cols = ", ".join([*keys, *vals])
        if keys:
            on = " AND ".join(f"s.{k} IS NOT DISTINCT FROM m.{k}" for k in keys)
            gone = self.con.execute(f"DELETE FROM {_STATE} AS s USING __sf_m AS m WHERE {on} AND m.__sf_oc <> 0")
            self._inv_deleted += int(gone.fetchall()[0][0])
            self.con.execute(f"INSERT INTO {_STATE} ({cols}) SELECT {cols} FROM __sf_m WHERE __sf_c <> 0")
        else:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_STATE} AS SELECT {cols} FROM __sf_m")

    def _inv_recompute(self, at: int) -> None:
        """Set the extremes of `__sf_m`'s dirty groups from the arrangement's rows at time `at`."""
        inv = self.invertible
        assert inv is not None
        if not self.con.execute("SELECT count(*) FROM __sf_m WHERE __sf_dirty").fetchall()[0][0]:
            return
        i = self.inputs[inv.input]
        keys, _vals = self._inv_cols
        where = f"{TIME} <= {int(at)}"
        if keys:
            where += f" AND {_H} IN (SELECT hash({', '.join(keys)}) FROM __sf_m WHERE __sf_dirty)"
        rows = consolidate_sql(
            f"(SELECT * FROM {_q(_ARR + i.name)} WHERE {where})", i.schema.names, drop_time=True, where=self.where
        )
        ext = [f"__sf_{side}{j}" for j, side in inv.extremes]
        sets = ", ".join(f"{c} = r.{c}" for c in ext)
        on = " AND ".join([*(f"m.{k} IS NOT DISTINCT FROM r.{k}" for k in keys), "m.__sf_dirty"])
        with overflow_checked():
            self.con.execute(
                f"UPDATE __sf_m AS m SET {sets} FROM ({inv.recompute_sql(f'(SELECT * FROM ({rows}) WHERE {DIFF} > 0)')}) AS r "
                f"WHERE {on}"
            )

    def _inv_step(self, deltas: Mapping[str, pa.Table], times: list[int]) -> pa.Table:
        inv = self.invertible
        assert inv is not None
        d = deltas[inv.input]
        if inv.extremes and d.num_rows:
            self._insert(self.inputs[inv.input], d, None)
        self.con.register("__sf_in", d)
        outs = []
        try:
            if len(times) > 1 and self._inv_distinct:
                out = self._inv_step_all()
                if out is not None:
                    return out
            for t in times:
                self._inv_merge(f"(SELECT * FROM __sf_in WHERE {TIME} = {int(t)})", t)
                if self._inv_distinct:
                    out = self.con.sql(inv.change_sql("__sf_m", t)).to_arrow_table()
                    outs.append(out.cast(self.empty().schema) if out.schema != self.empty().schema else out)
                else:
                    outs.append(self._consolidated([
                        (t, 1, f"({inv.output_sql('__sf_inv_new')})"), (t, -1, f"({inv.output_sql('__sf_inv_old')})")
                    ]))
        finally:
            self.con.unregister("__sf_in")
        return pa.concat_tables(outs) if len(outs) > 1 else outs[0]

    def _inv_step_all(self) -> pa.Table | None:
        """All of `__sf_in`'s times at once: per group and time, its state after the time is its state
        before the step plus the running sum of its partial sums (a window), and before the time,
        that minus the time's own; extremes are running greatest/least. None (nothing changed)
        when some group's extreme was retracted at some time: the caller goes time by time."""
        inv = self.invertible
        assert inv is not None
        keys, vals = self._inv_cols
        self.con.execute(
            f"CREATE OR REPLACE TEMP TABLE __sf_p AS {inv.partial_sql('__sf_in', retracted=bool(inv.extremes), by_time=True)}"
        )
        win = f"PARTITION BY {', '.join(keys)} ORDER BY __sf_t" if keys else "ORDER BY __sf_t"
        pwin = f"PARTITION BY {', '.join('p.' + k for k in keys)} ORDER BY p.__sf_t" if keys else "ORDER BY p.__sf_t"
        inner = [*(f"p.{k}" for k in keys), "p.__sf_t"]
        outer = [*keys, "__sf_t"]
        dirty = []
        for c in vals:
            if c.startswith(("__sf_hi", "__sf_lo")):
                side, i = c[5:7], int(c[7:])
                pick = "greatest" if side == "hi" else "least"
                agg = "max" if side == "hi" else "min"
                inner += [
                    f"{pick}(s.{c}, {agg}(p.{c}) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) AS __sf_a{c[5:]}",
                    f"{pick}(s.{c}, {agg}(p.{c}) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS __sf_b{c[5:]}",
                    f"p.__sf_r{side}{i} AS __sf_x{c[5:]}",
                ]
            else:
                inner += [
                    f"coalesce(s.{c}, 0) + sum(coalesce(p.{c}, 0)) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) "
                    f"AS __sf_a{c[5:]}",
                    f"coalesce(p.{c}, 0) AS __sf_d{c[5:]}",
                ]
        for c in vals:
            typ = None
            if c.startswith(("__sf_hi", "__sf_lo")):
                side, i = c[5:7], int(c[7:])
                worse = ">=" if side == "hi" else "<="
                typ = inv.arg_types[i]
                n_after, n_before = f"__sf_an{i}", f"(__sf_an{i} - __sf_dn{i})"
                after = f"CASE WHEN {n_after} = 0 THEN NULL ELSE __sf_a{c[5:]} END"
                before = f"CASE WHEN {n_before} = 0 THEN NULL ELSE __sf_b{c[5:]} END"
                dirty.append(f"(__sf_x{c[5:]} IS NOT NULL AND ({before} IS NULL OR __sf_x{c[5:]} {worse} {before}))")
            else:
                typ = "BIGINT" if not c.startswith("__sf_s") else inv.sum_types[int(c[6:])]
                after = f"__sf_a{c[5:]}"
                before = f"__sf_a{c[5:]} - __sf_d{c[5:]}"
            outer += [f"CAST({before} AS {typ}) AS __sf_o{c[5:]}", f"CAST({after} AS {typ}) AS {c}"]
        if dirty:
            outer.append(f"({' OR '.join(dirty)}) AS __sf_dirty")
        if keys:
            on = " AND ".join(f"s.{k} IS NOT DISTINCT FROM p.{k}" for k in keys)
            src = f"__sf_p AS p LEFT JOIN {_STATE} AS s ON {on}"
        else:
            src = f"__sf_p AS p, {_STATE} AS s"
        with overflow_checked():
            self.con.execute(
                f"CREATE OR REPLACE TEMP TABLE __sf_mt AS SELECT {', '.join(outer)} FROM "
                f"(SELECT {', '.join(inner)} FROM {src} WINDOW w AS ({pwin}))"
            )
        if dirty and self.con.execute("SELECT bool_or(__sf_dirty) FROM __sf_mt").fetchall()[0][0]:
            return None
        out = self.con.sql(inv.change_sql("__sf_mt", None)).to_arrow_table()
        cols = ", ".join([*keys, *vals])
        last = f"SELECT {cols} FROM __sf_mt QUALIFY row_number() OVER ({win} DESC) = 1"
        if keys:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE __sf_last AS {last}")
            on = " AND ".join(f"s.{k} IS NOT DISTINCT FROM m.{k}" for k in keys)
            gone = self.con.execute(f"DELETE FROM {_STATE} AS s USING __sf_last AS m WHERE {on}")
            self._inv_deleted += int(gone.fetchall()[0][0])
            self.con.execute(f"INSERT INTO {_STATE} ({cols}) SELECT {cols} FROM __sf_last WHERE __sf_c <> 0")
        else:  # the one row, unless every update was filtered out (no time has partial sums)
            self.con.execute(f"DELETE FROM {_STATE} WHERE EXISTS (SELECT 1 FROM __sf_mt)")
            self.con.execute(f"INSERT INTO {_STATE} ({cols}) SELECT {cols} FROM ({last})")
        return out.cast(self.empty().schema) if out.schema != self.empty().schema else out

    # ------------------------------------------------------------------ upkeep

    def compact(self, to: int) -> None:
        """Advance every arrangement time below `to` to `to` and consolidate (the engine never
        evaluates below `to` again). Cheap to call often: it works only when an
        arrangement has grown by half since its last compaction."""
        if self.invertible is not None:
            # The state is always consolidated, but its deleted rows stay in the table until it
            # is rewritten: rewrite it when they outnumber the live ones.
            live = self.con.execute(f"SELECT count(*) FROM {_STATE}").fetchall()[0][0]
            if self._inv_deleted > max(10000, live):
                self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_STATE} AS SELECT * FROM {_STATE}")
                self._inv_deleted = 0
            if not self.invertible.extremes:  # no arrangement: min/max keep one
                self.compacted_to = to
                return
        if self.plan.linear:
            return
        if self.key_hash is not None and self._out_deleted > 10000:
            live = self.con.execute(f"SELECT count(*) FROM {_OUT}").fetchall()[0][0]
            if self._out_deleted > live:
                self.con.execute(f"CREATE OR REPLACE TABLE {_OUT}__c AS SELECT * FROM {_OUT}")
                self.con.execute(f"DROP TABLE {_OUT}")
                self.con.execute(f"ALTER TABLE {_OUT}__c RENAME TO {_OUT}")
                self._out_deleted = 0
        for i in self.inputs.values():
            if i.rows_since_compaction <= max(1000, i.rows_at_compaction // 2):
                continue
            arr = _q(_ARR + i.name)
            tmp = _q(_ARR + i.name + "__c")
            q = consolidate_sql(arr, i.schema.names, since=to, where=self.where)
            if i.keys:
                q = f"SELECT *, hash({', '.join(i.keys)}) AS {_H} FROM ({q})"
            with overflow_checked():
                self.con.execute(f"CREATE OR REPLACE TABLE {tmp} AS {q}")
            self.con.execute(f"DROP TABLE {arr}")
            self.con.execute(f"ALTER TABLE {tmp} RENAME TO {_q(_ARR + i.name)}")
            n = self.con.execute(f"SELECT count(*) FROM {arr}").fetchall()[0][0]
            i.rows_at_compaction, i.rows_since_compaction = int(n), 0
        self.compacted_to = to

    def arrangement_rows(self) -> dict[str, int]:
        """Rows held per input: its arrangement's, or the fast path's state rows (one per live group)."""
        if self.invertible is not None and not self.invertible.extremes:
            n = self.con.execute(f"SELECT count(*) FROM {_STATE}").fetchall()[0][0]
            return {self.invertible.input: int(n)}
        return {n: int(self.con.execute(f"SELECT count(*) FROM {_q(_ARR + n)}").fetchall()[0][0]) for n in self.inputs}


def _output_key_hash(plan: PlanLike, inputs: Mapping[str, _Input], names: list[str]) -> str | None:
    """SQL over the view's output columns whose `hash` is the hash of the key an output row came from,
    or None when the output does not show it.

    One input, a top-level SELECT, and each key expression a column of the input that the
    select list passes through unchanged (`g`, `t.g AS grp`), possibly cast to a common
    type by `plan_view`; a constant key (a global aggregate) is `0`.
    """
    import re

    from .sqlplan import parse

    if len(plan.inputs) != 1:
        return None
    (name,) = plan.inputs
    keys = inputs[name].keys
    if keys is None:
        return None
    if not keys:
        return "0::UBIGINT"
    try:
        node = parse(plan.sql)
    except Exception:  # noqa: BLE001 - a plan we cannot read again: the recompute path
        return None
    ft = node.get("from_table") or {}
    if node.get("type") != "SELECT_NODE" or ft.get("type") != "BASE_TABLE":
        return None
    qualifiers = {str(ft.get("table_name", "")).lower(), str(ft.get("alias") or "").lower()} - {""}
    items = node.get("select_list") or []
    if len(items) != len(names):
        return None
    passed: dict[str, str] = {}  # input column (lower) -> output column
    for item, out in zip(items, names, strict=True):
        if item.get("class") != "COLUMN_REF":
            continue
        cn = item["column_names"]
        if len(cn) == 2 and cn[0].lower() not in qualifiers or len(cn) > 2:
            continue
        passed.setdefault(cn[-1].lower(), out)
    parts = []
    for k in keys:
        m = re.fullmatch(r"CAST\(\((.+)\) AS (.+)\)", k)
        col, cast = (m.group(1), m.group(2)) if m else (k, "")
        if col.startswith('"') and col.endswith('"'):
            col = col[1:-1].replace('""', '"')
        oc = passed.get(col.lower())
        if oc is None:
            return None
        parts.append(f"CAST({_q(oc)} AS {cast})" if cast else _q(oc))
    return ", ".join(parts)


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

#: Per view partition `(step_id, i)`: the input rows its engine was given (`rows`: deltas,
#: `loaded`: snapshot rows at a resume) and the thread (bytewax worker) it ran on. Debugging
#: and tests: it shows how a view's work is split.
partition_stats: dict[tuple[str, int], dict[str, int]] = {}


def partition_count(plan: PlanLike, workers: int) -> int:
    """How many partitions a view runs in on `workers` workers.

    `workers` when every input has a non-constant key (`plan.keys[input]`): the
    output for one key hash is then computed from the inputs' rows with that hash
    alone. Otherwise 1: no key (`plan.keys is None`: recomputed whole; also every
    linear query), or a constant key `()` (a global aggregate needs all its rows).
    """
    keys = plan.keys
    if workers <= 1 or keys is None or not all(keys.get(n) for n in plan.inputs):
        return 1
    return workers


class _Partitioner:
    """Splits an input's updates by `hash(<its key expressions>) % n`, computed in DuckDB.

    `plan_view` makes the keys hash-consistent across inputs (rows a join equates
    hash alike), so partition `i` of every input together give the view's output
    for the keys of partition `i`, and the partitions' outputs are disjoint.
    """

    def __init__(self, keys: Mapping[str, tuple[str, ...]] | None, n: int):
        self.keys = keys
        self.n = n
        self._local = threading.local()  # one DuckDB connection per worker thread

    def _con(self) -> duckdb.DuckDBPyConnection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = duckdb.connect()
        return con

    def of(self, name: str, table: pa.Table) -> pa.Array:
        """Each row's partition (int32), in row order."""
        assert self.keys is not None
        con = self._con()
        con.register("__sf_part", table)
        try:
            q = f"SELECT (hash({', '.join(self.keys[name])}) % {self.n})::INTEGER AS p FROM __sf_part"
            p = con.sql(q).to_arrow_table().column(0)
        except duckdb.Error as e:
            msg = f"view: cannot partition input {name!r} by hash({', '.join(self.keys[name])}): {str(e).splitlines()[0]}"
            raise InvalidInput(msg) from None
        finally:
            con.unregister("__sf_part")
        assert len(p) == table.num_rows
        return p

    def split(self, name: str, table: pa.Table) -> list[pa.Table]:
        if self.n == 1 or not table.num_rows:
            return [table] + [table.slice(0, 0)] * (self.n - 1)
        p = self.of(name, table)
        return [table.filter(pc.equal(p, i)) for i in range(self.n)]

    def only(self, name: str, table: pa.Table, i: int) -> pa.Table:
        if self.n == 1 or not table.num_rows:
            return table
        return table.filter(pc.equal(self.of(name, table), i))


class _PartitionLoader:
    """What `preload` is given for one partition's engine: `load` keeps that partition's rows."""

    def __init__(self, engine: ViewEngine, part: _Partitioner, i: int, stats: dict[str, int]):
        self.engine = engine
        self.part = part
        self.i = i
        self.stats = stats

    def load(self, name: str, snapshot: pa.Table, time: int) -> None:
        mine = self.part.only(name, snapshot, self.i)
        self.stats["loaded"] += mine.num_rows
        self.engine.load(name, mine, time)

    def load_output(self, snapshot: pa.Table) -> None:
        self.engine.load_output(snapshot, (self.i, self.part.n))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.engine, attr)


class _ViewLogic(StatefulBatchLogic[Any, Any, None]):
    """One partition of a view: buffers each input's updates until every input's frontier
    passed them, then asks its engine for the view's corrections over the whole ready range.

    One consistent time: the view's frontier is the minimum over its inputs'
    frontiers, so a correction at `t` reflects every input's updates up to `t`.
    Items arrive as `(partition, input, item, tmax)`; the engine is built on the first.
    """

    def __init__(
        self,
        step_id: str,
        make_engine: Callable[[int], ViewEngine],
        inputs: Iterable[str],
        start: int | None,
        fresh: bool,
        names: tuple[str, ...],
        offsets: Mapping[str, Any] | None = None,
    ):
        from .operators import FrontierTracker, OffsetQueue

        self.step_id = step_id
        self.make_engine = make_engine
        self.engine: ViewEngine | None = None
        self.trackers = {n: FrontierTracker() for n in inputs}
        self.pending: dict[str, list[pa.Table]] = {n: [] for n in self.trackers}
        self.offsets = OffsetQueue()
        self.emitted: Frontier | None = None if start is None else Frontier(start)
        self.fresh = fresh
        self.names = names  # the partitions' names in their Progress (one partition: none)
        self.initial_offsets = offsets  # a new view's snapshot offsets, committed with partition 0's first output
        self.index = 0
        self.stats: dict[str, int] = {}

    def on_batch(self, values: list[tuple[int, str, Any, int]]) -> tuple[Iterable[Any], bool]:
        from .operators import check_item

        for i, name, v, tmax in values:
            if self.engine is None:
                self.index = i
                key = (self.step_id, i)
                self.stats = partition_stats[key] = {"rows": 0, "loaded": 0, "thread": threading.get_ident()}
                self.engine = self.make_engine(i)
                # A new view starts from the SQL over its inputs as loaded (or empty). Partitions
                # hold disjoint keys, so each emits its own part; a global aggregate (its row must
                # appear once) is never partitioned.
                if i == 0:
                    self.offsets.push(self.initial_offsets, -1)  # covered by the first output
            check_item(self.step_id, v)
            if isinstance(v, Progress):
                self.trackers[name].observe(v)
                continue
            if v.table.num_rows:
                self.pending[name].append(v.table)
                self.stats["rows"] += v.table.num_rows
            self.offsets.push(v.offsets, tmax)
        fs = [t.frontier() for t in self.trackers.values()]
        if any(f is None for f in fs):
            return [], StatefulBatchLogic.RETAIN
        f = min(x for x in fs if x is not None)
        if self.emitted is not None and f <= self.emitted:
            return [], StatefulBatchLogic.RETAIN
        return self._flush(f), StatefulBatchLogic.RETAIN

    def _flush(self, upper: Frontier) -> list[Any]:
        engine = self.engine
        assert engine is not None
        lower = self.emitted if self.emitted is not None else Frontier.MIN
        ready: dict[str, pa.Table] = {}
        for n, tables in self.pending.items():
            if not tables:
                continue
            t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            if upper.time is None or pc.max(t.column(TIME)).as_py() < upper.time:
                ready[n], keep = t, None  # all of it is ready: no filtering (a copy of every column)
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
            outs.append(engine.baseline(first))
            self.fresh = False
        outs.append(engine.step(ready))
        if upper.time is not None and upper.time > 0:
            engine.compact(upper.time - 1)
        table = pa.concat_tables(outs) if len(outs) > 1 else outs[0]
        offsets = self.offsets.pop(upper)
        self.emitted = upper
        out: list[Any] = []
        if table.num_rows or offsets:
            out.append(UpdateBatch(table, lower, upper, offsets or None))
        if len(self.names) > 1:
            # Each partition speaks for itself: downstream the frontier is the minimum over them.
            out.append(Progress(upper, self.names[self.index], self.names))
        else:
            out.append(Progress(upper))
        return out

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        if self.engine is not None:
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
    preload: Callable[[Any], None] | None = None,
    start: int | None = None,
    path: str | None = None,
    partitions: int = 1,
    fresh: bool | None = None,
    memory_limit: str | None = None,
    offsets: Mapping[str, Any] | None = None,
) -> Any:
    """The incremental view operator: `inputs` (input name -> stream of `UpdateBatch`/`Progress`)
    in, the view's corrections out (`UpdateBatch` per frontier advance, then `Progress`).

    `sql` is the view's SQL over the input names (or its `flows.sqlplan.plan_view`
    plan); `schemas` gives each input's row schema. A resumed view passes
    `preload` (fills the engine's arrangements from the inputs' snapshots at
    its committed frontier minus one, with no output: it calls `engine.load`)
    and `start` (that frontier); a new one passes neither and starts from the
    SQL over empty inputs.

    `fresh=True` with a `preload` starts a new view from loaded snapshots: its
    first output is the SQL over them, at `start` (the snapshots' time), and
    the inputs go on after it; `offsets` (each input's partition key -> that
    frontier) are then committed with it, as a snapshot's offsets would be.
    `memory_limit` is the engine's (`ViewEngine`).

    `partitions` (the dataflow's worker count: `FlowContext.view` passes it):
    a view whose every input has a key (`partition_count`) runs as that many
    partitions, each with its own engine over the rows whose `hash(key) %
    partitions` is its index (updates split in DuckDB, snapshots filtered the
    same way at `preload`); partition `i` is keyed so that bytewax runs it on
    worker `i`. `Progress` reaches every partition; each emits its own
    corrections and `Progress` naming itself, so downstream the view's frontier
    is the minimum over the partitions. Source offsets travel with partition 0
    (the sink's resume point is its committed upper, so a partition that is
    behind is never skipped: see `FlowContext.view`). Any other view runs as one
    partition, on one worker; DuckDB uses its own threads either way.
    """
    import bytewax.operators as op

    from .operators import tmax_of, worker_keys
    from .sqlplan import plan_view

    plan: PlanLike = plan_view(sql, schemas) if isinstance(sql, str) else sql
    if set(inputs) != set(plan.inputs):
        raise InvalidInput(f"view {step_id!r}: streams for {sorted(inputs)}, but the SQL reads {sorted(plan.inputs)}")
    n = partition_count(plan, partitions)
    keys = worker_keys(n) if n > 1 else ("ALL",)
    names = tuple(f"{step_id}/{i}" for i in range(n)) if n > 1 else ()
    part = _Partitioner(plan.keys, n)

    def make_engine(i: int) -> ViewEngine:
        e = ViewEngine(
            plan, schemas, path=None if path is None else (path if n == 1 else f"{path}.{i}"), memory_limit=memory_limit
        )
        if preload is not None:
            preload(e if n == 1 else _PartitionLoader(e, part, i, partition_stats[(step_id, i)]))
        return e

    def splitter(name: str) -> Callable[[Any], list[tuple[str, tuple[int, str, Any, int]]]]:
        def split(x: Any) -> list[tuple[str, tuple[int, str, Any, int]]]:
            if isinstance(x, Progress):
                return [(k, (i, name, x, -1)) for i, k in enumerate(keys)]
            if not isinstance(x, UpdateBatch):
                from .operators import check_item

                check_item(step_id, x)
            tmax = tmax_of(x.table)
            out = []
            for i, t in enumerate(part.split(name, x.table)):
                offs = x.offsets if i == 0 else None
                if t.num_rows or offs:
                    out.append((keys[i], (i, name, UpdateBatch(t, x.lower, x.upper, offs), tmax)))
            return out

        return split

    split = [op.flat_map(f"{step_id}_split_{n_}", s, splitter(n_)) for n_, s in inputs.items()]
    merged = op.merge(f"{step_id}_merge", *split) if len(split) > 1 else split[0]

    def builder(_resume: Any) -> _ViewLogic:
        fresh_ = preload is None if fresh is None else fresh
        return _ViewLogic(step_id, make_engine, plan.inputs, start, fresh_, names, offsets)

    out = op.stateful_batch(f"{step_id}_maintain", merged, builder)
    return op.key_rm(f"{step_id}_unkey", out)



def output_schema(plan: PlanLike, schemas: Mapping[str, pa.Schema]) -> pa.Schema:
    """The row schema of the view `plan` over inputs of `schemas` (the SQL run on empty inputs)."""
    e = ViewEngine(plan, schemas)
    try:
        return e.schema
    finally:
        e.close()

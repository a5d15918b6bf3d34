"""Invertible aggregates: a grouped view whose output delta is a function of the input delta.

A single-input `GROUP BY` (or global aggregate) whose aggregates are all
`count(*)`, `count(e)`, `sum(e)`, `avg(e)`, `min(e)` and `max(e)` can be
maintained from per-group state instead of recomputing groups from their rows.
Per group, the engine keeps

* `__sf_c`: the group's row count (the sum of `_diff`),
* per aggregate argument `e`: `__sf_n<i>`, its non-NULL count
  (`sum(CASE WHEN e IS NOT NULL THEN _diff ELSE 0 END)`), and, when a `sum` or
  `avg` reads it, `__sf_s<i>`, its weighted sum `sum(CAST(e AS T) * _diff)`
  where `T` is the type DuckDB's own `sum(e)` returns (HUGEINT for integers,
  DECIMAL(38, s) for decimals, DOUBLE for floats);
* per `max(e)` / `min(e)`: `__sf_hi<i>` / `__sf_lo<i>`, the extreme. An insertion
  moves it with `greatest`/`least`; a retraction of a value at or beyond it
  marks the group dirty, and only dirty groups are recomputed, from the input's
  rows (the engine keeps an arrangement for views with min/max). With random
  retractions that is about one group in group-size per retraction.

A delta adds into these; the aggregates come back out of them with SQL's NULL
rules: `count(*)` is `__sf_c`, `count(e)` is `__sf_n<i>`, `sum(e)` is
`__sf_s<i>` when `__sf_n<i> > 0` else NULL, `avg(e)` is
`__sf_s<i>::DOUBLE / __sf_n<i>` likewise (DuckDB's avg of every accepted type
is a DOUBLE), `max(e)` is `__sf_hi<i>` likewise.

`invertible(plan, schemas, names)` decides whether a plan qualifies and, if
so, rewrites the query's AST (DuckDB's `json_serialize_sql`): each aggregate
call becomes an expression over the state columns, each occurrence of a group
expression becomes the state's key column `__sf_g<j>`, GROUP BY goes away
and HAVING becomes the WHERE of a plain SELECT over the state. The SQL is
printed back by `json_deserialize_sql`; nothing is matched as text.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from . import sqlplan
from .sqlplan import _aggregates, _colrefs, _dicts, _expr_sql, _Keys, _scalar, _walk, parse

__all__ = ["Invertible", "invertible"]

PREFIX = "__sf_"
_ALLOWED = frozenset({"count_star", "count", "sum", "avg", "min", "max"})
#: min/max keep the group's extreme in the state; `hi` for max, `lo` for min.
_EXTREMES = {"max": "hi", "min": "lo"}
#: Argument types whose sum/avg the state reproduces (DuckDB's sum of these: HUGEINT, DOUBLE or DECIMAL).
_INTEGERS = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
)
_IGNORED = frozenset({"query_location", "query_location_length", "alias"})


@dataclass
class Invertible:
    """How to maintain a qualifying view from per-group partial sums (see the module docstring)."""

    input: str  # the one input's name
    keys: tuple[str, ...]  # group expressions, SQL over the input's unqualified columns
    where: str | None  # the WHERE clause, SQL over the same
    args: tuple[str, ...]  # aggregate arguments, SQL over the same
    sum_types: tuple[str | None, ...]  # per argument: the DuckDB type of its weighted sum (None: counted only)
    global_: bool  # no GROUP BY: exactly one output row, always
    node: dict[str, Any]  # the rewritten SELECT over the state (FROM is set by `output_sql`)
    #: (argument index, "hi" | "lo") per min/max kept; these need the input's rows (an arrangement)
    #: to recompute a group whose extreme was retracted.
    extremes: tuple[tuple[int, str], ...] = ()
    arg_types: tuple[str, ...] = ()  # per argument: its DuckDB type
    _sql: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def distinct_groups(self) -> bool:
        """Whether different groups always give different output rows (every group key is output as is)."""
        if self.global_:
            return True
        bare = {
            tuple(e["column_names"]) for e in self.node["select_list"] if e.get("class") == "COLUMN_REF"
        }  # fmt: skip
        names = [str(e["alias"]) for e in self.node["select_list"]]
        if any(n.lower().startswith(PREFIX) for n in names):
            return False  # would collide with the correction query's own columns
        return all((f"{PREFIX}g{j}",) in bare for j in range(len(self.keys)))

    def change_sql(self, source: str, time: int | None) -> str:
        """The correction at `time` from `source` (`__sf_m`: per touched group its state before, as
        `__sf_o*`, and after), without consolidating across groups (only when `distinct_groups`):
        a group's old row is retracted and its new row inserted unless the two are equal.
        `time` None: each row of `source` has its own time, `__sf_t`."""
        assert self.distinct_groups
        names = [e["alias"] for e in self.node["select_list"]]
        key = f"change:{time is None}:{source}"
        if key not in self._sql:
            self._sql[key] = self._change_select(source, timed=time is None)
        x = self._sql[key]
        q = [_quote(n) for n in names]
        same = " AND ".join(f"{n} IS NOT DISTINCT FROM {PREFIX}old{i}" for i, n in enumerate(q)) or "true"
        t = f"{PREFIX}t" if time is None else int(time)
        new = ", ".join(q)
        old = ", ".join(f"{PREFIX}old{i} AS {n}" for i, n in enumerate(q))
        return (
            f"WITH {PREFIX}x AS ({x}) "
            f"SELECT {new}, {t}::BIGINT AS _time, 1::BIGINT AS _diff FROM {PREFIX}x "
            f"WHERE {PREFIX}newok AND NOT ({PREFIX}oldok AND {same}) UNION ALL "
            f"SELECT {old}, {t}::BIGINT AS _time, -1::BIGINT AS _diff FROM {PREFIX}x "
            f"WHERE {PREFIX}oldok AND NOT ({PREFIX}newok AND {same})"
        )

    def _change_select(self, source: str, *, timed: bool = False) -> str:
        """Per row of `source`, the output row after (named as the view's columns) and before
        (`__sf_old<i>`), and whether each exists (`__sf_newok`, `__sf_oldok`: live and passing HAVING)."""
        names = [e["alias"] for e in self.node["select_list"]]
        old_cols = {c: f"{PREFIX}o{c[len(PREFIX):]}" for c in self.state_columns() if not c.startswith(f"{PREFIX}g")}

        def as_old(e: Any) -> Any:
            e = copy.deepcopy(e)
            for c in _colrefs(e):
                if len(c["column_names"]) == 1 and c["column_names"][0] in old_cols:
                    c["column_names"] = [old_cols[c["column_names"][0]]]
            return e

        having = self.node.get("where_clause")
        oks = []
        for live, h in ((f"{PREFIX}c > 0", having), (f"{PREFIX}oc > 0", as_old(having) if having else None)):
            if self.global_:
                live = "true"
            cond = f"coalesce(({_expr_sql(h)}), false)" if h is not None else "true"
            oks.append(_template(f"CASE WHEN {live} THEN {cond} ELSE false END"))
        node = copy.deepcopy(self.node)
        # Each side's expressions are only evaluated where that side's group is live (as a WHERE would).
        sides = []
        for i, (e, ok) in enumerate([(x, f"{PREFIX}newok") for x in node["select_list"]] + [
            (as_old(x), f"{PREFIX}oldok") for x in node["select_list"]]):
            w = _template(f"CASE WHEN {ok} THEN NULL END")
            w["case_checks"][0]["then_expr"] = dict(e, alias="")
            w["alias"] = e["alias"] if i < len(names) else f"{PREFIX}old{i - len(names)}"
            sides.append(w)
        node["select_list"] = sides
        node["where_clause"] = None
        node["from_table"] = parse(f"SELECT 1 FROM (SELECT *, 1 AS {PREFIX}newok, 1 AS {PREFIX}oldok FROM {source})")["from_table"]
        inner = copy.deepcopy(node["from_table"]["subquery"]["node"])
        inner["select_list"][1] = dict(oks[0], alias=f"{PREFIX}newok")
        inner["select_list"][2] = dict(oks[1], alias=f"{PREFIX}oldok")
        node["from_table"]["subquery"]["node"] = inner
        node["select_list"] += [_template(f"{PREFIX}newok"), _template(f"{PREFIX}oldok")]
        if timed:
            node["select_list"].append(_template(f"{PREFIX}t"))
        doc = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
        x: str = _scalar("SELECT json_deserialize_sql(?)", [json.dumps(doc)])
        return x

    def state_columns(self) -> list[str]:
        cols = [f"{PREFIX}g{j}" for j in range(len(self.keys))] + [f"{PREFIX}c"]
        for i, t in enumerate(self.sum_types):
            if t is not None:
                cols.append(f"{PREFIX}s{i}")
            cols.append(f"{PREFIX}n{i}")
        cols += [f"{PREFIX}{side}{i}" for i, side in self.extremes]
        return cols

    def extreme_sql(self, i: int, side: str, *, diff: str | None = None) -> str:
        """The aggregate of argument `i` for extreme `side`, over rows whose `_diff` satisfies `diff` (all rows if None)."""
        a = self.args[i]
        e = f"({a})" if diff is None else f"CASE WHEN _diff {diff} THEN ({a}) END"
        return f"{'max' if side == 'hi' else 'min'}({e})::{self.arg_types[i]}"

    def partial_sql(self, source: str, *, retracted: bool = False, by_time: bool = False) -> str:
        """Partial sums per group of the updates in `source` (a FROM item with the input's columns and `_diff`).

        Extremes are over the inserted rows (`_diff > 0`); with `retracted`, each also has
        `__sf_r<side><i>`: the extreme over the retracted rows (`_diff < 0`), which says
        whether the group's extreme may have gone away. `by_time`: per group and `_time`
        (as `__sf_t`, the last column)."""
        sel = [f"({k}) AS {PREFIX}g{j}" for j, k in enumerate(self.keys)]
        sel.append(f"sum(_diff)::BIGINT AS {PREFIX}c")
        for i, (a, t) in enumerate(zip(self.args, self.sum_types, strict=True)):
            if t is not None:
                sel.append(f"sum(CAST(({a}) AS {t}) * _diff)::{t} AS {PREFIX}s{i}")
            sel.append(f"sum(CASE WHEN ({a}) IS NOT NULL THEN _diff ELSE 0 END)::BIGINT AS {PREFIX}n{i}")
        for i, side in self.extremes:
            sel.append(f"{self.extreme_sql(i, side, diff='> 0')} AS {PREFIX}{side}{i}")
            if retracted:
                sel.append(f"{self.extreme_sql(i, side, diff='< 0')} AS {PREFIX}r{side}{i}")
        if by_time:
            sel.append(f"_time AS {PREFIX}t")
        q = f"SELECT {', '.join(sel)} FROM {source}"
        if self.where is not None:
            q += f" WHERE ({self.where})"
        groups = [f"{PREFIX}g{j}" for j in range(len(self.keys))] + ([f"{PREFIX}t"] if by_time else [])
        if groups:
            q += " GROUP BY " + ", ".join(groups)
        return q

    def recompute_sql(self, rows: str) -> str:
        """Each group's extremes from its rows (`rows`: a FROM item with the input's columns, each row
        present once per unit of its positive count; the groups to recompute, already restricted)."""
        sel = [f"({k}) AS {PREFIX}g{j}" for j, k in enumerate(self.keys)]
        sel += [f"{self.extreme_sql(i, side)} AS {PREFIX}{side}{i}" for i, side in self.extremes]
        q = f"SELECT {', '.join(sel)} FROM {rows}"
        if self.where is not None:
            q += f" WHERE ({self.where})"
        if self.keys:
            q += " GROUP BY " + ", ".join(str(j + 1) for j in range(len(self.keys)))
        return q

    def output_sql(self, source: str) -> str:
        """The view's select list (and HAVING, as WHERE) over state rows in table/view `source`."""
        if source not in self._sql:
            node = copy.deepcopy(self.node)
            node["from_table"] = parse(f"SELECT 1 FROM {source}")["from_table"]
            doc = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
            self._sql[source] = _scalar("SELECT json_deserialize_sql(?)", [json.dumps(doc)])
        return self._sql[source]


def _norm(e: Any) -> Any:
    """An expression without positions and aliases, column names lower-cased (for equality)."""
    if isinstance(e, list):
        return [_norm(x) for x in e]
    if not isinstance(e, dict):
        return e
    out = {k: _norm(v) for k, v in e.items() if k not in _IGNORED}
    if e.get("class") == "COLUMN_REF":
        out["column_names"] = [n.lower() for n in e["column_names"]]
    return out


def _template(sql: str) -> dict[str, Any]:
    e: dict[str, Any] = parse(f"SELECT {sql}")["select_list"][0]
    return e


class _Refused(Exception):
    pass


def _unqualify(e: Any, alias: str) -> Any:
    """A copy of `e` with column references `alias.col` made `col` (refuses other qualifiers)."""
    e = copy.deepcopy(e)
    for c in _colrefs(e):
        names = c["column_names"]
        if len(names) == 2 and names[0].lower() == alias:
            c["column_names"] = names[1:]
        elif len(names) != 1:
            raise _Refused(f"column reference {'.'.join(names)}")
    return e


def invertible(plan: Any, schemas: Any, names: list[str]) -> Invertible | None:
    """The invertible-aggregate rewrite of `plan` (a `flows.sqlplan.Plan`-like), or None when it does not qualify.

    `schemas`: the inputs' row schemas; `names`: the view's output column names
    (the rewritten select list keeps them).

    Example:
        >>> s = {"t": pa.schema([("k", pa.int64()), ("v", pa.int64())])}
        >>> inv = invertible(sqlplan.plan_view("SELECT k, sum(v) / count(*) AS m FROM t GROUP BY k", s), s, ["k", "m"])
        >>> inv.keys, inv.args, inv.sum_types
        (('k',), ('v',), ('HUGEINT',))
        >>> inv.output_sql("st")
        'SELECT __sf_g0 AS k, (CASE  WHEN ((__sf_n0 > 0)) THEN (__sf_s0) ELSE NULL END / __sf_c) AS m FROM st'
        >>> invertible(sqlplan.plan_view("SELECT k, max(v) AS m FROM t GROUP BY k", s), s, ["k", "m"]).extremes
        ((0, 'hi'),)
        >>> invertible(sqlplan.plan_view("SELECT k, arg_max(k, v) AS m FROM t GROUP BY k", s), s, ["k", "m"]) is None
        True
    """
    try:
        return _classify(plan, schemas, names)
    except _Refused:
        return None


def _classify(plan: Any, schemas: Any, names: list[str]) -> Invertible:
    if plan.linear or plan.keys is None or len(plan.inputs) != 1:
        raise _Refused("not a single-input keyed plan")
    (name,) = plan.inputs
    if plan.keys.get(name) is None:
        raise _Refused("no key")
    schema = {k.lower(): v for k, v in schemas.items()}.get(name)
    if schema is None or any(f.name.lower().startswith(PREFIX) or f.name in ("_time", "_diff") for f in schema):
        raise _Refused("input schema")
    node, walk = _walk(plan.sql, schemas)
    if walk.refused or node.get("type") != "SELECT_NODE" or (node.get("cte_map") or {}).get("map"):
        raise _Refused("not a plain SELECT")
    if node.get("modifiers") or node.get("qualify") or node.get("sample"):
        raise _Refused("DISTINCT, QUALIFY, ORDER BY, LIMIT or a sample")
    ft = node.get("from_table") or {}
    if ft.get("type") != "BASE_TABLE" or ft.get("sample") or ft.get("column_name_alias"):
        raise _Refused("FROM is not one table")
    if ft.get("schema_name") or ft.get("catalog_name") or ft["table_name"].lower() != name:
        raise _Refused("FROM")
    alias = (ft.get("alias") or ft["table_name"]).lower()
    if len(node.get("group_sets") or []) > 1:
        raise _Refused("grouping sets")
    if any(d.get("class") in ("WINDOW", "SUBQUERY", "STAR") for d in _dicts(node)):
        raise _Refused("window, subquery or *")
    aggs = _aggregates()

    def is_agg(d: dict[str, Any]) -> bool:
        return d.get("class") == "FUNCTION" and str(d.get("function_name", "")).lower() in aggs

    grouped = bool(node.get("group_expressions")) or node.get("aggregate_handling") == "FORCE_AGGREGATES"
    groups: list[dict[str, Any]] = []
    if grouped:
        gs = _Keys(walk, node).groups()
        if not gs:
            raise _Refused("GROUP BY not resolved")
        for g in gs:
            if any(is_agg(d) for d in _dicts(g)):
                raise _Refused("aggregate in GROUP BY")
            g = _unqualify(g, alias)
            if _norm(g) not in [_norm(x) for x in groups]:
                groups.append(g)
    elif not walk.selects[id(node)].aggregates:
        raise _Refused("no aggregate")
    where = node.get("where_clause")
    if where is not None and any(is_agg(d) for d in _dicts(where)):
        raise _Refused("aggregate in WHERE")
    group_norms = [_norm(g) for g in groups]
    args: list[dict[str, Any]] = []  # distinct aggregate arguments
    summed: set[int] = set()
    extremes: list[tuple[int, str]] = []

    def arg_index(a: dict[str, Any], needs_sum: bool) -> int:
        n = _norm(a)
        norms = [_norm(x) for x in args]
        if n in norms:
            i = norms.index(n)
        else:
            args.append(a)
            i = len(args) - 1
        if needs_sum:
            summed.add(i)
        return i

    def rewrite(e: Any) -> Any:
        if isinstance(e, list):
            return [rewrite(x) for x in e]
        if not isinstance(e, dict):
            return e
        if e.get("class") not in (None, "CONSTANT") and _norm(e) in group_norms:
            return _template(f"{PREFIX}g{group_norms.index(_norm(e))}")
        if is_agg(e):
            fn = str(e["function_name"]).lower()
            if fn not in _ALLOWED or e.get("schema") or e.get("catalog") or e.get("export_state"):
                raise _Refused(f"aggregate {fn}")
            if e.get("distinct") or e.get("filter") is not None or (e.get("order_bys") or {}).get("orders"):
                raise _Refused("DISTINCT, FILTER or ORDER BY in an aggregate")
            a = sqlplan._args(e)
            if fn == "count_star":
                if a:
                    raise _Refused("count_star with arguments")
                return _template(f"{PREFIX}c")
            if len(a) != 1 or any(isinstance(x, dict) and x.get("name") for x in e.get("arguments") or []):
                raise _Refused("aggregate arguments")
            arg = a[0]
            if any(is_agg(d) for d in _dicts(arg)):
                raise _Refused("nested aggregate")
            i = arg_index(arg, fn in ("sum", "avg"))
            n, s = f"{PREFIX}n{i}", f"{PREFIX}s{i}"
            if fn in _EXTREMES:
                side = _EXTREMES[fn]
                if (i, side) not in extremes:
                    extremes.append((i, side))
                return _template(f"CASE WHEN {n} > 0 THEN {PREFIX}{side}{i} END")
            if fn == "count":
                return _template(n)
            if fn == "sum":
                return _template(f"CASE WHEN {n} > 0 THEN {s} END")
            return _template(f"CASE WHEN {n} > 0 THEN CAST({s} AS DOUBLE) / {n} END")
        return {k: rewrite(v) for k, v in e.items()}

    items = node.get("select_list") or []
    if len(items) != len(names):
        raise _Refused("select list")
    select = []
    for item, out_name in zip(items, names, strict=True):
        r = rewrite(_unqualify(item, alias))
        r["alias"] = out_name
        select.append(r)
    having = rewrite(_unqualify(node["having"], alias)) if node.get("having") else None
    for d in _dicts([select, having]):
        if d.get("class") == "COLUMN_REF" and not d["column_names"][0].startswith(PREFIX):
            raise _Refused(f"column {d['column_names']} outside an aggregate and the group expressions")
    out = copy.deepcopy(node)
    out.update(
        select_list=select, where_clause=having, group_expressions=[], group_sets=[], having=None,
        aggregate_handling="STANDARD_HANDLING",
    )  # fmt: skip
    keys = tuple(_expr_sql(g) for g in groups)
    arg_sql = tuple(_expr_sql(_unqualify(a, alias)) for a in args)
    types = _types(schema, name, keys, arg_sql)
    sum_types: list[str | None] = []
    for i, (arg_t, sum_t) in enumerate(types[len(keys) :]):
        if i not in summed:
            sum_types.append(None)
            continue
        # SUBTLE: only exact types. A float sum kept by adding and subtracting drifts, and
        # once a NaN or an infinity was added, retracting it cannot take it out again:
        # float arguments take the generic path, which recomputes from the rows.
        if not (arg_t in _INTEGERS or arg_t.startswith("DECIMAL")):
            raise _Refused(f"sum/avg of {arg_t} (only integers and decimals are summed exactly)")
        sum_types.append(sum_t)
    where_sql = _expr_sql(_unqualify(where, alias)) if where is not None else None
    arg_types = tuple(t for t, _ in types[len(keys) :])
    return Invertible(
        name, keys, where_sql, arg_sql, tuple(sum_types), not grouped, out, tuple(extremes), arg_types
    )


def _types(schema: pa.Schema, name: str, keys: tuple[str, ...], args: tuple[str, ...]) -> list[tuple[str, str]]:
    """(typeof(e), typeof(sum(e)) or '') of each key and argument expression, from DuckDB over an empty input."""
    con = duckdb.connect()
    try:
        con.register(name, schema.empty_table())
        out = []
        for e in [*keys, *args]:
            t = con.execute(f"SELECT typeof(any_value(({e}))) FROM {_q(name)}").fetchall()[0][0]
            try:
                s = con.execute(f"SELECT typeof(sum(({e}))) FROM {_q(name)}").fetchall()[0][0]
            except duckdb.Error:
                s = ""
            out.append((str(t), str(s)))
        return out
    except duckdb.Error as err:
        raise _Refused(str(err)) from None
    finally:
        con.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


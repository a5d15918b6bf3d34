"""Classify SQL with DuckDB's own parser: is a query linear, which tables does it read, how does it partition.

The query is parsed by DuckDB (`json_serialize_sql`), never by pattern
matching, and the AST is walked here. Two users:

* the `sql` operator (flows/operators.py) runs a query over each batch of
  `(row, _time, _diff)` updates; that is only right when the query is linear
  (it commutes with adding updates up): `check_linear` refuses the rest when
  the flow is built;
* incremental views over collections: `plan_view` refuses what it cannot
  maintain and says how the output partitions (`Plan.keys`), so that a change
  to some input rows only recomputes the output for their key values.

Expression sub-trees are turned back into SQL with `json_deserialize_sql`, by
grafting them into the select list of a parsed `SELECT 1`.

Keys, in short (`plan_view` documents the details): a query combines input rows
in up to three layers, GROUP BY (groups), windows (partitions) and DISTINCT
(whole select list). A key is valid when each layer only combines rows with
equal keys, that is when every key expression is one of that layer's
expressions (a subset of a valid key is valid, only coarser). The key is the
first layer's expressions that every other layer also has; no common
expression gives `None`, a global aggregate gives `()`.

Example:
    >>> import pyarrow as pa
    >>> s = {"bids": pa.schema([("auction", pa.int64()), ("amount", pa.int64())])}
    >>> p = plan_view("SELECT auction, max(amount) AS top FROM bids GROUP BY ALL", s)
    >>> p.inputs, p.linear, dict(p.keys or {}), sorted(p.constructs)
    (('bids',), False, {'bids': ('auction',)}, ['aggregate', 'group_by'])
    >>> check_linear("SELECT *, count(*) OVER () FROM updates", "step 'f.q'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    storage.errors.InvalidInput: step 'f.q': a window function (count) at character 10 is not linear ...
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from storage.errors import InvalidInput
from storage.query import qident

__all__ = ["Plan", "parse", "check_linear", "plan_view"]

VIEW_HINT = "maintain it as a view: ctx.view(flow, name, sql) or `shardflow view NAME SQL`"
SET_HINT = "a view is a set; order when you query it"

#: DuckDB marks a missing position with (uint64)-1.
_NO_LOC = 2**64 - 1

#: Functions whose result changes from one run to the next (or has side effects).
_NONDETERMINISTIC = frozenset(
    {
        "random", "rand", "setseed", "uuid", "uuidv4", "uuidv7", "gen_random_uuid", "nextval", "currval",
        "now", "current_timestamp", "get_current_timestamp", "transaction_timestamp", "current_time",
        "get_current_time", "current_date", "today", "localtime", "localtimestamp", "current_localtime",
        "current_localtimestamp", "epoch_ms_now", "current_query", "current_setting", "txid_current",
    }
)  # fmt: skip
#: Keywords the parser reads as column references (`SELECT current_date`).
_NONDETERMINISTIC_COLUMNS = frozenset(
    {"current_timestamp", "current_date", "current_time", "localtime", "localtimestamp"}
)

_JOIN_NAMES = {
    "INNER": "inner_join", "LEFT": "left_join", "RIGHT": "right_join", "OUTER": "full_join",
    "FULL": "full_join", "SEMI": "semi_join", "ANTI": "anti_join",
}  # fmt: skip

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _con() -> duckdb.DuckDBPyConnection:
    """One private in-memory connection (callers hold `_lock`)."""
    if "con" not in _state:
        _state["con"] = duckdb.connect()
    con: duckdb.DuckDBPyConnection = _state["con"]
    return con


def _scalar(sql: str, params: list[Any]) -> Any:
    with _lock:
        return _con().execute(sql, params).fetchall()[0][0]


def _aggregates() -> frozenset[str]:
    """The names of DuckDB's aggregate functions, from its own catalog."""
    if "aggs" not in _state:
        with _lock:
            rows = _con().execute(
                "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'aggregate'"
            ).fetchall()
        _state["aggs"] = frozenset(r[0].lower() for r in rows) | {"count_star"}
    aggs: frozenset[str] = _state["aggs"]
    return aggs


@dataclass(frozen=True)
class Plan:
    """What `plan_view` found out about a view's query.

    `inputs`: the collections read, first-seen order, lower-cased (CTE names excluded).
    `linear`: only projections, filters, UNION ALL and joins of one input with
    constant VALUES: the query commutes with adding up `(row, _diff)` updates.
    `keys`: per input, SQL expressions over that input's own columns by which
    the output partitions (output for some key values can be recomputed from the
    input rows with those key values alone); `()` is the constant key (a global
    aggregate); `None`: no such key is known.
    `constructs`: what was found (`group_by`, `aggregate`, `inner_join`, `cte`, ...).
    """

    sql: str
    inputs: tuple[str, ...]
    linear: bool
    keys: Mapping[str, tuple[str, ...]] | None
    constructs: frozenset[str]


def parse(sql: str) -> dict[str, Any]:
    """The AST of the one SELECT statement in `sql` (DuckDB's JSON), its statement node.

    Example:
        >>> parse("SELECT 1 FROM t")["from_table"]["table_name"]
        't'
        >>> parse("SELEC 1")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        storage.errors.InvalidInput: cannot parse SQL: syntax error at or near "SELEC" (at character 0)
    """
    if not isinstance(sql, str):
        raise InvalidInput(f"SQL must be a string, got {type(sql).__name__}")
    try:
        doc = json.loads(_scalar("SELECT json_serialize_sql(?)", [sql]))
    except duckdb.Error as e:
        raise InvalidInput(f"cannot parse SQL: {e}") from e
    if doc.get("error"):
        msg = doc.get("error_message", "unknown error")
        if doc.get("error_type") == "not implemented":
            raise InvalidInput(f"expected one SELECT statement: {msg}")
        where = f" (at character {doc['position']})" if "position" in doc else ""
        raise InvalidInput(f"cannot parse SQL: {msg}{where}")
    statements = doc.get("statements", [])
    if len(statements) != 1:
        raise InvalidInput(f"expected exactly one SELECT statement, found {len(statements)}")
    node: dict[str, Any] = statements[0]["node"]
    return node


def _expr_sql(expr: dict[str, Any]) -> str:
    """SQL text of an expression sub-tree, via DuckDB's deserializer."""
    if "template" not in _state:
        _state["template"] = parse("SELECT 1")
    node = copy.deepcopy(_state["template"])
    node["select_list"] = [dict(expr, alias="")]
    doc = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
    text: str = _scalar("SELECT json_deserialize_sql(?)", [json.dumps(doc)])
    prefix = "SELECT "
    if not text.startswith(prefix):  # pragma: no cover - DuckDB changed its printer
        raise AssertionError(f"unexpected deserialized SQL {text!r}")
    return text[len(prefix) :]


def _loc(node: Any) -> int | None:
    if isinstance(node, dict):
        loc = node.get("query_location")
        if isinstance(loc, int) and loc != _NO_LOC:
            return loc
    return None


def _first_loc(node: Any) -> int | None:
    """The smallest position anywhere in a sub-tree (for nodes that have none of their own)."""
    best: int | None = None
    for d in _dicts(node):
        loc = _loc(d)
        if loc is not None and (best is None or loc < best):
            best = loc
    return best


def _dicts(node: Any) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            yield n
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)


def _at(loc: int | None) -> str:
    return f" at character {loc}" if loc is not None else ""


def _conjuncts(e: dict[str, Any]) -> list[dict[str, Any]]:
    if e.get("class") == "CONJUNCTION" and e.get("type") == "CONJUNCTION_AND":
        return [c for child in e["children"] for c in _conjuncts(child)]
    return [e]


def _colrefs(e: Any) -> Iterator[dict[str, Any]]:
    for d in _dicts(e):
        if d.get("class") == "COLUMN_REF":
            yield d


def _args(fn: dict[str, Any]) -> list[dict[str, Any]]:
    """Function arguments: DuckDB 2.0 wraps each as {"name", "expression"}."""
    out = []
    for a in fn.get("arguments") or []:
        out.append(a["expression"] if isinstance(a, dict) and "expression" in a and "class" not in a else a)
    return out


@dataclass
class _Leaf:
    """One relation in a FROM clause."""

    alias: str  # lower-cased name the query uses for it
    kind: str  # "input" (a collection), "const" (constant VALUES), "other" (CTE, subquery, table function)
    name: str  # input name for "input"
    columns: tuple[str, ...] | None  # lower-cased column names, when known
    spelled: tuple[str, ...] = ()  # column names as the schema spells them


@dataclass
class _Refusal:
    construct: str
    what: str
    loc: int | None
    why: str = ""


@dataclass
class _Select:
    """Facts about one SELECT node, gathered while walking it."""

    leaves: list[_Leaf]
    aggregates: list[dict[str, Any]]
    windows: list[dict[str, Any]]
    nullable: set[str]  # aliases on the null-supplying side of an outer join (or hidden by SEMI/ANTI)
    joins: list[dict[str, Any]]


class _Walk:
    """Walks a parsed query once; collects inputs, constructs, refusals and linearity breaks."""

    def __init__(self, schemas: Mapping[str, pa.Schema] | None):
        self.view = schemas is not None
        self.schemas = {k.lower(): v for k, v in (schemas or {}).items()}
        self.inputs: list[str] = []
        self.refs: dict[str, int] = {}
        self.reads = 0  # every relation read that is not constant (inputs, CTE refs, table functions)
        self.constructs: set[str] = set()
        self.refused: list[_Refusal] = []
        self.nonlinear: list[_Refusal] = []
        self.selects: dict[int, _Select] = {}  # id(node) -> facts
        self._current: list[_Select] = []

    # -- recording ---------------------------------------------------------
    def refuse(self, construct: str, what: str, loc: int | None, why: str = "") -> None:
        self.refused.append(_Refusal(construct, what, loc, why))

    def not_linear(self, construct: str, what: str, loc: int | None) -> None:
        self.nonlinear.append(_Refusal(construct, what, loc))

    # -- query nodes -------------------------------------------------------
    def query(self, node: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        scope = set(ctes)
        for entry in (node.get("cte_map") or {}).get("map", []):
            self.constructs.add("cte")
            body = entry["value"]["query_node"]
            name = entry["key"].lower()
            if body.get("type") == "RECURSIVE_CTE_NODE":
                self.constructs.add("recursive_cte")
                loc = _first_loc(body)
                self.refuse("recursive_cte", f"recursive CTE {name!r}", loc, "recursive CTEs are not supported")
                self.not_linear("recursive_cte", f"a recursive CTE ({name})", loc)
                scope.add(name)
                for side in ("left", "right"):
                    if body.get(side):
                        self.query(body[side], frozenset(scope), top=False)
                continue
            self.query(body, frozenset(scope), top=False)
            scope.add(name)
        self.modifiers(node, top)
        kind = node.get("type")
        if kind == "SELECT_NODE":
            self.select(node, frozenset(scope))
        elif kind == "SET_OPERATION_NODE":
            self.setop(node, frozenset(scope))
        else:
            loc = _first_loc(node)
            self.refuse(str(kind).lower(), f"query node {kind}", loc, "not supported")
            self.not_linear(str(kind).lower(), f"a {kind}", loc)

    def modifiers(self, node: dict[str, Any], top: bool) -> None:
        for m in node.get("modifiers") or []:
            t = m.get("type")
            if t == "ORDER_MODIFIER":
                self.constructs.add("order_by")
                loc = _first_loc(m)
                self.refuse("order_by", "ORDER BY", loc, SET_HINT)
                self.not_linear("order_by", "ORDER BY", loc)
            elif t in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER"):
                self.constructs.add("limit")
                loc = _first_loc(m)
                what = "LIMIT" if m.get("limit") is not None else "OFFSET"
                self.refuse("limit", what, loc, SET_HINT)
                self.not_linear("limit", what, loc)
            elif t == "DISTINCT_MODIFIER":
                self.constructs.add("distinct")
                loc = _first_loc(node.get("select_list"))
                targets = m.get("distinct_on_targets") or []
                what = "DISTINCT ON" if targets else "DISTINCT"
                self.not_linear("distinct", what, loc)
                self.exprs(targets)
            else:
                loc = _first_loc(m)
                self.refuse(str(t).lower(), f"modifier {t}", loc, "not supported")
                self.not_linear(str(t).lower(), f"modifier {t}", loc)

    def setop(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        children = node.get("children") or [c for c in (node.get("left"), node.get("right")) if c]
        op = node.get("setop_type", "")
        loc = _first_loc(children[1]) if len(children) > 1 else None
        if op in ("UNION", "UNION_BY_NAME") and node.get("setop_all"):
            self.constructs.add("union_all")
        else:
            name = op.replace("_BY_NAME", " BY NAME") + (" ALL" if node.get("setop_all") else "")
            construct = op.lower().replace("_by_name", "") + ("_all" if node.get("setop_all") else "")
            self.constructs.add(construct)
            self.refuse(construct, name, loc, "only UNION ALL is supported (it needs no deduplication)")
            self.not_linear(construct, name, loc)
        reads = []
        for c in children:
            before = self.reads
            self.query(c, ctes, top=False)
            reads.append(self.reads > before)
        if any(reads) and not all(reads):
            const = children[reads.index(False)]
            self.not_linear("constant_branch", "a UNION ALL branch that reads no table", _first_loc(const))

    def select(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        facts = _Select([], [], [], set(), [])
        self.selects[id(node)] = facts
        self._current.append(facts)
        try:
            facts.leaves = self.table(node.get("from_table"), ctes, facts)
            if node.get("sample"):
                loc = _first_loc(node.get("from_table"))
                self.refuse("sample", "USING SAMPLE", loc, "sampling is random")
                self.not_linear("sample", "USING SAMPLE", loc)
            self.exprs(node.get("select_list"))
            self.exprs(node.get("where_clause"))
            groups = node.get("group_expressions") or []
            if groups or node.get("aggregate_handling") == "FORCE_AGGREGATES":
                self.constructs.add("group_by")
                loc = _first_loc(groups) if groups else None
                self.not_linear("group_by", "GROUP BY ALL" if not groups else "GROUP BY", loc)
                if len(node.get("group_sets") or []) > 1:
                    self.constructs.add("grouping_sets")
                self.exprs(groups)
            if node.get("having"):
                self.constructs.add("having")
                self.not_linear("having", "HAVING", _first_loc(node["having"]))
                self.exprs(node["having"])
            if node.get("qualify"):
                self.constructs.add("qualify")
                self.not_linear("qualify", "QUALIFY", _first_loc(node["qualify"]))
                self.exprs(node["qualify"])
            if self.view:
                self.check_windows(facts)
        finally:
            self._current.pop()

    def check_windows(self, facts: _Select) -> None:
        first: tuple[str, ...] | None = None
        for w in facts.windows:
            parts = tuple(sorted(_expr_sql(p) for p in w.get("partitions") or []))
            if not parts:
                self.refuse(
                    "window", f"window function {w.get('function_name')}() without PARTITION BY", _loc(w),
                    "every change would touch every row; partition it",
                )  # fmt: skip
            elif first is None:
                first = parts
            elif parts != first:
                self.refuse(
                    "window", f"window function {w.get('function_name')}() PARTITION BY {', '.join(parts)}", _loc(w),
                    f"all windows of a query must share one PARTITION BY (the first is {', '.join(first)})",
                )  # fmt: skip

    # -- FROM --------------------------------------------------------------
    def table(self, ref: dict[str, Any] | None, ctes: frozenset[str], facts: _Select) -> list[_Leaf]:
        if not ref:
            return []
        t = ref.get("type")
        loc = _loc(ref)
        alias = (ref.get("alias") or "").lower()
        if ref.get("sample"):
            self.refuse("sample", "TABLESAMPLE", loc, "sampling is random")
            self.not_linear("sample", "TABLESAMPLE", loc)
        if t == "EMPTY":
            return []
        if t == "BASE_TABLE":
            name = ref["table_name"].lower()
            self.reads += 1
            if name in ctes:
                return [_Leaf(alias or name, "other", name, None)]
            if self.view and name not in self.schemas:
                known = ", ".join(sorted(self.schemas)) or "none"
                self.refuse("table", f"table {name!r}", loc, f"it is not a known collection (known: {known})")
            if name not in self.refs:
                self.inputs.append(name)
            self.refs[name] = self.refs.get(name, 0) + 1
            schema = self.schemas.get(name)
            cols = tuple(schema.names) if schema is not None else None
            return [_Leaf(alias or name, "input", name, tuple(c.lower() for c in cols) if cols else None, cols or ())]
        if t == "SUBQUERY":
            before = self.reads
            body = ref["subquery"]["node"]
            self.query(body, ctes, top=False)
            const = self.reads == before
            names = [c.lower() for c in ref.get("column_name_alias") or []]
            if const:
                self.constructs.add("values")
            return [_Leaf(alias, "const" if const else "other", "", tuple(names) if names else None)]
        if t == "TABLE_FUNCTION":
            fn = ref.get("function") or {}
            name = fn.get("function_name", "?")
            self.constructs.add("table_function")
            self.reads += 1
            self.refuse("table_function", f"table function {name}()", loc, "a view reads collections only")
            self.exprs(_args(fn))
            return [_Leaf(alias or name.lower(), "other", name, None)]
        if t == "EXPRESSION_LIST":
            self.exprs(ref.get("values"))
            return [_Leaf(alias, "const", "", None)]
        if t == "JOIN":
            return self.join(ref, ctes, facts)
        self.refuse(str(t).lower(), f"{t} in FROM", loc, "not supported")
        self.not_linear(str(t).lower(), f"{t} in FROM", loc)
        self.reads += 1
        return [_Leaf(alias, "other", "", None)]

    def join(self, ref: dict[str, Any], ctes: frozenset[str], facts: _Select) -> list[_Leaf]:
        loc = _loc(ref)
        left = self.table(ref.get("left"), ctes, facts)
        right = self.table(ref.get("right"), ctes, facts)
        jt, rt = ref.get("join_type", "INNER"), ref.get("ref_type", "REGULAR")
        facts.joins.append(ref)
        if rt == "REGULAR":
            construct = _JOIN_NAMES.get(jt, f"{jt.lower()}_join")
            what = f"{jt} JOIN"
        else:
            construct = "cross_join" if rt == "CROSS" else f"{rt.lower()}_join"
            what = "a comma join (an implicit CROSS JOIN)" if ref.get("is_implicit") else f"{rt} JOIN"
        self.constructs.add(construct)
        lateral = self.lateral(ref.get("right"), left)
        if lateral:
            self.constructs.add("lateral")
            self.refuse("lateral", f"LATERAL subquery (it refers to {lateral!r})", _loc(ref.get("right")),
                        "a view joins collections on equal keys only")  # fmt: skip
        if rt != "REGULAR":
            self.refuse(construct, what, loc, "a view joins collections on equal keys only (JOIN ... ON a.k = b.k)")
        elif jt not in ("INNER", "LEFT", "RIGHT", "OUTER", "FULL", "SEMI", "ANTI"):
            self.refuse(construct, what, loc, "not supported")
        nonconst = [leaf for leaf in left + right if leaf.kind != "const"]
        if len(nonconst) > 1 or lateral:
            article = "" if what.startswith("a ") else "an " if what[0] in "AEIOU" else "a "
            what_lin = "a LATERAL join" if lateral else f"{article}{what} of {' and '.join(leaf.alias for leaf in nonconst)}"
            self.not_linear(construct, what_lin, loc)
        if jt == "LEFT":
            facts.nullable.update(leaf.alias for leaf in right)
        elif jt == "RIGHT":
            facts.nullable.update(leaf.alias for leaf in left)
        elif jt in ("OUTER", "FULL"):
            facts.nullable.update(leaf.alias for leaf in left + right)
        elif jt in ("SEMI", "ANTI"):
            facts.nullable.update(leaf.alias for leaf in right)
        if any(leaf.kind == "const" for leaf in left + right) and any(leaf.alias in facts.nullable for leaf in nonconst):
            # rows of the constant side that match nothing would be in every batch's result
            self.not_linear(construct, f"a {what} whose rows can come from the constant side alone", loc)
        cond = ref.get("condition")
        if cond is not None:
            self.exprs(cond)
            if rt == "REGULAR" and self.view:
                self.check_equi(cond, left, right)
        return left + right

    def check_equi(self, cond: dict[str, Any], left: list[_Leaf], right: list[_Leaf]) -> None:
        for c in _conjuncts(cond):
            if c.get("class") != "COMPARISON" or c.get("type") not in ("COMPARE_EQUAL", "COMPARE_NOT_DISTINCT_FROM"):
                self.refuse("non_equi_join", f"non-equi join condition {_expr_sql(c)}", _loc(c),
                            "a join condition must be a conjunction of equalities between the two sides")  # fmt: skip
                continue
            s0, s1 = (_sides(c[k], left, right) for k in ("left", "right"))
            if s0 is None or s1 is None or "LR" in (s0, s1):
                ok = False
            else:
                ok = "?" in (s0, s1) or s0 != s1
            if not ok:
                self.refuse("non_equi_join", f"join condition {_expr_sql(c)}", _loc(c),
                            "each side of an equality must use the columns of one side of the join")  # fmt: skip

    def lateral(self, ref: dict[str, Any] | None, left: list[_Leaf]) -> str | None:
        """The left alias a subquery on the right refers to (DuckDB makes such a join LATERAL)."""
        if not ref or ref.get("type") != "SUBQUERY":
            return None
        outer = {leaf.alias for leaf in left}
        inner = {(d.get("alias") or d.get("table_name") or "").lower() for d in _dicts(ref["subquery"]) if d.get("type") in ("BASE_TABLE", "SUBQUERY")}  # fmt: skip
        for c in _colrefs(ref["subquery"]):
            names = c["column_names"]
            if len(names) >= 2 and names[0].lower() in outer and names[0].lower() not in inner:
                return str(names[0])
        return None

    # -- expressions -------------------------------------------------------
    def exprs(self, node: Any) -> None:
        if isinstance(node, list):
            for n in node:
                self.exprs(n)
            return
        if not isinstance(node, dict):
            return
        cls = node.get("class")
        facts = self._current[-1] if self._current else None
        if cls == "SUBQUERY":
            self.constructs.add("subquery")
            kind = node.get("subquery_type", "SCALAR")
            what = {"ANY": "IN (SELECT ...)", "EXISTS": "EXISTS (SELECT ...)", "NOT_EXISTS": "NOT EXISTS (SELECT ...)"}.get(kind, "a scalar subquery (SELECT ...)")  # fmt: skip
            self.refuse("subquery", f"subquery expression {what}", _loc(node),
                        "subquery expressions are not supported yet; write it as a join")  # fmt: skip
            before = self.reads
            self.exprs(node.get("child"))
            self.query(node["subquery"]["node"], frozenset(), top=False)
            if self.reads != before:
                self.not_linear("subquery", f"subquery expression {what}", _loc(node))
            return
        if cls == "WINDOW":
            self.constructs.add("window")
            self.not_linear("window", f"a window function ({node.get('function_name')})", _loc(node))
            if facts is not None:
                facts.windows.append(node)
        elif cls == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name in _NONDETERMINISTIC:
                self.refuse("nondeterministic", f"non-deterministic function {name}()", _loc(node),
                            "a view must give the same rows every time it is recomputed")  # fmt: skip
            if name in _aggregates():
                self.constructs.add("aggregate")
                self.not_linear("aggregate", f"an aggregate ({name})", _loc(node))
                if facts is not None:
                    facts.aggregates.append(node)
        elif cls == "COLUMN_REF":
            names = node.get("column_names") or []
            if len(names) == 1 and names[0].lower() in _NONDETERMINISTIC_COLUMNS and facts is not None:
                known = {c for leaf in facts.leaves for c in leaf.columns or ()}
                if names[0].lower() not in known:
                    self.refuse("nondeterministic", f"non-deterministic {names[0]}", _loc(node),
                                "a view must give the same rows every time it is recomputed")  # fmt: skip
        for v in node.values():
            if isinstance(v, (dict, list)):
                self.exprs(v)


def _owner(col: dict[str, Any], leaves: list[_Leaf]) -> str | None:
    """The alias of the leaf a column reference belongs to; "?" when unknown or ambiguous."""
    names = [n.lower() for n in col["column_names"]]
    aliases = {leaf.alias for leaf in leaves}
    if len(names) >= 2 and names[0] in aliases:
        return names[0]
    owners = [leaf.alias for leaf in leaves if leaf.columns is not None and names[0] in leaf.columns]
    if len(owners) == 1 and all(leaf.columns is not None for leaf in leaves):
        return owners[0]
    return "?"


def _sides(e: dict[str, Any], left: list[_Leaf], right: list[_Leaf]) -> str | None:
    """Which side of a join an expression uses: "L", "R", "?" (unknown), "LR" (both) or None (no columns)."""
    la, ra = {leaf.alias for leaf in left}, {leaf.alias for leaf in right}
    found = set()
    for c in _colrefs(e):
        o = _owner(c, left + right)
        found.add("L" if o in la else "R" if o in ra else "?")
    if not found:
        return None
    if "?" in found:
        return "?"
    return "".join(sorted(found))


class _Keys:
    """Derives `Plan.keys` for the top SELECT node (see `plan_view`)."""

    def __init__(self, walk: _Walk, node: dict[str, Any]):
        self.walk = walk
        self.node = node
        self.facts = walk.selects[id(node)]
        self.leaves = self.facts.leaves
        self.by_alias = {leaf.alias: leaf for leaf in self.leaves}

    def single(self, e: dict[str, Any]) -> tuple[str, str] | None:
        """(alias, SQL over that input's unqualified columns) when `e` reads one collection only."""
        if any(d.get("class") in ("WINDOW", "SUBQUERY") for d in _dicts(e)):
            return None
        aggs = _aggregates()
        if any(d.get("class") == "FUNCTION" and str(d.get("function_name", "")).lower() in aggs for d in _dicts(e)):
            return None
        owners = {_owner(c, self.leaves) for c in _colrefs(e)}
        if len(owners) != 1:
            return None
        (alias,) = owners
        leaf = self.by_alias.get(alias or "")
        if leaf is None or leaf.kind != "input":
            return None
        e = copy.deepcopy(e)
        for c in _colrefs(e):
            names = c["column_names"]
            if len(names) >= 2 and names[0].lower() == alias:
                c["column_names"] = names[1:]
        return leaf.alias, _expr_sql(e)

    def star(self, item: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The column references `*` stands for, or None when that is not plain."""
        if item.get("replace_list") or item.get("rename_list") or item.get("columns") or item.get("expr"):
            return None
        if item.get("qualified_exclude_list"):
            return None
        rel = (item.get("relation_name") or "").lower()
        exclude = {x.lower() for x in item.get("exclude_list") or []}
        out = []
        for leaf in self.leaves:
            if rel and leaf.alias != rel:
                continue
            if leaf.kind != "input":
                if leaf.columns is None:
                    return None
                continue
            for col in leaf.spelled:
                if col.lower() not in exclude:
                    out.append({"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "", "column_names": [leaf.alias, col]})  # fmt: skip
        return out

    def select_list(self) -> list[dict[str, Any]] | None:
        out = []
        for item in self.node.get("select_list") or []:
            if item.get("class") == "STAR":
                cols = self.star(item)
                if cols is None:
                    return None
                out.extend(cols)
            else:
                out.append(item)
        return out

    def has_agg(self, e: dict[str, Any]) -> bool:
        aggs = _aggregates()
        return any(
            d.get("class") == "WINDOW" or (d.get("class") == "FUNCTION" and str(d.get("function_name", "")).lower() in aggs)
            for d in _dicts(e)
        )  # fmt: skip

    def groups(self) -> list[dict[str, Any]] | None:
        """GROUP BY expressions with GROUP BY ALL, positions and aliases resolved (None: cannot)."""
        items = self.select_list()
        if self.node.get("aggregate_handling") == "FORCE_AGGREGATES":
            if items is None:
                return None
            return [e for e in items if not self.has_agg(e)]
        columns = {c for leaf in self.leaves for c in leaf.columns or ()}
        out = []
        for g in self.node.get("group_expressions") or []:
            if g.get("class") == "CONSTANT" and g.get("literal", {}).get("kind") == "INTEGER":
                pos = int(g["literal"]["text"])
                if items is None or not 1 <= pos <= len(items):
                    return None
                out.append(items[pos - 1])
            elif g.get("class") == "COLUMN_REF" and len(g["column_names"]) == 1 and g["column_names"][0].lower() not in columns:  # fmt: skip
                name = g["column_names"][0].lower()
                hits = [e for e in items or [] if (e.get("alias") or "").lower() == name]
                if len(hits) != 1:
                    return None
                out.append(hits[0])
            else:
                out.append(g)
        return out

    def layers(self) -> list[list[tuple[str, str]]] | None:
        """The expression sets that combine rows, innermost first: GROUP BY, windows, DISTINCT.

        Each holds the layer's expressions that read one input. None: a layer
        cannot be resolved. A global aggregate is not a layer (see `keys`).
        """
        node, facts = self.node, self.facts
        out: list[list[tuple[str, str]]] = []
        grouped = bool(node.get("group_expressions")) or node.get("aggregate_handling") == "FORCE_AGGREGATES"
        if grouped:
            if len(node.get("group_sets") or []) > 1:
                return None  # ROLLUP/CUBE/GROUPING SETS: coarser sets combine across groups
            gs = self.groups()
            if gs is None:
                return None
            out.append(self.singles(gs))
        if facts.windows:
            out.append(self.singles(facts.windows[0].get("partitions") or []))
        for m in node.get("modifiers") or []:
            if m.get("type") == "DISTINCT_MODIFIER":
                targets = m.get("distinct_on_targets") or self.select_list()
                if targets is None:
                    return None
                out.append(self.singles(targets))
        return out

    def singles(self, exprs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        out = []
        for e in exprs:
            s = self.single(e)
            if s is not None and s not in out:
                out.append(s)
        return out

    def classes(self) -> list[dict[str, str]]:
        """Equivalence classes of the join equalities, as {alias: expression}, in order of creation."""
        parent: dict[tuple[str, str], tuple[str, str]] = {}

        def find(x: tuple[str, str]) -> tuple[str, str]:
            parent.setdefault(x, x)
            while parent[x] != x:
                x = parent[x]
            return x

        order: list[tuple[str, str]] = []
        for ref in self.facts.joins:
            pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
            if ref.get("condition") is not None:
                for c in _conjuncts(ref["condition"]):
                    if c.get("class") == "COMPARISON" and c.get("type") == "COMPARE_EQUAL":
                        pairs.append((c["left"], c["right"]))
            for col in ref.get("using_columns") or []:
                sides = [self.using_side(ref.get(k), col) for k in ("left", "right")]
                if sides[0] and sides[1]:
                    pairs.append((sides[0], sides[1]))
            for lhs, rhs in pairs:
                a, b = self.single(lhs), self.single(rhs)
                if a is None or b is None:
                    continue
                order.extend([a, b])
                parent[find(a)] = find(b)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for x in order:
            cls = groups.setdefault(find(x), {})
            cls.setdefault(x[0], x[1])
        return list(groups.values())

    def using_side(self, ref: dict[str, Any] | None, col: str) -> dict[str, Any] | None:
        aliases = {d_alias for d_alias in self.leaf_aliases(ref)}
        for leaf in self.leaves:
            if leaf.alias in aliases and leaf.columns is not None and col.lower() in leaf.columns:
                return {"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "", "column_names": [leaf.alias, col]}
        return None

    def leaf_aliases(self, ref: dict[str, Any] | None) -> set[str]:
        if not ref:
            return set()
        if ref.get("type") == "JOIN":
            return self.leaf_aliases(ref.get("left")) | self.leaf_aliases(ref.get("right"))
        alias = (ref.get("alias") or "").lower()
        if ref.get("type") == "BASE_TABLE":
            return {alias or ref["table_name"].lower()}
        return {alias}

    def keys(self) -> dict[str, tuple[str, ...]] | None:
        inputs = [leaf for leaf in self.leaves if leaf.kind == "input"]
        if not inputs or any(leaf.kind == "other" for leaf in self.leaves):
            return None
        if len(inputs) != len(self.walk.inputs) or any(n != 1 for n in self.walk.refs.values()):
            return None  # an input read twice, or read elsewhere in the query
        if any(leaf.alias in self.facts.nullable for leaf in inputs) and any(leaf.kind == "const" for leaf in self.leaves):  # fmt: skip
            return None  # a constant row kept when no input row matches depends on all input rows
        layers = self.layers()
        if layers is None:
            return None
        grouped = bool(self.node.get("group_expressions")) or self.node.get("aggregate_handling") == "FORCE_AGGREGATES"
        if self.facts.aggregates and not grouped:
            return {leaf.name: () for leaf in inputs}  # a global aggregate: one row, whatever comes after it
        if any(not layer for layer in layers):
            return None  # a layer combines rows by expressions that are not over one input
        if len(inputs) == 1:
            if not layers:
                return None  # linear: nothing combines; the caller can use linearity instead
            leaf = inputs[0]
            if leaf.alias in self.facts.nullable:
                return None
            first = [x for x in layers[0] if x[0] == leaf.alias]
            common = [x for x in first if all(x in layer for layer in layers[1:])]
            return {leaf.name: tuple(x[1] for x in common)} if common else None
        for cls in self.classes():
            if any(leaf.alias not in cls for leaf in inputs):
                continue
            safe = {(a, e) for a, e in cls.items() if a not in self.facts.nullable}
            if all(safe & set(layer) for layer in layers):
                return {leaf.name: (cls[leaf.alias],) for leaf in inputs}
        return None


def _walk(sql: str, schemas: Mapping[str, pa.Schema] | None) -> tuple[dict[str, Any], _Walk]:
    node = parse(sql)
    walk = _Walk(schemas)
    walk.query(node, frozenset(), top=True)
    if walk.reads == 0:
        # f(no updates) must be no rows; a constant query gives its rows for every batch
        walk.not_linear("constant", "a query that reads no table", _first_loc(node))
    return node, walk


def check_linear(sql: str, where: str) -> None:
    """Raise `InvalidInput` unless `sql` is linear over its one input (for the `sql` operator).

    Linear: projections, filters, UNION ALL and joins against constant VALUES.
    Refused: aggregates, GROUP BY, HAVING, window functions, QUALIFY, DISTINCT,
    ORDER BY, LIMIT/OFFSET, set operations but UNION ALL, joins of two
    relations that are not constant, and subqueries that read a table.

    Example:
        >>> check_linear("SELECT k, _time, _diff FROM updates WHERE k > 1", "step 'f.q'")
        >>> check_linear("SELECT DISTINCT k, _time, _diff FROM updates", "step 'f.q'")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        storage.errors.InvalidInput: step 'f.q': DISTINCT at character 16 is not linear ...
    """
    try:
        _node, walk = _walk(sql, None)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e}") from e
    if walk.nonlinear:
        r = min(walk.nonlinear, key=lambda r: (r.loc is None, r.loc or 0))
        msg = (
            f"{where}: {r.what}{_at(r.loc)} is not linear (a batch of (row, _time, _diff) updates cannot "
            f"be run through it on its own and added up); {VIEW_HINT}"
        )
        raise InvalidInput(msg)


def plan_view(sql: str, schemas: Mapping[str, pa.Schema]) -> Plan:
    """Check a view's query over collections and say how to maintain it; `InvalidInput` if it cannot be.

    `schemas`: every known collection -> its row schema.

    Refused (the message names the construct and its position): tables that
    are not collections, non-deterministic functions, table functions,
    windows without PARTITION BY or with different PARTITION BYs, ORDER BY,
    LIMIT and OFFSET, joins that are not equi-joins (CROSS, comma, LATERAL,
    ASOF, POSITIONAL, NATURAL, conditions other than equalities between the
    two sides), subquery expressions, recursive CTEs, sampling, set
    operations other than UNION ALL.

    Keys (see the module docstring): only for a top-level SELECT whose FROM
    holds collections, each read once, and constant VALUES; CTE references,
    subqueries in FROM, self-joins and UNION ALL give `None`.

    * One input: the expressions common to the GROUP BY (with GROUP BY ALL,
      positions and aliases resolved), the windows' PARTITION BY and the
      DISTINCT (ON) list, in the order of the first of these present. A global
      aggregate gives `()`. GROUP BY g with PARTITION BY g gives g; with
      PARTITION BY h (not a group expression) there is no common key: `None`.
      ROLLUP/CUBE/GROUPING SETS give `None`. A linear query gives `None`.
    * Joins (inner, left, right, full; each collection once): an equivalence
      class of the join equalities with an expression over every input (e.g.
      a.k = b.k and b.k = c.k); every GROUP BY / PARTITION BY / DISTINCT layer
      must hold that class's expression of an input that an outer join never
      null-extends (a LEFT JOIN b grouped by b.k puts unmatched rows of every
      a.k in the NULL group). Then keys[input] = its expression of the class.
      A join with more equalities than one class is still partitioned by one
      spanning class (the extra equalities only remove pairs).
    """
    node, walk = _walk(sql, schemas)
    if walk.refused:
        r = min(walk.refused, key=lambda r: (r.loc is None, r.loc or 0))
        why = f": {r.why}" if r.why else ""
        raise InvalidInput(f"view query: {r.what}{_at(r.loc)} is not supported in a view{why}")
    keys: dict[str, tuple[str, ...]] | None = None
    if node.get("type") == "SELECT_NODE" and not (node.get("cte_map") or {}).get("map"):
        keys = _Keys(walk, node).keys()
    if keys is not None:
        keys = _hash_consistent(keys, schemas)
    return Plan(
        sql=sql,
        inputs=tuple(walk.inputs),
        linear=not walk.nonlinear,
        keys=keys,
        constructs=frozenset(walk.constructs),
    )


_INTEGER_TYPES = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
)


def _hash_consistent(keys: dict[str, tuple[str, ...]], schemas: Mapping[str, pa.Schema]) -> dict[str, tuple[str, ...]] | None:
    """Keys whose DuckDB `hash` agrees wherever the query's equality does, or None.

    The engine finds the rows a change touches by `hash(key)`: rows of two inputs
    that a join equates must hash alike. DuckDB hashes every integer type alike,
    but not a BIGINT and the equal DOUBLE, two DECIMAL widths, or a DATE and a
    TIMESTAMP: such key positions are cast to their common type. Keys that no
    common type fits, or that compare under a collation (equal strings with
    different hashes), give None (the view is then recomputed whole: slow, exact).

    Example:
        >>> s = {"a": pa.schema([("k", pa.int32())]), "b": pa.schema([("k", pa.float64())])}
        >>> _hash_consistent({"a": ("k",), "b": ("k",)}, s)
        {'a': ('CAST((k) AS DOUBLE)',), 'b': ('k',)}
    """
    names = [n for n, k in keys.items() if k]
    if not names:
        return keys
    width = {len(keys[n]) for n in names}
    if len(width) != 1:
        return None
    lower = {k.lower(): v for k, v in schemas.items()}
    con = duckdb.connect()
    try:
        for n in names:
            con.register(n, lower[n].empty_table())
        out = {n: list(k) for n, k in keys.items()}
        for j in range(width.pop()):
            exprs = {n: keys[n][j] for n in names}
            types = {}
            for n, e in exprs.items():
                if "collate" in e.lower():
                    return None
                types[n] = str(con.execute(f"SELECT typeof(any_value(({e}))) FROM {qident(n)}").fetchall()[0][0])
                if "COLLATE" in types[n].upper():
                    return None
            if len(set(types.values())) == 1 or set(types.values()) <= _INTEGER_TYPES:
                continue
            vals = ", ".join(f"NULL::{t}" for t in types.values())
            try:
                common = str(con.execute(f"SELECT typeof([{vals}][1])").fetchall()[0][0])
            except duckdb.Error:
                return None
            for n, t in types.items():
                if t != common:
                    out[n][j] = f"CAST(({exprs[n]}) AS {common})"
        return {n: tuple(k) for n, k in out.items()}
    except (duckdb.Error, KeyError):
        return None
    finally:
        con.close()

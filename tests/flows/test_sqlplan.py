"""flows.sqlplan: DuckDB-parsed classification of view queries and of the `sql` operator's queries."""

from __future__ import annotations

import doctest
import re

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource

import flows.operators
import flows.sqlplan
from flows.operators import sql
from flows.sqlplan import Plan, check_linear, parse, plan_view
from storage.errors import InvalidInput

SCHEMAS = {
    "bids": pa.schema([("id", pa.int64()), ("auction", pa.int64()), ("bidder", pa.string()), ("amount", pa.int64())]),
    "auctions": pa.schema([("id", pa.int64()), ("seller", pa.string()), ("reserve", pa.int64())]),
    "users": pa.schema([("id", pa.int64()), ("name", pa.string())]),
    "Mixed": pa.schema([("K", pa.int64()), ("v", pa.float64())]),
}

# -- parse ----------------------------------------------------------------------


def test_parse_returns_the_statement_node():
    node = parse("SELECT a FROM t WHERE b > 1")
    assert node["type"] == "SELECT_NODE"
    assert node["from_table"]["table_name"] == "t"
    assert node["where_clause"]["type"] == "COMPARE_GREATERTHAN"


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("SELEC 1", r'cannot parse SQL: syntax error at or near "SELEC"'),
        ("SELECT 1; SELECT 2", "exactly one SELECT statement, found 2"),
        ("", "exactly one SELECT statement, found 0"),
        ("INSERT INTO t VALUES (1)", "expected one SELECT statement"),
    ],
)
def test_parse_refuses(query, match):
    with pytest.raises(InvalidInput, match=match):
        parse(query)


# -- plan_view: refusals ------------------------------------------------------------

REFUSED = [
    # (query, words the message must contain, the SQL text at the reported position or None)
    ("SELECT * FROM nope", ["table 'nope'", "known: auctions, bids, mixed, users"], "nope"),
    ("SELECT id, random() AS r FROM bids", ["non-deterministic function random()"], "random()"),
    ("SELECT id, now() FROM bids", ["non-deterministic function now()"], "now()"),
    ("SELECT id, current_timestamp FROM bids", ["non-deterministic current_timestamp"], "current_timestamp"),
    ("SELECT id, current_date FROM bids", ["non-deterministic current_date"], "current_date"),
    ("SELECT gen_random_uuid() AS u, id FROM bids", ["non-deterministic function gen_random_uuid()"], "gen_random_uuid()"),
    ("SELECT uuid() AS u, id FROM bids", ["non-deterministic function uuid()"], "uuid()"),
    ("SELECT setseed(0.5) FROM bids", ["non-deterministic function setseed()"], "setseed(0.5)"),
    ("SELECT nextval('s') FROM bids", ["non-deterministic function nextval()"], "nextval('s')"),
    ("SELECT *, count(*) OVER () AS n FROM bids", ["window function count()", "without PARTITION BY"], "count(*) OVER ()"),
    (
        "SELECT sum(amount) OVER (PARTITION BY auction) a, sum(amount) OVER (PARTITION BY bidder) b FROM bids",
        ["PARTITION BY bidder", "share one PARTITION BY", "the first is auction"],
        "sum(amount) OVER (PARTITION BY bidder)",
    ),
    ("SELECT * FROM bids ORDER BY amount", ["ORDER BY", "a view is a set; order when you query it"], "amount"),
    ("SELECT * FROM bids LIMIT 10", ["LIMIT", "a view is a set"], "10"),
    ("SELECT * FROM bids OFFSET 10", ["OFFSET", "a view is a set"], "10"),
    ("SELECT * FROM bids b JOIN auctions a ON b.auction < a.id", ["non-equi join condition (b.auction < a.id)"], "b.auction < a.id"),
    ("SELECT * FROM bids b JOIN auctions a ON b.auction = a.id OR b.id = a.id", ["non-equi join condition ((b.auction = a.id) OR (b.id = a.id))"], "b.auction = a.id OR"),
    ("SELECT * FROM bids b JOIN auctions a ON b.auction = b.id", ["join condition (b.auction = b.id)", "one side of the join"], "b.auction = b.id"),
    ("SELECT * FROM bids b JOIN auctions a ON b.auction = 3", ["join condition (b.auction = 3)"], "b.auction = 3"),
    ("SELECT * FROM bids CROSS JOIN users", ["CROSS JOIN"], "CROSS JOIN"),
    ("SELECT * FROM bids, users WHERE bids.bidder = users.name", ["comma join (an implicit CROSS JOIN)"], None),
    ("SELECT * FROM bids b JOIN LATERAL (SELECT b.amount * 2 AS d) s ON true", ["LATERAL subquery", "'b'"], "(SELECT"),
    ("SELECT * FROM bids b ASOF JOIN auctions a ON b.auction = a.id AND b.id >= a.id", ["ASOF JOIN"], "ASOF JOIN"),
    ("SELECT * FROM bids POSITIONAL JOIN users", ["POSITIONAL JOIN"], "POSITIONAL JOIN"),
    ("SELECT * FROM bids NATURAL JOIN users", ["NATURAL JOIN"], "NATURAL JOIN"),
    ("SELECT * FROM bids WHERE auction IN (SELECT id FROM auctions)", ["subquery expression IN (SELECT ...)"], None),
    ("SELECT * FROM bids WHERE EXISTS (SELECT 1 FROM auctions a WHERE a.id = bids.auction)", ["EXISTS (SELECT ...)"], "EXISTS"),
    ("SELECT *, (SELECT max(id) FROM users) AS m FROM bids", ["scalar subquery"], "(SELECT max"),
    (
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
        ["recursive CTE 'r'"],
        "1 AS n",
    ),
    ("SELECT * FROM read_csv('x.csv')", ["table function read_csv()"], "read_csv"),
    ("SELECT * FROM bids JOIN range(3) r(i) ON bids.id = r.i", ["table function range()"], "range(3)"),
    ("SELECT id FROM bids UNION SELECT id FROM users", ["UNION", "only UNION ALL"], "id FROM users"),
    ("SELECT id FROM bids INTERSECT SELECT id FROM users", ["INTERSECT"], "id FROM users"),
    ("SELECT id FROM bids EXCEPT SELECT id FROM users", ["EXCEPT"], "id FROM users"),
    ("SELECT * FROM bids USING SAMPLE 10%", ["USING SAMPLE"], "bids"),
]


@pytest.mark.parametrize(("query", "words", "at"), REFUSED, ids=[r[1][0] for r in REFUSED])
def test_plan_view_refuses(query, words, at):
    with pytest.raises(InvalidInput) as ei:
        plan_view(query, SCHEMAS)
    msg = str(ei.value)
    for w in words:
        assert w in msg, msg
    m = re.search(r"at character (\d+)", msg)
    assert m is not None, msg
    if at is not None:
        assert query[int(m.group(1)) :].startswith(at), (msg, query[int(m.group(1)) :])


def test_refusal_positions_point_at_the_construct():
    # The reported offset is DuckDB's query_location: the SQL text there is the construct.
    q = "SELECT auction, now() AS t FROM bids"
    with pytest.raises(InvalidInput, match="at character 16 "):
        plan_view(q, SCHEMAS)
    assert q[16:].startswith("now()")


# -- plan_view: accepted queries ----------------------------------------------------

ACCEPTED = [
    # (query, inputs, linear, keys, constructs)
    ("SELECT * FROM bids", ("bids",), True, None, set()),
    ("SELECT id, amount * 2 AS double FROM bids WHERE amount > 10", ("bids",), True, None, set()),
    ("SELECT * FROM Mixed WHERE K > 1", ("mixed",), True, None, set()),
    (
        "SELECT b.*, v.label FROM bids b JOIN (VALUES (1, 'one'), (2, 'two')) v(n, label) ON b.auction = v.n",
        ("bids",), True, None, {"inner_join", "values"},
    ),
    (
        "SELECT auction, count(*) AS n, sum(amount) AS s, avg(amount) AS a, min(amount) AS lo, max(amount) AS hi, "
        "count(DISTINCT bidder) AS nb, arg_max(bidder, amount) AS top, string_agg(bidder, ',' ORDER BY bidder) AS who "
        "FROM bids GROUP BY auction HAVING count(*) > 1",
        ("bids",), False, {"bids": ("auction",)}, {"group_by", "aggregate", "having"},
    ),
    ("SELECT auction, bidder, max(amount) FROM bids GROUP BY ALL", ("bids",), False, {"bids": ("auction", "bidder")}, {"group_by", "aggregate"}),  # noqa: E501
    ("SELECT auction AS a, amount // 100 AS band, count(*) FROM bids GROUP BY 1, 2", ("bids",), False, {"bids": ("auction", "(amount // 100)")}, {"group_by", "aggregate"}),  # noqa: E501
    ("SELECT upper(bidder) AS who, sum(amount) FROM bids GROUP BY who", ("bids",), False, {"bids": ("upper(bidder)",)}, {"group_by", "aggregate"}),  # noqa: E501
    ("SELECT count(*) AS n, sum(amount) AS total FROM bids", ("bids",), False, {"bids": ()}, {"aggregate"}),
    ("SELECT DISTINCT bidder FROM bids", ("bids",), False, {"bids": ("bidder",)}, {"distinct"}),
    ("SELECT DISTINCT * FROM bids", ("bids",), False, {"bids": ("id", "auction", "bidder", "amount")}, {"distinct"}),
    ("SELECT DISTINCT ON (auction) * FROM bids", ("bids",), False, {"bids": ("auction",)}, {"distinct"}),
    (
        "SELECT * FROM bids QUALIFY row_number() OVER (PARTITION BY auction ORDER BY amount DESC) <= 3",
        ("bids",), False, {"bids": ("auction",)}, {"window", "qualify"},
    ),
    (
        "SELECT auction, bidder, sum(amount) AS s, rank() OVER (PARTITION BY auction ORDER BY sum(amount) DESC) AS r "
        "FROM bids GROUP BY auction, bidder",
        ("bids",), False, {"bids": ("auction",)}, {"window", "group_by", "aggregate"},
    ),
    (
        "SELECT auction, sum(amount) AS s, rank() OVER (PARTITION BY max(bidder) ORDER BY sum(amount)) AS r "
        "FROM bids GROUP BY auction",
        ("bids",), False, None, {"window", "group_by", "aggregate"},
    ),
    ("SELECT DISTINCT count(*) FROM bids GROUP BY auction", ("bids",), False, None, {"distinct", "group_by", "aggregate"}),  # noqa: E501
    ("SELECT auction, count(*) FROM bids GROUP BY ROLLUP (auction)", ("bids",), False, None, {"group_by", "grouping_sets", "aggregate"}),  # noqa: E501
    (
        "SELECT * FROM bids b JOIN auctions a ON b.auction = a.id",
        ("bids", "auctions"), False, {"bids": ("auction",), "auctions": ("id",)}, {"inner_join"},
    ),
    (
        "SELECT * FROM auctions a LEFT JOIN bids b ON a.id = b.auction",
        ("auctions", "bids"), False, {"auctions": ("id",), "bids": ("auction",)}, {"left_join"},
    ),
    (
        "SELECT * FROM auctions a FULL OUTER JOIN bids b ON a.id = b.auction",
        ("auctions", "bids"), False, {"auctions": ("id",), "bids": ("auction",)}, {"full_join"},
    ),
    (
        "SELECT * FROM users u JOIN auctions a USING (id) LEFT JOIN bids b ON a.id = b.auction",
        ("users", "auctions", "bids"), False, {"users": ("id",), "auctions": ("id",), "bids": ("auction",)},
        {"inner_join", "left_join"},
    ),
    (
        "SELECT * FROM bids b JOIN auctions a ON b.auction = a.id FULL JOIN users u ON a.id = u.id",
        ("bids", "auctions", "users"), False, {"bids": ("auction",), "auctions": ("id",), "users": ("id",)},
        {"inner_join", "full_join"},
    ),
    (
        "SELECT b.auction + 0 AS k FROM bids b JOIN auctions a ON b.auction + 0 = a.id",
        ("bids", "auctions"), False, {"bids": ("(auction + 0)",), "auctions": ("id",)}, {"inner_join"},
    ),
    (
        "SELECT a.id, count(*) AS n, max(b.amount) AS top FROM auctions a JOIN bids b ON a.id = b.auction GROUP BY a.id",
        ("auctions", "bids"), False, {"auctions": ("id",), "bids": ("auction",)}, {"inner_join", "group_by", "aggregate"},
    ),
    (
        "SELECT b.auction, count(*) FROM auctions a JOIN bids b ON a.id = b.auction GROUP BY ALL",
        ("auctions", "bids"), False, {"auctions": ("id",), "bids": ("auction",)}, {"inner_join", "group_by", "aggregate"},
    ),
    (
        "SELECT a.seller, count(*) FROM auctions a JOIN bids b ON a.id = b.auction GROUP BY a.seller",
        ("auctions", "bids"), False, None, {"inner_join", "group_by", "aggregate"},
    ),
    (
        # the null-extended side's key is NULL for every unmatched auction: they all share one group
        "SELECT b.auction, count(*) FROM auctions a LEFT JOIN bids b ON a.id = b.auction GROUP BY b.auction",
        ("auctions", "bids"), False, None, {"left_join", "group_by", "aggregate"},
    ),
    (
        "SELECT count(*) FROM auctions a JOIN bids b ON a.id = b.auction",
        ("auctions", "bids"), False, {"auctions": (), "bids": ()}, {"inner_join", "aggregate"},
    ),
    ("SELECT * FROM bids x JOIN bids y ON x.auction = y.auction", ("bids",), False, None, {"inner_join"}),
    ("SELECT id FROM bids UNION ALL SELECT id FROM users", ("bids", "users"), True, None, {"union_all"}),
    (
        "SELECT id FROM bids UNION ALL SELECT id FROM users UNION ALL SELECT id FROM bids WHERE amount > 3",
        ("bids", "users"), True, None, {"union_all"},
    ),
    (
        "WITH big AS (SELECT * FROM bids WHERE amount > 100) SELECT auction, count(*) FROM big GROUP BY auction",
        ("bids",), False, None, {"cte", "group_by", "aggregate"},
    ),
    (
        "WITH a AS (SELECT * FROM users), b AS (SELECT * FROM a WHERE id > 1) SELECT * FROM b",
        ("users",), True, None, {"cte"},
    ),
    ("SELECT * FROM (SELECT id, amount FROM bids) s WHERE amount > 1", ("bids",), True, None, set()),
    ("SELECT * FROM other_view WHERE x > 1", ("other_view",), True, None, set()),
]


@pytest.mark.parametrize(("query", "inputs", "linear", "keys", "constructs"), ACCEPTED, ids=[a[0][:60] for a in ACCEPTED])
def test_plan_view_accepts(query, inputs, linear, keys, constructs):
    schemas = {k.lower(): v for k, v in SCHEMAS.items()}
    schemas["other_view"] = pa.schema([("x", pa.int64())])
    p = plan_view(query, schemas)
    assert isinstance(p, Plan)
    assert p.sql == query
    assert p.inputs == inputs
    assert p.linear is linear
    assert (dict(p.keys) if p.keys is not None else None) == keys
    assert p.constructs == frozenset(constructs)
    # every key expression runs over its own input alone
    con = duckdb.connect()
    for name, exprs in (p.keys or {}).items():
        con.register(name, schemas[name].empty_table())
        for e in exprs:
            con.execute(f"SELECT {e} FROM {name}").fetchall()
    # and the query itself is valid DuckDB over those collections
    for name in inputs:
        con.register(name, schemas[name].empty_table())
    con.execute(query).fetchall()


def test_group_by_keys_partition_the_output():
    # Recomputing the view from only the input rows of one key gives exactly the output rows of that key.
    con = duckdb.connect()
    rows = pa.table({"id": [1, 2, 3, 4, 5], "auction": [1, 1, 2, 2, 3], "bidder": list("abcab"), "amount": [5, 7, 1, 9, 4]})
    q = "SELECT auction, bidder, sum(amount) AS s, rank() OVER (PARTITION BY auction ORDER BY sum(amount) DESC) AS r FROM bids GROUP BY auction, bidder"  # noqa: E501
    (key,) = plan_view(q, SCHEMAS).keys["bids"]  # type: ignore[index]
    con.register("all_bids", rows)
    full = con.execute(q.replace("FROM bids", "FROM all_bids")).fetchall()
    for k in (1, 2, 3):
        part = con.execute(
            q.replace("FROM bids", f"FROM (SELECT * FROM all_bids WHERE {key} = {k})")
        ).fetchall()
        assert sorted(part) == sorted(r for r in full if r[0] == k)


# -- check_linear and the sql operator ------------------------------------------------

NONLINEAR = [
    ("SELECT auction_id, max(amount) AS top, _time, _diff FROM updates GROUP BY auction_id, _time, _diff", "an aggregate (max)", 19),  # noqa: E501
    ("SELECT *, count(*) OVER () AS n FROM updates", "a window function (count)", 10),
    ("SELECT k, _time, _diff FROM updates GROUP BY ALL", "GROUP BY ALL", None),
    ("SELECT k, _time, _diff FROM updates GROUP BY k, _time, _diff", "GROUP BY", 45),
    ("SELECT k, _time, _diff FROM updates GROUP BY k, _time, _diff HAVING k > 1", "GROUP BY", 45),
    ("SELECT * FROM updates QUALIFY k > 1", "QUALIFY", 30),
    ("SELECT DISTINCT * FROM updates", "DISTINCT", 16),
    ("SELECT * FROM updates LIMIT 5", "LIMIT", 28),
    ("SELECT * FROM updates OFFSET 5", "OFFSET", 29),
    ("SELECT * FROM updates ORDER BY k", "ORDER BY", 31),
    ("SELECT * FROM updates UNION SELECT * FROM updates", "UNION", 35),
    ("SELECT * FROM updates EXCEPT SELECT * FROM updates", "EXCEPT", 36),
    ("SELECT * FROM updates u JOIN other o ON u.k = o.k", "an INNER JOIN of u and o", 24),
    ("SELECT * FROM updates u LEFT JOIN updates v ON u.k = v.k", "a LEFT JOIN of u and v", 24),
    ("SELECT * FROM updates WHERE k IN (SELECT k FROM updates WHERE _diff > 0)", "subquery expression IN (SELECT ...)", 33),
    ("SELECT 1 AS k, 0 AS _time, 1 AS _diff", "a query that reads no table", 7),
    ("SELECT * FROM updates UNION ALL SELECT 1, 0, 1", "a UNION ALL branch that reads no table", 39),
    ("SELECT * FROM (VALUES (1)) v(k) LEFT JOIN updates u ON v.k = u.k", "a LEFT JOIN whose rows can come from the constant side alone", 32),
    ("SELECT * FROM updates u FULL JOIN (VALUES (1)) v(k) ON v.k = u.k", "a FULL JOIN whose rows can come from the constant side alone", 24),
    ("SELECT * FROM (VALUES (1)) v(k) SEMI JOIN updates u ON v.k = u.k", "a SEMI JOIN whose rows can come from the constant side alone", 32),
]


@pytest.mark.parametrize(("query", "what", "pos"), NONLINEAR, ids=[n[1] for n in NONLINEAR])
def test_check_linear_refuses(query, what, pos):
    with pytest.raises(InvalidInput) as ei:
        check_linear(query, "step 'flow.even'")
    msg = str(ei.value)
    assert msg.startswith(f"step 'flow.even': {what}"), msg
    assert "not linear" in msg
    assert "maintain it as a view: ctx.view(flow, name, sql) or `shardflow view NAME SQL`" in msg
    if pos is not None:
        assert f"{what} at character {pos} " in msg, msg


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM updates WHERE counter % 2 = 0",
        "SELECT _diff, _time, upper(k) AS k FROM updates WHERE length(k) > 1",
        "SELECT id, CASE WHEN amount > 5 THEN 'hi' ELSE 'lo' END AS band, _time, _diff FROM updates",
        "SELECT u.*, v.name FROM updates u JOIN (VALUES (1, 'one')) v(k, name) ON u.k = v.k",
        "SELECT * FROM updates WHERE k IN (1, 2) AND k IN (SELECT * FROM (VALUES (1)))",
        "SELECT * FROM updates WHERE k > 0 UNION ALL SELECT * FROM updates WHERE k < 0",
        "WITH pos AS (SELECT * FROM updates WHERE k > 0) SELECT * FROM pos",
        "SELECT list_sum([k, 1]) AS s, _time, _diff FROM updates",
        "SELECT * FROM updates u LEFT JOIN (VALUES (1, 'one')) v(k, name) ON u.k = v.k",
        "SELECT * FROM updates u ANTI JOIN (VALUES (1)) v(k) ON u.k = v.k",
    ],
)
def test_check_linear_accepts(query):
    check_linear(query, "step 'x'")


def test_check_linear_names_parse_errors():
    with pytest.raises(InvalidInput, match=r"step 'f\.q': cannot parse SQL: syntax error"):
        check_linear("SELECT FROM WHERE", "step 'f.q'")


@pytest.mark.parametrize(
    ("query", "what"),
    [
        ("SELECT auction_id, max(amount) AS top, _time, _diff FROM updates GROUP BY auction_id, _time, _diff", "aggregate (max)"),  # noqa: E501
        ("SELECT *, count(*) OVER () AS n FROM updates", "window function (count)"),
        ("SELECT DISTINCT auction_id, _time, _diff FROM updates", "DISTINCT"),
        ("SELECT * FROM updates LIMIT 10", "LIMIT"),
        ("SELECT u.*, a.seller FROM updates u JOIN auctions a ON u.auction_id = a.id", "INNER JOIN of u and a"),
    ],
)
@pytest.mark.parametrize("with_schema", [False, True])
def test_sql_operator_refuses_nonlinear_at_build_time(query, what, with_schema):
    schema = pa.schema([("auction_id", pa.int64()), ("amount", pa.int64())]) if with_schema else None
    flow = Dataflow("flow")
    s = op.input("in", flow, TestingSource([]))
    with pytest.raises(InvalidInput) as ei:
        sql("even", s, query, schema=schema)
    msg = str(ei.value)
    assert msg.startswith("step 'flow.even': ") and what in msg and "at character" in msg, msg
    assert "shardflow view NAME SQL" in msg


def test_sql_operator_still_builds_linear_queries():
    flow = Dataflow("flow")
    s = op.input("in", flow, TestingSource([]))
    sql("even", s, "SELECT * FROM updates WHERE counter % 2 = 0", schema=pa.schema([("counter", pa.int64())]))


@pytest.mark.parametrize("module", [flows.sqlplan, flows.operators])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0

"""A view on several workers: split by key hash into one partition per worker, still exactly the SQL.

In-process (bytewax `cluster_main`, two worker threads): group-by, join, top-k and a
global aggregate against DuckDB over the inputs, with the split observed in
`flows.views.partition_stats`, and a resume whose snapshots each partition filters.
End to end (`shardflow view -w 2` / `-p 2`): the same four kinds of view over the
demo's auctions and bids, a rerun with another worker count, and SIGKILL in
continuous mode with two workers followed by a restart with one.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, cluster_main
from test_cli_view import COUNTER, ENV, ROOT, SHARDFLOW, kill_view_while_counter_runs

from flows import views
from flows.operators import worker_keys, worker_of
from flows.sqlplan import plan_view
from flows.views import partition_count, view
from storage import Frontier, Progress, UpdateBatch

A = pa.schema([("k", pa.int64()), ("x", pa.int64())])
B = pa.schema([("k", pa.int64()), ("y", pa.int64())])

GROUP = "SELECT k, count(*) AS n, max(x) AS mx FROM a GROUP BY k"
JOIN = "SELECT a.k, a.x, b.y FROM a JOIN b ON a.k = b.k"
TOPK = "SELECT * FROM a QUALIFY row_number() OVER (PARTITION BY k ORDER BY x DESC) <= 2"
GLOBAL = "SELECT count(*) AS n, sum(x) AS s FROM a"


def _full(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("_time", pa.int64())).append(pa.field("_diff", pa.int64()))


def _history(schema: pa.Schema, seed: int, times: int = 6, per: int = 40) -> list[pa.Table]:
    """Per time 1..times: inserts of fresh rows (unique second column) and retractions of live ones."""
    rnd = random.Random(seed)
    live: list[tuple[int, int]] = []
    out = []
    serial = seed * 100000
    for t in range(1, times + 1):
        rows = []
        for _ in range(per):
            serial += 1
            r = (rnd.randrange(12), serial)
            live.append(r)
            rows.append((*r, t, 1))
        for r in rnd.sample(live, len(live) // 5):
            live.remove(r)
            rows.append((*r, t, -1))
        cols = list(zip(*rows, strict=True))
        out.append(pa.table([pa.array(list(c), f.type) for c, f in zip(cols, _full(schema), strict=True)], schema=_full(schema)))
    return out


def _items(tables: list[pa.Table], name: str) -> list[Any]:
    items: list[Any] = []
    for t, table in enumerate(tables, start=1):
        items += [UpdateBatch(table, Frontier(t), Frontier(t + 1), offsets={f"{name}/0": t + 1}), Progress(Frontier(t + 1))]
    return items


def _expected(sql: str, inputs: dict[str, list[pa.Table]]) -> list[tuple]:
    con = duckdb.connect()
    for n, tables in inputs.items():
        con.register(f"{n}_u", pa.concat_tables(tables))
        cols = ", ".join(f.name for f in (A if n == "a" else B))
        con.execute(f"CREATE TABLE {n} AS SELECT {cols} FROM (SELECT {cols}, sum(_diff)::BIGINT AS d FROM {n}_u GROUP BY ALL) s, range(s.d)")
    return sorted(con.sql(sql).fetchall(), key=repr)


def _accumulated(out: list[Any]) -> list[tuple]:
    tables = [x.table for x in out if isinstance(x, UpdateBatch) and x.table.num_rows]
    con = duckdb.connect()
    con.register("u", pa.concat_tables(tables))
    cols = [c for c in tables[0].schema.names if c not in ("_time", "_diff")]
    sel = ", ".join(f'"{c}"' for c in cols)
    q = f"SELECT {sel} FROM (SELECT {sel}, sum(_diff)::BIGINT AS d FROM u GROUP BY ALL HAVING sum(_diff) <> 0) s, range(s.d)"
    assert not con.sql(f"SELECT * FROM (SELECT {sel}, sum(_diff) AS d FROM u GROUP BY ALL) WHERE d < 0").fetchall()
    return sorted(con.sql(q).fetchall(), key=repr)


def _run(step: str, sql: str, inputs: dict[str, list[pa.Table]], *, workers: int = 2, **kw: Any) -> list[Any]:
    flow = Dataflow(f"f_{step}")
    streams = {n: op.input(f"in_{n}", flow, TestingSource(_items(ts, n))) for n, ts in inputs.items()}
    schemas = {n: (A if n == "a" else B) for n in inputs}
    out: list[Any] = []
    op.output("out", view(step, streams, sql, schemas=schemas, partitions=workers, **kw), TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return out


def test_worker_keys_route_one_partition_to_each_worker() -> None:
    for n in (2, 3, 4, 8):
        assert [worker_of(k, n) for k in worker_keys(n)] == list(range(n))


@pytest.mark.parametrize(("step", "sql", "names"), [("grp", GROUP, "a"), ("join", JOIN, "ab"), ("topk", TOPK, "a")])
def test_two_workers_split_the_view_and_equal_duckdb(step: str, sql: str, names: str) -> None:
    inputs = {n: _history(A if n == "a" else B, seed=i + 1) for i, n in enumerate(names)}
    for k in list(views.partition_stats):
        views.partition_stats.pop(k)
    out = _run(step, sql, inputs)
    assert _accumulated(out) == _expected(sql, inputs)
    # Two partitions, on two different workers, each given part of the rows (all of them together).
    stats = {i: s for (sid, i), s in views.partition_stats.items() if sid == step}
    total = sum(t.num_rows for ts in inputs.values() for t in ts)
    assert sorted(stats) == [0, 1]
    assert stats[0]["thread"] != stats[1]["thread"]
    assert all(0 < s["rows"] < total for s in stats.values()) and sum(s["rows"] for s in stats.values()) == total
    # Downstream the frontier is the minimum over the partitions: each names itself.
    parts = {x.partition for x in out if isinstance(x, Progress)}
    assert parts == {f"{step}/0", f"{step}/1"}


def test_a_global_aggregate_stays_on_one_partition_and_has_one_row() -> None:
    s = {"a": A}
    assert partition_count(plan_view(GLOBAL, s), 4) == 1
    assert partition_count(plan_view("SELECT k, x FROM a WHERE x > 1", s), 4) == 1  # linear: one partition
    assert partition_count(plan_view(GROUP, s), 4) == 4
    inputs = {"a": _history(A, seed=5)}
    out = _run("glob", GLOBAL, inputs)
    assert _accumulated(out) == _expected(GLOBAL, inputs)
    assert len(_accumulated(out)) == 1
    # Over empty input too: one row (count 0), not one per worker.
    empty = {"a": [_full(A).empty_table()]}
    out = _run("glob0", GLOBAL, empty)
    assert _accumulated(out) == [(0, None)]


def test_resume_loads_each_partition_its_own_rows() -> None:
    """A resumed view: each partition's engine loads only its key range of the snapshot."""
    hist = _history(A, seed=9, times=8)
    before = hist[:4]
    snap_u = pa.concat_tables(before)
    con = duckdb.connect()
    con.register("u", snap_u)
    snapshot = con.sql("SELECT k, x, sum(_diff)::BIGINT AS _diff FROM u GROUP BY ALL HAVING sum(_diff) <> 0").to_arrow_table()

    def preload(engine: Any) -> None:
        engine.load("a", snapshot, 4)

    for k in list(views.partition_stats):
        views.partition_stats.pop(k)
    flow = Dataflow("resume")
    items = _items(hist, "a")[8:]  # times 5.. (the source resumes after the committed offsets)
    s = op.input("in_a", flow, TestingSource(items))
    out: list[Any] = []
    op.output("out", view("res", {"a": s}, GROUP, schemas={"a": A}, preload=preload, start=5, partitions=2), TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    stats = {i: st for (sid, i), st in views.partition_stats.items() if sid == "res"}
    assert all(0 < st["loaded"] < snapshot.num_rows for st in stats.values())
    assert sum(st["loaded"] for st in stats.values()) == snapshot.num_rows
    # The corrections from time 5 on, added to the view at 4, give the view at the end.
    at4 = _expected(GROUP, {"a": before})
    con.execute("CREATE TABLE acc (k BIGINT, n BIGINT, mx BIGINT, _time BIGINT, _diff BIGINT)")
    con.executemany("INSERT INTO acc VALUES (?, ?, ?, 4, 1)", at4)
    for x in out:
        if isinstance(x, UpdateBatch) and x.table.num_rows:
            con.register("c", x.table)
            con.execute("INSERT INTO acc SELECT * FROM c")
            con.unregister("c")
    got = con.sql("SELECT k, n, mx FROM acc GROUP BY ALL HAVING sum(_diff) <> 0 ORDER BY ALL").fetchall()
    assert sorted(got, key=repr) == _expected(GROUP, {"a": hist})
    assert con.sql("SELECT count(*) FROM (SELECT k, n, mx FROM acc GROUP BY ALL HAVING sum(_diff) NOT IN (0, 1))").fetchall() == [(0,)]


# ------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------

DEMO = str(ROOT / "flows" / "demo.py")

VIEWS = {
    "grp": "SELECT auction_id, count(*) AS n, max(amount) AS top FROM bids GROUP BY auction_id",
    "jn": "SELECT a.id, a.item, b.id AS bid, b.amount FROM auctions a JOIN bids b ON b.auction_id = a.id",
    "glob": "SELECT count(*) AS n, sum(amount) AS total FROM bids",
    "topk": "SELECT * FROM bids QUALIFY row_number() OVER (PARTITION BY auction_id ORDER BY amount DESC, id) <= 2",
}
BY_TENS = "SELECT counter % 10 AS d, count(*) AS n, max(counter) AS top FROM counter GROUP BY ALL"


def sf(*args: str, ok: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*SHARDFLOW, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=180)
    if ok:
        assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-4000:])
    return p


def same(data: str, name: str, sql: str) -> int:
    """The view equals its SQL over its inputs (one time for all, as `shardflow query` picks it); its row count."""
    q = (f"SELECT (SELECT count(*) FROM (SELECT * FROM {name} EXCEPT ALL ({sql}))) + "
         f"(SELECT count(*) FROM (({sql}) EXCEPT ALL SELECT * FROM {name})), (SELECT count(*) FROM {name})")
    diff, n = sf("query", "--data", data, "--format", "csv", q).stdout.strip().splitlines()[-1].split(",")
    assert diff == "0", (name, diff)
    return int(n)


def demo(data: str, ticks: int) -> None:
    sf("run", DEMO, "--data", data, "--no-progress", env={**ENV, "SHARDFLOW_DEMO_TICKS": str(ticks)})


@pytest.mark.slow  # ~50 s: four views, -w 2 and -p 2, then reruns with -w 1 and -w 3 (make test-slow)
def test_view_with_two_workers_and_two_processes_equals_duckdb(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    demo(data, 20)
    for flag in ("-w", "-p"):
        for name, sql in VIEWS.items():
            sf("view", f"{name}{flag[1]}", sql, "--data", data, flag, "2", "--no-progress")
            n = same(data, f"{name}{flag[1]}", sql)
            assert n == 1 if name == "glob" else n > 1
    # The inputs move on; rerun on one worker, and on three: the partitioning lives in memory only.
    demo(data, 40)
    for name, sql in VIEWS.items():
        sf("view", f"{name}w", sql, "--data", data, "-w", "1", "--no-progress")
        same(data, f"{name}w", sql)
        sf("view", f"{name}p", sql, "--data", data, "-w", "3", "--no-progress")
        same(data, f"{name}p", sql)


def test_sigkill_with_two_workers_then_restart_with_one(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    sf("run", COUNTER, "--data", data, "--no-progress")
    rnd = random.Random(11)
    kill_view_while_counter_runs(data, "by_tens", BY_TENS, ["-w", "2"], rnd, kills=2, lo=3.0, hi=5.0)
    sf("view", "by_tens", BY_TENS, "--data", data, "-w", "1", "--no-progress")
    assert same(data, "by_tens", BY_TENS) == 10

"""Nexmark queries as incremental views over the Nexmark generator, checked against DuckDB.

    .venv/bin/python bench/nexmark.py                       # 1,000,000 events, all queries
    .venv/bin/python bench/nexmark.py --quick --only q0,q3  # 100,000 events, two queries
    .venv/bin/python bench/nexmark.py --one-time-per-step   # each step's ticks at one time

Generates `--events` events with `connectors.loadgen.Nexmark` (`tick(i)` for every
tick, `--events-per-tick` per tick), then, per query, feeds the updates to a
`flows.views.ViewEngine` (the engine `shardflow view` runs), `--ticks-per-step`
ticks per `engine.step`, and compacts after each step as the view operator does.
The engine evaluates each distinct `_time` of a step separately (one Nexmark
tick = one time); `--one-time-per-step` stamps all updates of a step with the
step's last time, so a step is one evaluation (a coarser-grained view, same
final contents).

The check: the view's final contents (its corrections summed per row) equal
DuckDB evaluating the same SQL over the whole generated tables (rows compared as
multisets; float columns rounded to 6 significant digits).

Timing: `cpu` is process CPU seconds spent in `engine.step`/`compact` (DuckDB runs
with `SET threads = 1`, so that is one core); events/s per core = events fed /
cpu. Generation and the check are not timed. Nothing is asserted on timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from connectors.loadgen import Nexmark  # noqa: E402
from flows.sqlplan import plan_view  # noqa: E402
from flows.views import ViewEngine  # noqa: E402

W = 10_000  # window bucket, in date_time milliseconds (10 ticks at the default tick_ms)


@dataclass(frozen=True)
class Query:
    name: str
    title: str
    sql: str  # the view; for a chained query, the first view
    then: str | None = None  # a second view over the first (input name `winning`)
    note: str = ""


QUERIES = [
    Query("q0", "pass-through", "SELECT * FROM bids"),
    Query(
        "q1",
        "currency conversion",
        "SELECT auction, bidder, price * 0.908 AS price, date_time FROM bids",
    ),
    Query(
        "q2",
        "selection",
        "SELECT auction, price FROM bids WHERE auction % 123 = 0",
        note="modulus 123 kept: auction ids run from 1000 up, so it selects ~1/123 of the auctions",
    ),
    Query(
        "q3",
        "local item suggestion",
        "SELECT p.name, p.city, p.state, a.id FROM auctions a JOIN persons p ON a.seller = p.id "
        "WHERE a.category = 10 AND p.state IN ('OR', 'ID', 'CA')",
    ),
    Query(
        "q4",
        "average price per category",
        "SELECT a.id, a.category, max(b.price) AS final FROM auctions a JOIN bids b ON a.id = b.auction "
        "WHERE b.date_time BETWEEN a.date_time AND a.expires GROUP BY a.id, a.category",
        then="SELECT category, avg(final) AS avg_price FROM winning GROUP BY category",
        note="two chained views (winning price per auction, then avg per category); "
        "the expiry window is a WHERE filter over the equi-join",
    ),
    Query(
        "q5",
        "hot items",
        f"SELECT auction, date_time // {W} AS window, count(*) AS num FROM bids "
        f"GROUP BY auction, date_time // {W} "
        f"QUALIFY rank() OVER (PARTITION BY date_time // {W} ORDER BY count(*) DESC) = 1",
        note="tumbling windows instead of Nexmark's sliding (HOP) windows; "
        "the max-count join written as QUALIFY rank() = 1 per window",
    ),
    Query(
        "q7",
        "highest bid",
        f"SELECT auction, bidder, price, date_time, date_time // {W} AS window FROM bids "
        f"QUALIFY rank() OVER (PARTITION BY date_time // {W} ORDER BY price DESC) = 1",
        note="tumbling windows; the join with max(price) per window written as QUALIFY rank() = 1",
    ),
    Query(
        "q8",
        "monitor new users",
        f"SELECT DISTINCT p.id, p.name, p.date_time // {W} AS window FROM persons p "
        f"JOIN auctions a ON p.id = a.seller AND p.date_time // {W} = a.date_time // {W}",
        note="tumbling windows, equi-join on (id, window bucket)",
    ),
    Query(
        "q9",
        "winning bids",
        "SELECT a.id, a.item_name, a.initial_bid, a.reserve, a.date_time, a.expires, a.seller, "
        "a.category, b.bidder, b.price, b.date_time AS bid_time FROM auctions a "
        "JOIN bids b ON a.id = b.auction WHERE b.date_time BETWEEN a.date_time AND a.expires "
        "QUALIFY row_number() OVER (PARTITION BY a.id ORDER BY b.price DESC, b.date_time, b.bidder) = 1",
        note="top-1 per auction with QUALIFY row_number(); ties broken by bid time then bidder",
    ),
]


def generate(events: int, per_tick: int, seed: int) -> tuple[Nexmark, list[dict[str, pa.RecordBatch]]]:
    gen = Nexmark(seed, events_per_tick=per_tick)
    ticks = -(-events // per_tick)
    return gen, [gen.tick(i) for i in range(ticks)]


def steps(
    gen: Nexmark, ticks: list[dict[str, pa.RecordBatch]], per_step: int, inputs: tuple[str, ...], one_time: bool
) -> list[dict[str, pa.Table]]:
    schemas = gen.update_schemas()
    out = []
    for lo in range(0, len(ticks), per_step):
        chunk = ticks[lo : lo + per_step]
        step = {}
        for n in inputs:
            batches = [t[n] for t in chunk if n in t]
            tbl = pa.Table.from_batches(batches, schema=schemas[n])
            if one_time and tbl.num_rows:
                t_last = gen.time_of(lo + len(chunk) - 1)
                tbl = tbl.set_column(
                    tbl.schema.get_field_index("_time"), "_time", pa.nulls(tbl.num_rows, pa.int64()).fill_null(t_last)
                )
            step[n] = tbl
        out.append(step)
    return out


def consolidate(con: duckdb.DuckDBPyConnection, parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """Sum the corrections per row: the view's contents (rows repeated by count)."""
    t = pa.concat_tables(parts) if parts else schema.append(pa.field("_time", pa.int64())).append(pa.field("_diff", pa.int64())).empty_table()
    con.register("__corr", t.drop_columns(["_time"]))
    cols = ", ".join(f'"{c}"' for c in schema.names)
    try:
        return con.sql(
            f"SELECT {cols} FROM (SELECT {cols}, sum(_diff)::BIGINT AS n FROM __corr GROUP BY ALL) s, range(s.n)"
        ).to_arrow_table()
    finally:
        con.unregister("__corr")


def _norm(schema: pa.Schema) -> str:
    out = []
    for f in schema:
        c = f'"{f.name}"'
        if pa.types.is_floating(f.type):
            # 6 significant digits: sums in another order differ in the last bits
            c = f"CASE WHEN {c} = 0 THEN 0 ELSE round({c}, 5 - floor(log10(abs({c})))::INT) END AS {c}"
        out.append(c)
    return ", ".join(out)


def check(con: duckdb.DuckDBPyConnection, got: pa.Table, want: pa.Table) -> tuple[bool, str]:
    if got.schema.names != want.schema.names:
        return False, f"columns {got.schema.names} != {want.schema.names}"
    con.register("__got", got)
    con.register("__want", want)
    try:
        sel = _norm(want.schema)
        extra = con.execute(f"SELECT count(*) FROM (SELECT {sel} FROM __got EXCEPT ALL SELECT {sel} FROM __want)").fetchall()[0][0]
        missing = con.execute(f"SELECT count(*) FROM (SELECT {sel} FROM __want EXCEPT ALL SELECT {sel} FROM __got)").fetchall()[0][0]
    finally:
        con.unregister("__got")
        con.unregister("__want")
    ok = extra == 0 and missing == 0 and got.num_rows == want.num_rows
    return ok, f"{want.num_rows:,} rows" + ("" if ok else f" (extra {extra}, missing {missing}, got {got.num_rows})")


def run_view(
    sql: str, schemas: dict[str, pa.Schema], feed: list[dict[str, pa.Table]], threads: int
) -> tuple[ViewEngine, list[pa.Table], float, float]:
    plan = plan_view(sql, schemas)
    engine = ViewEngine(plan, {n: schemas[n] for n in plan.inputs})
    engine.con.execute(f"SET threads = {threads}")
    outs: list[pa.Table] = []
    cpu = wall = 0.0
    for step in feed:
        c0, w0 = time.process_time(), time.perf_counter()
        out = engine.step({n: step[n] for n in plan.inputs if n in step})
        tmax = max((pc.max(t.column("_time")).as_py() for t in step.values() if t.num_rows), default=None)
        if tmax is not None and tmax > 0:
            engine.compact(tmax)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        if out.num_rows:
            outs.append(out)
    return engine, outs, cpu, wall


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100,000 events")
    ap.add_argument("--events-per-tick", type=int, default=1000)
    ap.add_argument("--ticks-per-step", type=int, default=10)
    ap.add_argument("--one-time-per-step", action="store_true", help="stamp a step's updates with one time")
    ap.add_argument("--threads", type=int, default=1, help="DuckDB threads per engine (default 1: one core)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated query names (q0,q3,...)")
    args = ap.parse_args(argv)
    events = 100_000 if args.quick else args.events
    only = set(args.only.split(",")) if args.only else None
    print(machine())
    t0 = time.perf_counter()
    gen, ticks = generate(events, args.events_per_tick, args.seed)
    full = {n: pa.Table.from_batches([t[n] for t in ticks if n in t], schema=s) for n, s in gen.update_schemas().items()}
    print(
        f"generated {events:,} events in {len(ticks):,} ticks ({time.perf_counter() - t0:.1f} s): "
        + ", ".join(f"{n} {t.num_rows:,}" for n, t in full.items())
    )
    print(
        f"{args.ticks_per_step} ticks per step, {'one time' if args.one_time_per_step else 'one time per tick'} "
        f"per step, DuckDB threads {args.threads}"
    )
    schemas = gen.schemas()
    ref = duckdb.connect()
    ref.execute(f"SET threads = {args.threads}")
    for n, t in full.items():
        ref.register(n, t.drop_columns(["_time", "_diff"]))
    results: dict[str, dict[str, object]] = {}
    print(f"{'query':4s} {'title':28s} {'events/s/core':>14s} {'cpu s':>7s} {'wall s':>7s}  check")
    for q in QUERIES:
        if only is not None and q.name not in only:
            continue
        feed = steps(gen, ticks, args.ticks_per_step, tuple(full), args.one_time_per_step)
        engine, outs, cpu, wall = run_view(q.sql, schemas, feed, args.threads)
        got = consolidate(ref, outs, engine.schema)
        want_sql = q.sql
        if q.then is not None:
            # the second view reads the first's corrections, step by step
            inner_feed = []
            it = iter(outs)
            # corrections come per step: regroup by the steps' times
            by_time = pa.concat_tables(outs) if outs else engine.empty()
            step_times = [
                max(pc.max(t.column("_time")).as_py() for t in s.values() if t.num_rows) for s in feed
            ]
            lo = None
            for hi in step_times:
                cond = pc.less_equal(by_time.column("_time"), pa.scalar(hi, pa.int64()))
                if lo is not None:
                    cond = pc.and_(cond, pc.greater(by_time.column("_time"), pa.scalar(lo, pa.int64())))
                inner_feed.append({"winning": by_time.filter(cond)})
                lo = hi
            del it
            engine2, outs, cpu2, wall2 = run_view(q.then, {"winning": engine.schema}, inner_feed, args.threads)
            cpu, wall = cpu + cpu2, wall + wall2
            got = consolidate(ref, outs, engine2.schema)
            engine2.close()
            want_sql = q.then.replace("FROM winning", f"FROM ({q.sql}) AS winning")
        engine.close()
        want = ref.sql(want_sql).to_arrow_table()
        ok, detail = check(ref, got, want)
        rate = events / cpu if cpu > 0 else float("inf")
        results[q.name] = {"ok": ok, "rate": rate, "cpu": cpu, "wall": wall, "rows": want.num_rows}
        print(f"{q.name:4s} {q.title:28s} {rate:14,.0f} {cpu:7.2f} {wall:7.2f}  {'OK' if ok else 'FAIL'} ({detail})", flush=True)
    return results


if __name__ == "__main__":
    res = main()
    raise SystemExit(0 if all(r["ok"] for r in res.values()) else 1)

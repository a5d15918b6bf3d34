"""Incremental views: what a tick of change costs, against DuckDB recomputing the view.

    .venv/bin/python bench/views.py --rows 10000000 --ticks 5     # the issue's sizes
    .venv/bin/python bench/views.py --rows 1000000 --ticks 5      # quick

Setup: an input of `--rows` rows `(k, v)` with `--rows / 100` groups, loaded
into a `ViewEngine` (the operator `shardflow view` runs) at time 0. Each tick is
1% of the input as updates: half retractions of existing rows, half new rows.

For each view below and each tick, alternated in the same run:
- **incremental**: `ViewEngine.step(tick)`, the view's corrections for that tick;
- **recompute**: DuckDB evaluating the same SQL over the input's snapshot after
  the tick (an Arrow table in memory: the cheapest full recompute there is).

It prints, per view, the median ratio incremental / recompute and its spread
(min-max over the ticks). The target is <= 0.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import duckdb
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flows.sqlplan import plan_view  # noqa: E402
from flows.views import ViewEngine  # noqa: E402

VIEWS = {
    "group-by sum/count": "SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k",
    "group-by max": "SELECT k, max(v) AS m FROM t GROUP BY k",
    "2-way join": "SELECT t.k, t.v, d.w FROM t JOIN d ON t.k = d.k",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ticks", type=int, default=5)
    ap.add_argument("--only", default=None, help="run only the views whose name contains this")
    args = ap.parse_args()
    n, groups = args.rows, max(1, args.rows // 100)
    con = duckdb.connect()
    base = con.sql(
        f"SELECT (hash(i) % {groups})::BIGINT AS k, (hash(i * 7) % 1000)::BIGINT AS v FROM range({n}) r(i)"
    ).to_arrow_table()
    dim = con.sql(f"SELECT i::BIGINT AS k, (i % 97)::BIGINT AS w FROM range({groups}) r(i)").to_arrow_table()
    schemas = {"t": base.schema, "d": dim.schema}
    print(f"input {n:,} rows, {groups:,} groups; {args.ticks} ticks of {n // 100:,} updates (half retractions)")
    for name, sql in VIEWS.items():
        if args.only and args.only not in name:
            continue
        plan = plan_view(sql, schemas)
        engine = ViewEngine(plan, {i: schemas[i] for i in plan.inputs})
        t0 = time.perf_counter()
        engine.load("t", base.append_column("_diff", pa.array([1] * n, pa.int64())), 0)
        if "d" in plan.inputs:
            engine.load("d", dim.append_column("_diff", pa.array([1] * groups, pa.int64())), 0)
        load_s = time.perf_counter() - t0
        snap = base
        ratios, incs, fulls = [], [], []
        for tick in range(1, args.ticks + 1):
            m = n // 200
            con.register("snap", snap)
            gone = con.sql(f"SELECT * FROM snap USING SAMPLE {m} ROWS (reservoir, {tick})").to_arrow_table()
            new = con.sql(
                f"SELECT (hash(i + {tick * n}) % {groups})::BIGINT AS k, (hash(i * 13 + {tick}) % 1000)::BIGINT AS v "
                f"FROM range({m}) r(i)"
            ).to_arrow_table()
            tm = pa.array([tick] * m, pa.int64())
            delta = pa.concat_tables([
                gone.append_column("_time", tm).append_column("_diff", pa.array([-1] * m, pa.int64())),
                new.append_column("_time", tm).append_column("_diff", pa.array([1] * m, pa.int64())),
            ])
            con.register("gone", gone)
            con.register("new", new)
            snap = con.sql(
                "SELECT * FROM snap EXCEPT ALL SELECT * FROM gone UNION ALL SELECT * FROM new"
            ).to_arrow_table()
            # alternate: recompute first on odd ticks, incremental first on even ones
            order = ("full", "inc") if tick % 2 else ("inc", "full")
            for side in order:
                if side == "inc":
                    t0 = time.perf_counter()
                    engine.step({"t": delta})
                    inc = time.perf_counter() - t0
                    engine.compact(tick)
                else:
                    rc = duckdb.connect()
                    rc.register("t", snap)
                    rc.register("d", dim)
                    t0 = time.perf_counter()
                    rc.sql(sql).to_arrow_table()
                    full = time.perf_counter() - t0
                    rc.close()
            incs.append(inc)
            fulls.append(full)
            ratios.append(inc / full)
        engine.close()
        print(
            f"{name:20s} incremental/recompute median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}); incremental median {statistics.median(incs) * 1000:.0f} ms, "
            f"recompute median {statistics.median(fulls) * 1000:.0f} ms; load {load_s:.1f} s"
        )
    import resource

    print(f"peak RSS of this process (inputs, snapshots and engines together): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole job: CSV -> collection -> GROUP BY view in ONE `shardflow run`, against DuckDB alone.

    .venv/bin/python bench/whole_job.py --rows 10000000 --reps 5     # the issue's measurement
    .venv/bin/python bench/whole_job.py --rows 1000000 --reps 3      # quick

One CSV of `--rows` rows `id,customer,amount` (`--rows / 100` customers, amount with two
decimals) is written once. Then, alternating which goes first, `--reps` times each, as
whole processes (startup, imports and exit included; defaults, no tuning):
- **duckdb**: `python -c` DuckDB reading the CSV (`read_csv`, columns typed as the flow
  types them) and writing the view's GROUP BY result to Parquet (`COPY ... TO`);
- **shardflow**: `shardflow run examples/csv_groupby_view.py --data <fresh dir>` (the CSV
  is ingested into collection `orders` through the self-correcting sink and the view
  `orders_by_customer` is maintained in the same process, then the batch job compacts).

Printed: each side's median wall time and min-max, the speed ratio duckdb / shardflow
per pair (median, min-max), peak RSS of each child (`wait4`), and a check that the view
equals DuckDB's Parquet result. The target is a ratio >= 0.3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import machine  # noqa: E402

FLOW = os.path.join(ROOT, "examples", "csv_groupby_view.py")
VIEW = "SELECT customer, count(*) AS orders, sum(amount) AS total, max(amount) AS top FROM orders GROUP BY customer"
DUCK = """
import sys, duckdb
csv, out, sql = sys.argv[1:4]
duckdb.sql(
    "COPY (WITH orders AS (SELECT * FROM read_csv(?, header = true, columns = "
    "{'id': 'BIGINT', 'customer': 'VARCHAR', 'amount': 'DECIMAL(18,2)'})) " + sql + ") TO '" + out + "' (FORMAT parquet)",
    params=[csv],
)
"""


def timed_child(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"{argv} failed ({p.returncode}):\n{out.decode()[-2000:]}\n{err.decode()[-3000:]}")
    return secs, ru.ru_maxrss / 1024


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sql", default=VIEW, help="the view's SQL over `orders`")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    a = ap.parse_args()
    import duckdb

    print(machine(), f"DuckDB {duckdb.__version__}")
    d = a.dir or tempfile.mkdtemp(prefix="sf-bench-job-")
    os.makedirs(d, exist_ok=True)
    csv = os.path.join(d, "orders.csv")
    groups = max(1, a.rows // 100)
    try:
        duckdb.sql(
            f"COPY (SELECT i AS id, 'c' || (hash(i) % {groups})::VARCHAR AS customer, "
            f"((hash(i * 7) % 100000) / 100)::DECIMAL(18,2) AS amount FROM range({a.rows}) r(i)) TO '{csv}' (HEADER)"
        )
        print(f"CSV: {a.rows:,} rows, {groups:,} customers, {os.path.getsize(csv) / 2**20:.0f} MiB; view: {a.sql}")
        env = {**os.environ, "PYTHONPATH": ROOT, "ORDERS_GLOB": csv, "ORDERS_VIEW": a.sql}
        out = os.path.join(d, "out.parquet")
        data = os.path.join(d, "data")
        sides = {
            "duckdb": [sys.executable, "-c", DUCK, csv, out, a.sql],
            "shardflow": [sys.executable, "-m", "flows.cli", "run", FLOW, "--data", data, "--no-progress"],
        }
        secs: dict[str, list[float]] = {s: [] for s in sides}
        rss: dict[str, list[float]] = {s: [] for s in sides}
        for i in range(a.reps):
            order = ("duckdb", "shardflow") if i % 2 == 0 else ("shardflow", "duckdb")
            for side in order:
                if side == "shardflow":
                    # A fresh run each time (not timed); kept after the last one for the check below.
                    shutil.rmtree(data, ignore_errors=True)
                s, m = timed_child(sides[side], env)
                secs[side].append(s)
                rss[side].append(m)
            print(f"  rep {i + 1}: duckdb {secs['duckdb'][-1]:.2f} s, shardflow {secs['shardflow'][-1]:.2f} s", flush=True)
        # The view (from the last shardflow run) equals DuckDB's result.
        q = subprocess.run(
            [sys.executable, "-m", "flows.cli", "query", "--data", data, "--format", "csv",
             f"SELECT (SELECT count(*) FROM (SELECT * FROM orders_by_customer EXCEPT ALL SELECT * FROM read_parquet('{out}'))) "
             f"+ (SELECT count(*) FROM (SELECT * FROM read_parquet('{out}') EXCEPT ALL SELECT * FROM orders_by_customer)) AS diff"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()
        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}')").fetchall()[0]
        same = q[-1:] == ['0'] and n is not None
        ratios = [b / s for b, s in zip(secs["duckdb"], secs["shardflow"], strict=True)]
        for side in sides:
            print(f"{side:10s} wall s median {spread(secs[side])}; peak RSS MiB median {spread(rss[side], '{:.0f}')}")
        r = statistics.median(ratios)
        print(f"speed ratio duckdb/shardflow per pair: median {spread(ratios)}; target >= 0.3: {'OK' if r >= 0.3 else 'BELOW'}")
        print(f"view == DuckDB's result ({n[0] if n else '?'} rows): {'yes' if same else 'NO: ' + str(q[:5])}")
    finally:
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

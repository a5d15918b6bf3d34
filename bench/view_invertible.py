"""One tick of a 1% change into a grouped view, against a full DuckDB recompute.

    python bench/view_invertible.py N [--generic] [SQL]

N input rows in N/100 groups; the tick retracts N/200 sampled rows and inserts
N/200 new ones. Prints the load time, the full recompute (best of 3), the
incremental step and their ratio. `--generic` forces the engine's generic path.
Default SQL: SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k.
"""

import sys
import time

import duckdb
import pyarrow as pa

from flows.sqlplan import plan_view
from flows.views import ViewEngine

args = [a for a in sys.argv[1:] if not a.startswith("--")]
N = int(args[0])
G = N // 100
sql = args[1] if len(args) > 1 else "SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k"
con = duckdb.connect()
s = {"t": pa.schema([("k", pa.int64()), ("v", pa.int64())])}
e = ViewEngine(plan_view(sql, s), s, invertible="--generic" not in sys.argv)
print("sql", sql, "| fast path", e.invertible is not None)
base = con.sql(
    f"SELECT (hash(i) % {G})::BIGINT AS k, (hash(i*7) % 1000)::BIGINT AS v, 0::BIGINT AS _time, "
    f"1::BIGINT AS _diff FROM range({N}) r(i)"
).to_arrow_table()
t0 = time.perf_counter()
e.load("t", base.select(["k", "v", "_diff"]), 0)
print("load", round(time.perf_counter() - t0, 3))
con.register("t", base.select(["k", "v"]))
fulls = []
for _ in range(3):
    t0 = time.perf_counter()
    con.sql(sql).to_arrow_table()
    fulls.append(time.perf_counter() - t0)
full = min(fulls)
print("full recompute", round(full, 3))
m = N // 100
con.register("b", base)
d = con.sql(
    f"SELECT k, v, 1::BIGINT AS _time, -1::BIGINT AS _diff FROM b USING SAMPLE {m // 2} ROWS UNION ALL "
    f"SELECT (hash(i+1e9::BIGINT) % {G})::BIGINT, (hash(i) % 1000)::BIGINT, 1, 1 FROM range({m // 2}) r(i)"
).to_arrow_table()
t0 = time.perf_counter()
out = e.step({"t": d})
inc = time.perf_counter() - t0
print("incremental", round(inc, 3), "rows out", out.num_rows, "ratio", round(inc / full, 3))

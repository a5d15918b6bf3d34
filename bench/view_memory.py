"""Peak RSS of the view process over a 10M-row collection (a MAX group-by keeps an arrangement).

    .venv/bin/python bench/view_memory.py --rows 10000000

Setup (not measured): collection `t(k BIGINT, v BIGINT)` created through the storage
controller and filled with `--rows` rows in 10 appends (`--rows / 100` groups). Then, as
whole processes, each child's peak RSS read with `wait4` (`ru_maxrss`):
1. **new view**: `shardflow view top "SELECT k, max(v) AS m FROM t GROUP BY k"`: reads the
   input's snapshot and fills the view engine's arrangement (generic path: MAX is not
   invertible, so the arrangement holds every row), commits the view;
2. then 1% more updates are appended to `t` (half retractions), and **resume**: the same
   command again: the arrangement is rebuilt from the input's snapshot at the view's
   frontier (the preload), then the new updates are applied.
The target is <= 1 GiB peak RSS for both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from _common import machine  # noqa: E402

SQL = "SELECT k, max(v) AS m FROM t GROUP BY k"


def child(argv: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    out, err = p.communicate()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{argv} failed:\n{out.decode()[-2000:]}\n{err.decode()[-3000:]}")
    return secs, ru.ru_maxrss / 1024, out.decode().strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=1, help="times to run the new-view/resume pair")
    a = ap.parse_args()
    import duckdb
    import pyarrow as pa

    import storage
    from flows.job import open_controller
    from storage.controller import CollectionDesc

    print(machine(), f"DuckDB {duckdb.__version__}")
    n, groups = a.rows, max(1, a.rows // 100)
    d = tempfile.mkdtemp(prefix="sf-bench-vmem-")
    data = os.path.join(d, "data")
    try:
        schema = pa.schema([("k", pa.int64()), ("v", pa.int64())])
        con = duckdb.connect()
        for rep in range(a.reps):
            shutil.rmtree(data, ignore_errors=True)
            client = storage.open(data)
            ctl = open_controller(client)
            ctl.create_collections([CollectionDesc("t", schema)])
            shard = str(ctl.collection("t").shard_id)
            ctl.close()
            w = client.open_writer(shard, schema)
            step = n // 10
            for i in range(10):
                t = con.sql(
                    f"SELECT (hash(i) % {groups})::BIGINT AS k, (hash(i * 7) % 1000000)::BIGINT AS v, "
                    f"{i}::BIGINT AS _time, 1::BIGINT AS _diff FROM range({i * step}, {(i + 1) * step}) r(i)"
                ).to_arrow_table()
                w.compare_and_append(t, i, i + 1)
            cmd = [sys.executable, "-m", "flows.cli", "view", "top", SQL, "--data", data]
            s1, m1, o1 = child(cmd)
            m = n // 200
            extra = con.sql(
                f"SELECT (hash(i) % {groups})::BIGINT AS k, (hash(i * 7) % 1000000)::BIGINT AS v, 10::BIGINT AS _time, "
                f"-1::BIGINT AS _diff FROM range({m}) r(i) UNION ALL "
                f"SELECT (hash(i) % {groups})::BIGINT, (hash(i * 11) % 1000000)::BIGINT, 10, 1 FROM range({n}, {n + m}) r(i)"
            ).to_arrow_table()
            w.compare_and_append(extra, 10, 11)
            client.close()
            s2, m2, o2 = child(cmd)
            print(f"rep {rep + 1}: {n:,} rows, {groups:,} groups")
            print(f"  new view: peak RSS {m1:,.0f} MiB, {s1:.1f} s  [{o1}]")
            print(f"  resume:   peak RSS {m2:,.0f} MiB, {s2:.1f} s  [{o2}]")
            print(f"  target <= 1024 MiB: {'OK' if max(m1, m2) <= 1024 else 'ABOVE'}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`shardflow query` as a user runs it: a whole process, count/sum over 10M updates written as 200 batches.

The collection `bids` (k string, v int64) is created through the controller with
the default read policy (since stays one second behind the upper). 200 batches
(`--batches`) of `--rows` updates in total are appended by a plain writer with
default settings (background compaction on): batch i holds times
[100i, 100i + 100), 90% inserts of new rows and 10% retractions of rows the
previous batch inserted (bench/snapshot.py's data), so consolidation has real work.

Three states of the same data, each in its own data directory:
- `uncompacted`: the writer with `compact=False` and no controller tick, so since
  stays where the collection was created: 200 batches, every update as written.
- `settled`: the default writer; after each append the controller ticks (applies
  the read policy, which moves since and requests compaction), as a running job's
  controller does. Then the upper moves 2 s past the data (an idle tick), one more
  controller tick, and the background compactor is left to finish. No manual command.
- `full`: `settled`, then `shardflow compact --full` (a subprocess).

Ours: `shardflow query --data DIR "SELECT count(*), sum(v) FROM bids"`, a whole
process (default output: the table), at the default as_of (upper - 1).
The baseline: a whole Python process that imports duckdb and runs the same
aggregate over ONE Parquet file holding the snapshot at that as_of (one row per
unit of count: columns k, v; snappy, like parts), with DuckDB's defaults, and
prints the row. Both print the same numbers (checked). Baseline and ours are
run alternately `--repeat` times per state; printed: the median and the range of
each, the median of the per-pair ratios. Also printed, whole processes, median of
`--repeat`: `shardflow --help` and `shardflow query "select 1"` (startup).

    .venv/bin/python bench/query.py                  # 10M updates
    .venv/bin/python bench/query.py --rows 1000000   # quick
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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402
from snapshot import make_batches  # noqa: E402

import storage  # noqa: E402
from storage.controller import CollectionDesc, StorageController  # noqa: E402

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])
SQL = "SELECT count(*), sum(v) FROM bids"
STEP = 100  # time units per batch
TARGETS = {"uncompacted": 3.0, "settled": 1.2, "full": 1.2}
BIN = os.path.join(os.path.dirname(sys.executable), "shardflow")


def write(data: str, batches: list[pa.Table], *, compact: bool) -> tuple[int, str]:
    """The collection `bids` under `data`; returns (as_of the query reads at, shard)."""
    client = storage.open(data)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc("bids", SCHEMA, data_source="other")])
    shard = ctl.collections()["bids"].shard_id
    w = client.open_writer(shard, schema=SCHEMA, compact=compact)
    base = client.state(shard).upper.time or 0
    lo = base
    for i, b in enumerate(batches):
        t = pc.add(pc.subtract(b["_time"], pc.multiply(pc.divide(b["_time"], 10), 10)), base + STEP * i)
        t = pc.if_else(pc.less(b["_diff"], 0), base + STEP * i + STEP - 1, t)
        b = b.set_column(2, "_time", t)
        w.compare_and_append(b, lo, base + STEP * (i + 1))
        lo = base + STEP * (i + 1)
        if compact:
            ctl.tick()
    if compact:
        # Idle: the upper moves on 2 s (2000 units) without data; since follows past every update.
        w.compare_and_append(pa.table({n: pa.array([], f.type) for n, f in zip(
            ["k", "v", "_time", "_diff"], [*SCHEMA, pa.field("_time", pa.int64()), pa.field("_diff", pa.int64())],
            strict=True)}), lo, lo + 2000)
        time.sleep(0.2)
        ctl.tick()
        client.wait_compaction()
        time.sleep(1.0)
        ctl.tick()
        client.wait_compaction()
    as_of = client.state(shard).upper.time - 1  # type: ignore[operator]
    ctl.close()
    client.close()
    return as_of, shard


def describe(data: str, shard: str) -> str:
    client = storage.open(data)
    s = client.state(shard)
    client.close()
    kinds = sum(1 for b in s.batches if b.parts and b.consolidated)
    return (f"{len([b for b in s.batches if b.parts])} batches with parts ({kinds} consolidated), "
            f"{sum(len(b.parts) for b in s.batches)} parts, {sum(b.rows for b in s.batches):,} updates, "
            f"since {s.since.time}, upper {s.upper.time}")


def proc(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{argv[:3]}: exit {r.returncode}: {r.stderr.strip()}")
    return dt, r.stdout


def numbers(out: str) -> list[str]:
    import re

    return re.findall(r"\d+", out)


def measure(label: str, data: str, base_file: str, repeat: int) -> None:
    ours = [BIN, "query", "--data", data, SQL]
    base = [sys.executable, "-c",
            "import duckdb; print(duckdb.sql(\"SELECT count(*), sum(v) FROM read_parquet('"
            + base_file + "')\").fetchall())"]
    _, o = proc(ours)
    _, b = proc(base)
    assert numbers(o)[-2:] == numbers(b)[-2:], f"{label}: ours {o!r} vs baseline {b!r}"
    tb, to = [], []
    for _ in range(repeat):
        tb.append(proc(base)[0])
        to.append(proc(ours)[0])
    ratios = [x / y for x, y in zip(to, tb, strict=True)]
    r = statistics.median(ratios)
    print(f"  {label}: ours median {statistics.median(to):.3f}s [{min(to):.3f}-{max(to):.3f}], baseline "
          f"{statistics.median(tb):.3f}s [{min(tb):.3f}-{max(tb):.3f}]; paired ratio median {r:.2f} "
          f"[{min(ratios):.2f}-{max(ratios):.2f}] (target <= {TARGETS[label]}: "
          f"{'OK' if r <= TARGETS[label] else 'ABOVE'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    print(machine())
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[:3]}")
    root = tempfile.mkdtemp(prefix="bench-query-")
    try:
        batches = make_batches(a.rows, a.batches)
        print(f"{sum(b.num_rows for b in batches):,} updates in {a.batches} batches; query: {SQL}")
        un, st = os.path.join(root, "uncompacted"), os.path.join(root, "settled")
        t0 = time.perf_counter()
        as_of_u, shard_u = write(un, batches, compact=False)
        t1 = time.perf_counter()
        as_of_s, shard_s = write(st, batches, compact=True)
        t2 = time.perf_counter()
        print(f"written: uncompacted {t1 - t0:.1f}s, settled (appends, ticks, background compaction) {t2 - t1:.1f}s")
        # The baseline file: the snapshot at the query's as_of, one row per unit of count.
        client = storage.open(un)
        with client.open_leased_reader(shard_u) as r:
            snap = r.snapshot(as_of_u)
        client.close()
        assert pc.min(snap["_diff"]).as_py() == 1  # one row per unit of count as it is
        base_file = os.path.join(root, "consolidated.parquet")
        pq.write_table(snap.select(["k", "v"]), base_file, compression="snappy")
        print(f"baseline file: {snap.num_rows:,} rows, {os.path.getsize(base_file) / 1e6:.0f} MB")
        py = sorted(proc([sys.executable, "-c", "pass"])[0] for _ in range(a.repeat))
        hlp = sorted(proc([BIN, "--help"])[0] for _ in range(a.repeat))
        t_sel = sorted(proc([BIN, "query", "--data", un, "select 1"])[0] for _ in range(a.repeat))
        print(f"startup: python -c pass median {statistics.median(py):.3f}s; shardflow --help median "
              f"{statistics.median(hlp):.3f}s [{hlp[0]:.3f}-{hlp[-1]:.3f}] (target <= 0.2); shardflow query "
              f"'select 1' median {statistics.median(t_sel):.3f}s [{t_sel[0]:.3f}-{t_sel[-1]:.3f}] (target <= 0.5)")
        print(f"uncompacted: {describe(un, shard_u)}")
        measure("uncompacted", un, base_file, a.repeat)
        print(f"settled: {describe(st, shard_s)}")
        measure("settled", st, base_file, a.repeat)
        t3 = time.perf_counter()
        _, out = proc([BIN, "compact", "--data", st, "--full", "bids"])
        print(f"full: shardflow compact --full took {time.perf_counter() - t3:.1f}s: {out.strip()}")
        print(f"full: {describe(st, shard_s)}")
        measure("full", st, base_file, a.repeat)
        with open("/proc/loadavg") as f:
            print(f"load average at end: {f.read().split()[:3]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Whole-process batch ingest: `shardflow run` (generate -> consolidate -> persist) vs a straight-line script.

Both sides are a fresh process started the same way (`python ...`), timed from
spawn to exit, so interpreter start and imports count on both. They do the same
work on the same data:

- the updates: `--updates` updates (k int64, v int64) generated in `--batch`
  update batches, batch i at time i, by `gen_batch` (shared): each batch
  inserts every row twice (duplicates) and retracts, twice, the first third of
  the previous batch's rows (retractions). Consolidation halves the row count:
  it does work.
- ours (subject): `shardflow run FLOW --data <fresh dir>` with default
  settings (fsync on, background compaction, the batch job's final compaction
  and gc): a flow file whose source generates the batches (with offsets and
  progress, as any connector) -> `flows.consolidate` -> `persist_sink` into a
  collection.
- baseline: `python -c BASELINE`: generate each batch, consolidate it in
  DuckDB (GROUP BY row, time; the same per-time work `consolidate` does),
  write it as Parquet parts of at most `storage.parts.PART_MAX_ROWS` rows
  with pyarrow (snappy, statistics: the parts' settings), and fsync every file
  and the directory (ours fsyncs by default).

Rounds alternate which side goes first. Each round checks that both stored
the same collection (row count and sums as of the last time). Prints both
sides' median and spread (min..max) and ratio = baseline time / our time (=
our rate / baseline rate; target >= 0.5) as the median of per-round ratios,
with its spread.

    .venv/bin/python bench/ingest.py                          # 5M updates, 5 rounds
    .venv/bin/python bench/ingest.py --quick                  # 1M updates, 3 rounds
    .venv/bin/python bench/ingest.py --updates 2000000 --profile /tmp/ingest.prof   # + cProfile of one run
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

from _common import fmt_rate, machine  # noqa: E402


def gen_batch(i: int, m: int):  # type: ignore[no-untyped-def]
    """Batch `i` (time i) of `m` updates: 2/3 are inserts of m/3 new rows, each twice; the rest
    (batch 0: more inserts) retract, twice each, the first m/6 rows of batch i-1."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def arange(n: int):  # type: ignore[no-untyped-def]
        return pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), n)), pa.scalar(1, pa.int64()))

    ins = (2 * m) // 3 if i else m
    ret = m - ins
    j = arange(ins)
    k = pc.add(pc.divide(j, pa.scalar(2, pa.int64())), pa.scalar(i * m, pa.int64()))
    parts = [(k, pa.repeat(pa.scalar(1, pa.int64()), ins))]
    if ret:
        r = arange(ret)
        kr = pc.add(pc.divide(r, pa.scalar(2, pa.int64())), pa.scalar((i - 1) * m, pa.int64()))
        parts.append((kr, pa.repeat(pa.scalar(-1, pa.int64()), ret)))
    ks = pa.chunked_array([p[0] for p in parts]).combine_chunks()
    ds = pa.chunked_array([p[1] for p in parts]).combine_chunks()
    v = pc.bit_wise_and(pc.multiply(ks, pa.scalar(2654435761, pa.int64())), pa.scalar(1023, pa.int64()))
    t = pa.repeat(pa.scalar(i, pa.int64()), m)
    return pa.table([ks, v, t, ds], names=["k", "v", "_time", "_diff"])


def n_batches(updates: int, batch: int) -> int:
    return max(1, -(-updates // batch))


FLOW = """
import os, sys
sys.path.insert(0, os.environ["BENCH_DIR"])
from datetime import UTC, datetime

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.base import UpdatePartition, UpdateSource
from flows.operators import consolidate
from storage import Frontier, Progress, UpdateBatch
from ingest import gen_batch

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.int64())])
KEY = "gen/0"


class Part(UpdatePartition):
    def __init__(self, start, n, m):
        self.i, self.n, self.m = start, n, m
        self.sent_first = False

    def next_batch(self):
        if not self.sent_first:
            self.sent_first = True
            return [Progress(Frontier(self.i), KEY, (KEY,))]
        if self.i >= self.n:
            raise StopIteration
        i = self.i
        self.i += 1
        self.offset = i
        return [UpdateBatch(gen_batch(i, self.m), offsets={KEY: i}), Progress(Frontier(i + 1), KEY, (KEY,))]

    def next_awake(self):
        return None


class Gen(UpdateSource):
    def list_parts(self):
        return [KEY]

    def build_partition(self, key, resume_offset):
        start = 0 if resume_offset is None else resume_offset + 1
        return Part(start, int(os.environ["BENCH_BATCHES"]), int(os.environ["BENCH_BATCH"]))


def build(ctx):
    ctx.collection("ingest", SCHEMA)
    flow = Dataflow("ingest")
    src = op.input("gen", flow, Gen(resume=ctx.resume_offsets("ingest")))
    ctx.persist("sink", consolidate("cons", src), "ingest")
    return flow
"""

BASELINE = """
import os, sys
sys.path.insert(0, os.environ["BENCH_DIR"])
import duckdb
import pyarrow.parquet as pq
from ingest import gen_batch

PART_MAX_ROWS = 1 << 20  # storage.parts.PART_MAX_ROWS (checked by the bench)
out, n, m = sys.argv[1], int(os.environ["BENCH_BATCHES"]), int(os.environ["BENCH_BATCH"])
con = duckdb.connect()
for i in range(n):
    b = gen_batch(i, m)
    con.register("b", b)
    c = con.sql("SELECT k, v, _time, sum(_diff)::BIGINT AS _diff FROM b GROUP BY k, v, _time HAVING sum(_diff) <> 0").to_arrow_table()
    con.unregister("b")
    for p, off in enumerate(range(0, c.num_rows, PART_MAX_ROWS)):
        path = os.path.join(out, f"b{i}-p{p}.parquet")
        pq.write_table(c.slice(off, PART_MAX_ROWS), path, compression="snappy", write_statistics=True)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""

CHECK_SQL = "SELECT count(*) AS n, sum(k) AS sk, sum(v) AS sv FROM {src}"


def shardflow_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "shardflow")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "flows.cli"]


def run_timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    el = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return el


def check(data: str, base: str) -> tuple[int, int, int]:
    """Both sides hold the same collection as of the last time: (rows, sum k, sum v)."""
    import duckdb

    r = subprocess.run([*shardflow_cmd(), "query", "--data", data, "--format", "csv", CHECK_SQL.format(src="ingest")],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"query failed: {r.stderr}")
    ours = tuple(int(x) for x in r.stdout.split()[-1].split(","))
    snap = ("(SELECT k, v FROM (SELECT k, v, sum(_diff)::BIGINT AS d FROM read_parquet('" + os.path.join(base, "*.parquet")
            + "') GROUP BY k, v HAVING d > 0), range(d))")
    theirs = duckdb.sql(CHECK_SQL.format(src=snap)).fetchall()[0]
    if ours != tuple(theirs):
        raise SystemExit(f"ours stored {ours}, the baseline {theirs}: not the same work")
    return ours  # type: ignore[return-value]


def spread(xs: list[float], unit: str = "s") -> str:
    return f"median {statistics.median(xs):.2f}{unit} (min {min(xs):.2f}, max {max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=5_000_000)
    ap.add_argument("--batch", type=int, default=250_000, help="updates per batch (one time each)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1M updates, 3 rounds")
    ap.add_argument("--profile", metavar="FILE", help="also run ours once under cProfile into FILE")
    a = ap.parse_args()
    if a.quick:
        a.updates, a.rounds = 1_000_000, 3
    sys.path.insert(0, ROOT)
    from storage.parts import PART_MAX_ROWS

    assert PART_MAX_ROWS == 1 << 20, "update BASELINE's PART_MAX_ROWS"
    print(machine())
    n = n_batches(a.updates, a.batch)
    updates = n * a.batch
    print(f"{updates:,} updates in {n} batches of {a.batch:,}; whole processes; {a.rounds} rounds, alternating order")
    tmp = tempfile.mkdtemp(prefix="sf-bench-ingest-")
    env = {**os.environ, "BENCH_DIR": HERE, "BENCH_BATCHES": str(n), "BENCH_BATCH": str(a.batch)}
    try:
        flow = os.path.join(tmp, "ingest_flow.py")
        with open(flow, "w") as f:
            f.write(FLOW)
        ours_t: list[float] = []
        base_t: list[float] = []
        for r in range(a.rounds):
            data = tempfile.mkdtemp(prefix="data-", dir=tmp)
            base = tempfile.mkdtemp(prefix="base-", dir=tmp)
            runs = {
                "ours": lambda: run_timed([*shardflow_cmd(), "run", flow, "--data", data], env),  # noqa: B023
                "baseline": lambda: run_timed([sys.executable, "-c", BASELINE, base], env),  # noqa: B023
            }
            order = ["ours", "baseline"] if r % 2 == 0 else ["baseline", "ours"]
            got = {k: runs[k]() for k in order}
            ours_t.append(got["ours"])
            base_t.append(got["baseline"])
            rows, _, _ = check(data, base)
            print(f"  round {r + 1} ({order[0]} first): ours {got['ours']:.2f}s, baseline {got['baseline']:.2f}s, "
                  f"ratio {got['baseline'] / got['ours']:.2f}; {rows:,} rows stored", flush=True)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
        ratios = [b / o for b, o in zip(base_t, ours_t, strict=True)]
        print(f"ours: {spread(ours_t)} ({fmt_rate(updates / statistics.median(ours_t), 'updates/s')}); "
              f"baseline: {spread(base_t)} ({fmt_rate(updates / statistics.median(base_t), 'updates/s')})")
        med = statistics.median(ratios)
        print(f"ingest (ours rate / baseline rate): median {med:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}) "
              f"over {len(ratios)} rounds (target >= 0.5: {'OK' if med >= 0.5 else 'BELOW'})")
        if a.profile:
            data = tempfile.mkdtemp(prefix="data-", dir=tmp)
            cmd = [sys.executable, "-m", "cProfile", "-o", a.profile, "-m", "flows.cli", "run", flow, "--data", data]
            run_timed(cmd, env)
            print(f"profile of one run: {a.profile}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

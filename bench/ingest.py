"""End-to-end batch ingest: source -> consolidate -> persist_sink -> shard, vs a straight-line script.

Pre-generates `--updates` updates (k int64, v int64, _time, _diff; keys repeat
so consolidation has work; every 10th update retracts an earlier one) in
`--batch` row batches, batch i at time i. Not timed.

- ours: a bytewax flow (TestingSource of UpdateBatch + Progress items ->
  flows.consolidate -> flows.persist_sink) into a fresh shard (`-w` workers).
- baseline: concat the same batches, consolidate with DuckDB (GROUP BY row,
  time), write Parquet parts of at most PART_MAX_ROWS rows with pyarrow.

Prints seconds and updates/s both ways and ratio = ours rate / baseline rate
(target >= 0.5).

    .venv/bin/python bench/ingest.py                    # 10M updates
    .venv/bin/python bench/ingest.py --updates 1000000 -w 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import fmt_rate, machine, ratio_line  # noqa: E402

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.int64())])


def gen(n: int, batch: int) -> list[pa.Table]:
    out = []
    for i, off in enumerate(range(0, n, batch)):
        m = min(batch, n - off)
        idx = pc.add(pa.array(range(m), pa.int64()), pa.scalar(off, pa.int64()))
        k = pc.bit_wise_and(pc.multiply(idx, pa.scalar(2654435761, pa.int64())), pa.scalar((1 << 22) - 1, pa.int64()))
        v = pc.bit_wise_and(idx, pa.scalar(1023, pa.int64()))
        diff = pc.if_else(pc.equal(pc.bit_wise_and(idx, pa.scalar(15, pa.int64())), pa.scalar(0, pa.int64())),
                          pa.scalar(-1, pa.int64()), pa.scalar(1, pa.int64()))
        t = pa.repeat(pa.scalar(i, pa.int64()), m)
        out.append(pa.table([k, v, t, diff], names=["k", "v", "_time", "_diff"]))
    return out


def run_ours(batches: list[pa.Table], workers: int) -> float:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

    import storage
    from flows import consolidate, persist_sink
    from storage import Frontier, Progress, UpdateBatch

    d = tempfile.mkdtemp(prefix="sf-bench-ingest-")
    try:
        client = storage.open(d, fsync=False)
        shard = str(storage.ShardId.new())
        items: list = []
        for i, b in enumerate(batches):
            items.append(UpdateBatch(b, offsets={"gen/0": i}))
            items.append(Progress(Frontier(i + 1), "gen/0", ("gen/0",)))
        out: list = []
        flow = Dataflow("ingest")
        s = op.input("in", flow, TestingSource(items))
        c = persist_sink("sink", consolidate("cons", s), client, shard, schema=SCHEMA)
        op.output("out", c, TestingSink(out))
        t0 = time.perf_counter()
        if workers == 1:
            run_main(flow)
        else:
            cluster_main(flow, [], 0, worker_count_per_proc=workers)
        el = time.perf_counter() - t0
        st = client.state(shard)
        assert st.upper == len(batches), st.upper
        rows = sum(c.rows for c in out)
        print(f"  ours: {el:.2f}s, {len(out)} appends, {rows:,} rows stored, upper {st.upper}")
        return el
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_baseline(batches: list[pa.Table]) -> float:
    from storage.parts import PART_MAX_ROWS

    d = tempfile.mkdtemp(prefix="sf-bench-base-")
    try:
        t0 = time.perf_counter()
        t = pa.concat_tables(batches)
        con = duckdb.connect()
        con.register("t", t)
        c = con.sql("SELECT k, v, _time, sum(_diff)::BIGINT AS _diff FROM t GROUP BY k, v, _time HAVING sum(_diff) <> 0").to_arrow_table()
        for n, off in enumerate(range(0, c.num_rows, PART_MAX_ROWS)):
            pq.write_table(c.slice(off, PART_MAX_ROWS), os.path.join(d, f"p{n}.parquet"), compression="snappy", write_statistics=True)
        el = time.perf_counter() - t0
        print(f"  baseline: {el:.2f}s, {c.num_rows:,} rows stored")
        return el
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=500_000)
    ap.add_argument("-w", "--workers", type=int, default=1)
    a = ap.parse_args()
    print(machine())
    batches = gen(a.updates, a.batch)
    print(f"{a.updates:,} updates in {len(batches)} batches of {a.batch:,}; workers={a.workers}")
    base = run_baseline(batches)
    ours = run_ours(batches, a.workers)
    print(f"  rates: ours {fmt_rate(a.updates / ours, 'updates/s')}, baseline {fmt_rate(a.updates / base, 'updates/s')}")
    print(ratio_line("ingest (ours / baseline)", a.updates / ours, a.updates / base, 0.5))


if __name__ == "__main__":
    main()

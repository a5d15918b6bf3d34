"""Peak RSS of the documented pattern, source -> consolidate -> persist_sink, over 10M rows.

A generating source emits `--rows` updates (k int64, v int64) in 100k-row
batches at times 1..n with NO progress until the end, so the sink holds all of
desired before its first append; the shard starts with foreign contents at
[0, 1), so that append is a correction (desired - persisted, in DuckDB).
Each variant runs in a child process under `/usr/bin/time -v` (if present;
else resource.getrusage of the child):

- ours: source -> consolidate -> persist_sink, default settings (fsync on;
  consolidate spills its pending updates to a DuckDB file past 64 MiB; the sink
  keeps desired as parts on disk + a file-backed DuckDB with a 256 MB limit for
  the correction). The whole child process's peak RSS counts.
- baseline ("naive in-memory desired"): the same batches kept in a Python
  list of Arrow tables, consolidated with in-memory DuckDB.

Prints both peaks and ratio = ours / baseline (target: ours <= 1 GiB).

    .venv/bin/python bench/sink_memory.py              # 10M rows
    .venv/bin/python bench/sink_memory.py --rows 2000000
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

BATCH = 100_000


def batch(i: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    idx = pc.add(pa.array(range(BATCH), pa.int64()), pa.scalar(i * BATCH, pa.int64()))
    return pa.table([idx, pc.bit_wise_and(idx, pa.scalar(1023, pa.int64())),
                     pa.repeat(pa.scalar(i + 1, pa.int64()), BATCH), pa.repeat(pa.scalar(1, pa.int64()), BATCH)],
                    names=["k", "v", "_time", "_diff"])


def child_ours(n_batches: int) -> None:
    from datetime import datetime

    import bytewax.operators as op
    import pyarrow as pa
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
    from bytewax.testing import TestingSink, run_main

    import storage
    from flows import consolidate, persist_sink
    from storage import Frontier, Progress, UpdateBatch

    class Part(StatefulSourcePartition):
        def __init__(self):
            self.i = 0

        def next_batch(self):
            if self.i > n_batches:
                raise StopIteration
            i = self.i
            self.i += 1
            if i == n_batches:
                return [Progress(Frontier(n_batches + 1), "gen/0", ("gen/0",))]
            return [UpdateBatch(batch(i))]

        def next_awake(self):
            return datetime.now(UTC)

        def snapshot(self):
            return self.i

    class Src(FixedPartitionedSource):
        def list_parts(self):
            return ["gen/0"]

        def build_part(self, step_id, for_part, resume_state):
            return Part()

    d = tempfile.mkdtemp(prefix="sf-bench-mem-")
    try:
        client = storage.open(d)
        shard = str(storage.ShardId.new())
        w = client.open_writer(shard, pa.schema([("k", pa.int64()), ("v", pa.int64())]))
        foreign = batch(0).set_column(2, "_time", pa.repeat(pa.scalar(0, pa.int64()), BATCH))
        w.compare_and_append(foreign, 0, 1)
        out: list = []
        flow = Dataflow("mem")
        s = op.input("in", flow, Src())
        op.output("out", persist_sink("sink", consolidate("cons", s), client, shard), TestingSink(out))
        t0 = time.perf_counter()
        run_main(flow)
        assert client.state(shard).upper == n_batches + 1
        print(f"ours: {time.perf_counter() - t0:.1f}s, appends {len(out)}, rows {sum(c.rows for c in out):,}, corrected {out[0].corrected}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def child_naive(n_batches: int) -> None:
    import duckdb
    import pyarrow as pa

    t0 = time.perf_counter()
    held = [batch(i) for i in range(n_batches)]
    t = pa.concat_tables(held)
    con = duckdb.connect()
    con.register("t", t)
    c = con.sql("SELECT k, v, _time, sum(_diff)::BIGINT AS _diff FROM t GROUP BY k, v, _time HAVING sum(_diff) <> 0").to_arrow_table()
    print(f"baseline: {time.perf_counter() - t0:.1f}s, rows {c.num_rows:,}")


def measure(kind: str, n_batches: int) -> float:
    """Peak RSS of the child in MiB."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--batches", str(n_batches)]
    if os.path.exists("/usr/bin/time"):
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        sys.stdout.write(p.stdout)
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-4000:])
            raise SystemExit(p.returncode)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        assert m, p.stderr[-2000:]
        return int(m.group(1)) / 1024
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, text=True)
    if p.returncode != 0:
        raise SystemExit(p.returncode)
    return max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--child", choices=["ours", "naive"])
    ap.add_argument("--batches", type=int)
    a = ap.parse_args()
    if a.child:
        (child_ours if a.child == "ours" else child_naive)(a.batches)
        return
    from _common import machine

    print(machine())
    n = max(1, a.rows // BATCH)
    print(f"desired: {n * BATCH:,} rows in {n} batches; method: {'/usr/bin/time -v' if os.path.exists('/usr/bin/time') else 'getrusage'}")
    base = measure("naive", n)
    ours = measure("ours", n)
    print(f"peak RSS: ours {ours:,.0f} MiB, baseline (in-memory desired) {base:,.0f} MiB")
    print(f"sink memory (ours / baseline): ratio {ours / base:.2f}; ours <= 1024 MiB: {'OK' if ours <= 1024 else 'ABOVE'}")


if __name__ == "__main__":
    main()

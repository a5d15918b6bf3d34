"""File ingest scaling: whole-process `shardflow run` of CSV files with `-p 1` vs `-p 2`.

Writes `--files` CSV files of `--rows` rows each (id int64, name string,
amount float64) once (not timed), and a flow file reading them with
`FileSource(partitions=--partitions)` -> consolidate -> persist_sink. Each
round runs `shardflow run FLOW --data <fresh dir> -p 1` and `-p 2` (with
`-w 1`), alternating who goes first, and checks the row count of every run.
Wall time is the whole process (interpreter start, imports, flow build, ingest,
commit), as a user sees it. Prints each mode's median and spread (min..max) and
the speedup `t(-p 1) / t(-p 2)` as the median of the per-round ratios, with
its spread.

    .venv/bin/python bench/file_ingest_scaling.py                        # 8 x 500k rows, 3 rounds
    .venv/bin/python bench/file_ingest_scaling.py --files 4 --rows 100000 --rounds 2
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
import pyarrow.csv as pacsv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_rate, machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOW = '''
import os
import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow
from connectors.files import FileSource
from flows.operators import consolidate

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string()), ("amount", pa.float64())])


def build(ctx):
    ctx.collection("rows", SCHEMA)
    src = FileSource(os.environ["BENCH_GLOB"], format="csv", schema=SCHEMA, mode=ctx.mode, name="rows",
                     partitions=int(os.environ["BENCH_PARTITIONS"]), resume=ctx.resume_offsets("rows"))
    flow = Dataflow("file_ingest_scaling")
    ctx.persist("sink", consolidate("cons", op.input("files", flow, src)), "rows")
    return flow
'''


def make_files(d: str, files: int, rows: int) -> int:
    """CSV files of consecutive ids; returns their total size in bytes."""
    total = 0
    for i in range(files):
        ids = pc.add(pa.array(range(rows), pa.int64()), pa.scalar(i * rows, pa.int64()))
        t = pa.table({
            "id": ids,
            "name": pc.binary_join_element_wise(pa.scalar("n"), pc.cast(ids, pa.string()), pa.scalar("")),
            "amount": pc.divide(pc.cast(ids, pa.float64()), pa.scalar(7.0, pa.float64())),
        })
        p = os.path.join(d, f"part{i:03d}.csv")
        pacsv.write_csv(t, p, pacsv.WriteOptions(quoting_style="none"))
        total += os.path.getsize(p)
    return total


def run_once(flow: str, glob: str, procs: int, partitions: int, expect: int, tmp: str) -> float:
    data = tempfile.mkdtemp(prefix="data-", dir=tmp)
    env = {**os.environ, "BENCH_GLOB": glob, "BENCH_PARTITIONS": str(partitions)}
    cmd = [sys.executable, "-m", "flows.cli", "run", flow, "--data", data, "-p", str(procs), "-w", "1"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    el = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"-p {procs}: shardflow run failed: {r.stderr.strip()}")
    q = subprocess.run([sys.executable, "-m", "flows.cli", "query", "--data", data, "SELECT count(*) AS n FROM rows",
                        "--format", "csv"], cwd=ROOT, capture_output=True, text=True)
    n = int(q.stdout.split()[-1]) if q.returncode == 0 else -1
    if n != expect:
        raise SystemExit(f"-p {procs}: {n} rows committed, expected {expect}")
    shutil.rmtree(data, ignore_errors=True)
    return el


def spread(xs: list[float], unit: str = "s") -> str:
    return f"median {statistics.median(xs):.2f}{unit} (min {min(xs):.2f}, max {max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rows", type=int, default=500_000, help="rows per file")
    ap.add_argument("--partitions", type=int, default=4, help="FileSource partitions")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(machine())
    tmp = tempfile.mkdtemp(prefix="sf-bench-files-")
    try:
        src = os.path.join(tmp, "in")
        os.mkdir(src)
        size = make_files(src, a.files, a.rows)
        flow = os.path.join(tmp, "flow.py")
        with open(flow, "w") as f:
            f.write(FLOW)
        n = a.files * a.rows
        print(f"{a.files} CSV files x {a.rows:,} rows = {n:,} rows, {size / 2**20:.0f} MiB; "
              f"partitions={a.partitions}, -w 1; {a.rounds} rounds, alternating order")
        glob = os.path.join(src, "*.csv")
        t1: list[float] = []
        t2: list[float] = []
        for r in range(a.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for p in order:
                el = run_once(flow, glob, p, a.partitions, n, tmp)
                (t1 if p == 1 else t2).append(el)
                print(f"  round {r + 1}: -p {p}: {el:.2f}s ({fmt_rate(n / el)})")
        ratios = [x / y for x, y in zip(t1, t2, strict=True)]
        print(f"-p 1: {spread(t1)}; -p 2: {spread(t2)}")
        print(f"speedup t(-p 1) / t(-p 2): median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(ratios)} rounds")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""CSV source: `FileSource` reading one CSV file through a flow vs pyarrow parsing it alone.

Writes one CSV file of `--rows` rows (id int64, name string, amount float64;
not timed). Each round, alternating who goes first, in this process:

- ours: a bytewax flow `FileSource(format="csv")` -> a sink that drops the
  batches (`run_main`): reading 16 MiB chunks of whole lines, parsing each on
  pyarrow's threads (blocks of `connectors.files._csv_block`), offsets and
  times attached.
- baseline (threads): `pyarrow.csv.read_csv` of the whole file with threads,
  the same schema; the ceiling for a parse.
- baseline (one thread): the same with `use_threads=False`, what FileSource
  did before.

Prints each side's median and spread and the paired ratios ours/threads and
ours/one-thread as throughput ratios (median and spread).

    .venv/bin/python bench/csv_parse.py                 # 2M rows, 5 rounds
    .venv/bin/python bench/csv_parse.py --rows 500000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import machine  # noqa: E402

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string()), ("amount", pa.float64())])


def make(path: str, rows: int) -> None:
    ids = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), rows)), pa.scalar(1, pa.int64()))
    t = pa.table({
        "id": ids,
        "name": pc.binary_join_element_wise(pa.scalar("customer"), pc.cast(ids, pa.string()), pa.scalar("")),
        "amount": pc.divide(pc.cast(ids, pa.float64()), pa.scalar(7.0, pa.float64())),
    })
    pacsv.write_csv(t, path, pacsv.WriteOptions(quoting_style="none"))


def ours(path: str, rows: int) -> float:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import run_main

    from connectors.files import FileSource
    from storage import UpdateBatch

    n = [0]

    def count(_step: str, x: object) -> None:
        if type(x) is UpdateBatch:
            n[0] += x.table.num_rows

    flow = Dataflow("csv")
    s = op.input("in", flow, FileSource(path, format="csv", schema=SCHEMA))
    op.inspect("count", s, count)
    t0 = time.perf_counter()
    run_main(flow)
    el = time.perf_counter() - t0
    assert n[0] == rows, n[0]
    return el


def baseline(path: str, rows: int, threads: bool) -> float:
    t0 = time.perf_counter()
    t = pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=threads),
                       convert_options=pacsv.ConvertOptions(column_types=SCHEMA))
    el = time.perf_counter() - t0
    assert t.num_rows == rows
    return el


def spread(xs: list[float], unit: str = "s") -> str:
    return f"median {statistics.median(xs):.3f}{unit} (min {min(xs):.3f}, max {max(xs):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(machine())
    d = tempfile.mkdtemp(prefix="sf-bench-csv-")
    try:
        path = os.path.join(d, "in.csv")
        make(path, a.rows)
        print(f"{a.rows:,} rows, {os.path.getsize(path) / 2**20:.0f} MiB; {a.rounds} rounds, alternating order")
        ours(path, a.rows)  # warm the page cache and imports
        res: dict[str, list[float]] = {"ours": [], "threads": [], "one": []}
        runs = {"ours": lambda: ours(path, a.rows), "threads": lambda: baseline(path, a.rows, True),
                "one": lambda: baseline(path, a.rows, False)}
        for r in range(a.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for k in order:
                res[k].append(runs[k]())
        for k, label in (("ours", "ours (FileSource flow)"), ("threads", "pyarrow, threads"),
                         ("one", "pyarrow, one thread")):
            print(f"  {label}: {spread(res[k])}")
        for k in ("threads", "one"):
            rs = [b / o for b, o in zip(res[k], res["ours"], strict=True)]
            print(f"ours rate / pyarrow {k} rate: median {statistics.median(rs):.2f} (min {min(rs):.2f}, max {max(rs):.2f})")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Flat appends: does the cost of one `compare_and_append` grow with the number of batches?

`--appends` (default 1,000) appends of `--rows` (default 100) updates each go
into a fresh shard through the documented API (`storage.open(tmp)`, default
fsync on) with compaction off (`open_writer(..., compact=False)`), so that the
shard really holds one batch per append. Each append is timed on its own.

The baseline is the same run's early appends: the figure is the median latency
of the appends around the `--at` th (default 1,000th: appends at-10..at) over
the median of the appends around the 10th (5..15). Target: <= 1.5. `--rounds`
(default 3) fresh shards; the median and spread of the ratio are printed.
`--profile` prints where one round's time goes.

    .venv/bin/python bench/append_latency.py
    .venv/bin/python bench/append_latency.py --appends 300 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

import storage  # noqa: E402

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])
TARGET = 1.5


def make_batch(i: int, rows: int) -> pa.Table:
    return pa.table({
        "k": pa.array([f"key-{(i * rows + j) % 100_003}" for j in range(rows)], pa.string()),
        "v": pa.array(range(i * rows, (i + 1) * rows), pa.int64()),
        "_time": pa.array([i] * rows, pa.int64()),
        "_diff": pa.array([1] * rows, pa.int64()),
    })


def one_round(appends: int, rows: int, prof: cProfile.Profile | None = None) -> list[float]:
    """Per-append latencies (seconds) of `appends` appends into a fresh shard, compaction off."""
    batches = [make_batch(i, rows) for i in range(appends)]
    tmp = tempfile.mkdtemp(prefix="sf-bench-latency-")
    try:
        client = storage.open(tmp)
        shard = storage.ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA, compact=False)
        out = []
        if prof is not None:
            prof.enable()
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            w.compare_and_append(b, expected_upper=i, new_upper=i + 1)
            out.append(time.perf_counter() - t0)
        if prof is not None:
            prof.disable()
        assert len(client.state(shard).batches) == appends
        client.close()
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--appends", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--at", type=int, default=None, help="the late append compared with the 10th (default: --appends)")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra round; print the top costs")
    a = ap.parse_args(argv)
    at = min(a.at or a.appends, a.appends)
    if at < 20:
        ap.error("--at/--appends must be at least 20")
    print(f"machine: {machine()}")
    print(f"{a.appends} appends of {a.rows} rows, compaction off, fsync on; comparing append {at} with append 10")
    one_round(20, a.rows)  # warm-up: imports, sqlite, page cache
    ratios = []
    for r in range(a.rounds):
        lat = one_round(a.appends, a.rows)
        early = statistics.median(lat[4:15])  # appends 5..15
        late = statistics.median(lat[at - 11 : at])  # appends at-10..at
        ratios.append(late / early)
        print(f"round {r + 1}: append ~10: {early * 1e3:.2f} ms, append ~{at}: {late * 1e3:.2f} ms, "
              f"ratio {late / early:.2f}; mean over all {statistics.mean(lat) * 1e3:.2f} ms")
    med = statistics.median(ratios)
    print(f"late / early latency: median {med:.2f} (spread {min(ratios):.2f}-{max(ratios):.2f}) "
          f"(target <= {TARGET}: {'OK' if med <= TARGET else 'ABOVE'})")
    if a.profile:
        prof = cProfile.Profile()
        one_round(a.appends, a.rows, prof)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        print("--- cProfile of one round, by tottime ---")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

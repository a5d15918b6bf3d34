"""Flat appends: does the cost of one `compare_and_append` grow with the number of batches?

Through the documented API (`storage.open(tmp)`, fsync on) with compaction off
(`open_writer(..., compact=False)`), so that a shard really holds one batch per
append; every append carries `--rows` (default 100) updates.

- ours: an *old* shard, first filled with `--at - 1` appends (default 999, not
  timed); then each round times its next append (the 1,000th, 1,001st, ...);
- baseline: in the same round, a *young* shard, fresh each round, given 9
  untimed appends; its 10th append is timed.

The two alternate, who goes first switching every round, so that the load of a
shared machine falls on both alike. Prints the median and spread over
`--rounds` (default 31) of old / young per round. Target: <= 1.5.
`--profile` prints where the old shard's appends spend their time.

    .venv/bin/python bench/append_latency.py
    .venv/bin/python bench/append_latency.py --at 300 --rounds 11   # quick
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
EARLY = 10


def make_batch(i: int, rows: int) -> pa.Table:
    return pa.table({
        "k": pa.array([f"key-{(i * rows + j) % 100_003}" for j in range(rows)], pa.string()),
        "v": pa.array(range(i * rows, (i + 1) * rows), pa.int64()),
        "_time": pa.array([i] * rows, pa.int64()),
        "_diff": pa.array([1] * rows, pa.int64()),
    })


class Shard:
    """A shard and its writer; `append()` appends the next batch and returns its latency in seconds."""

    def __init__(self, client: storage.Client, rows: int):
        self.rows = rows
        self.n = 0
        self.shard = storage.ShardId.new()
        self.w = client.open_writer(self.shard, schema=SCHEMA, compact=False)

    def append(self) -> float:
        b = make_batch(self.n, self.rows)  # not timed
        t0 = time.perf_counter()
        self.w.compare_and_append(b, expected_upper=self.n, new_upper=self.n + 1)
        dt = time.perf_counter() - t0
        self.n += 1
        return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--at", type=int, default=1000, help="the old shard's first timed append (default 1,000th)")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--profile", action="store_true", help="cProfile the old shard's timed appends")
    a = ap.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"appends of {a.rows} rows, compaction off, fsync on: append {a.at}+ of an old shard vs append {EARLY} "
          f"of a fresh one, alternated, {a.rounds} rounds")
    tmp = tempfile.mkdtemp(prefix="sf-bench-latency-")
    try:
        client = storage.open(tmp)
        old = Shard(client, a.rows)
        t0 = time.perf_counter()
        fill = [old.append() for _ in range(a.at - 1)]
        print(f"filled the old shard with {a.at - 1} appends in {time.perf_counter() - t0:.1f} s "
              f"(appends 1-10: {statistics.median(fill[:10]) * 1e3:.2f} ms, last 10: {statistics.median(fill[-10:]) * 1e3:.2f} ms median)")
        prof = cProfile.Profile() if a.profile else None
        ratios, olds, youngs = [], [], []
        for r in range(a.rounds):
            young = Shard(client, a.rows)
            for _ in range(EARLY - 1):
                young.append()
            sides = ["old", "young"] if r % 2 else ["young", "old"]
            got = {}
            for side in sides:
                if side == "old" and prof is not None:
                    prof.enable()
                got[side] = (old if side == "old" else young).append()
                if side == "old" and prof is not None:
                    prof.disable()
            olds.append(got["old"])
            youngs.append(got["young"])
            ratios.append(got["old"] / got["young"])
        assert len(client.state(old.shard).batches) == a.at - 1 + a.rounds
        client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios.sort()
    med = statistics.median(ratios)
    print(f"append {EARLY} (young): median {statistics.median(youngs) * 1e3:.2f} ms; "
          f"append {a.at}+ (old): median {statistics.median(olds) * 1e3:.2f} ms")
    print(f"old / young latency, paired per round: median {med:.2f} (spread {ratios[0]:.2f}-{ratios[-1]:.2f}, "
          f"quartiles {ratios[len(ratios) // 4]:.2f}-{ratios[3 * len(ratios) // 4]:.2f}) "
          f"(target <= {TARGET}: {'OK' if med <= TARGET else 'ABOVE'})")
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        print("--- cProfile of the old shard's timed appends, by tottime ---")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

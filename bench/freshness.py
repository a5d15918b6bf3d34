"""Continuous freshness: p50/p99 of (commit wall time - event time) at `--rate` updates/s.

A continuous source emits a batch every `--every` seconds, stamped with the
wall-clock millisecond as its `_time`, then Progress(now + 1); the flow is
source -> consolidate -> persist_sink, run for `--seconds`, then stopped with
`connectors.base.request_stop()` (as SIGINT/SIGTERM do). Each committed
batch's rows are read back and their lag is commit wall time - `_time`.

Baseline (same run): a straight-line loop that buffers the same batches and
does one `compare_and_append` per `--tick` (what a naive ticker achieves).
Prints p50/p99 both ways, ratio = baseline p99 / ours p99 (higher is better),
and the target check p99 <= 2 x tick.

    .venv/bin/python bench/freshness.py                # 100k updates/s, 10 s, tick 1 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

SCHEMA = pa.schema([("k", pa.int64())])


def make(n: int, seq: int, now: int) -> pa.Table:
    return pa.table({"k": pa.array(range(seq, seq + n), pa.int64()), "_time": pa.repeat(pa.scalar(now, pa.int64()), n),
                     "_diff": pa.repeat(pa.scalar(1, pa.int64()), n)})


def pct(xs: list[int], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def lags(client, shard, commits: dict[tuple[int, int], int]) -> list[int]:
    """Per-row lag, from the shard's batches and each batch's commit wall time."""
    s = client.state(shard)
    out: list[int] = []
    con = duckdb.connect()
    for b in s.batches:
        wall = commits.get((b.lower.time, b.upper.time))
        if wall is None or not b.parts:
            continue
        paths = [client.blob.local_path(p.key) for p in b.parts]
        lst = "[" + ", ".join(f"'{x}'" for x in paths) + "]"
        for t, n in con.sql(f"SELECT _time, count(*) FROM read_parquet({lst}) GROUP BY _time").fetchall():
            out.extend([wall - t] * int(n))
    return out


def run_ours(rate: int, seconds: float, every: float) -> list[int]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    import storage
    from connectors.base import STOP, UpdatePartition, UpdateSource, request_stop, reset_stop
    from flows import consolidate, persist_sink
    from storage import Frontier, Progress, UpdateBatch

    class Part(UpdatePartition):
        def __init__(self):
            self.seq = 0
            self.done = False
            self.awake = None
            self.t0 = time.monotonic()

        def next_batch(self):
            if self.done:
                raise StopIteration
            now = int(time.time() * 1000)
            if STOP.is_set():
                self.done = True
                return [Progress(Frontier(now + 1), "fresh/0", ("fresh/0",))]
            # Keep the offered rate exact whatever the loop overhead: emit what is due.
            n = int(rate * (time.monotonic() - self.t0)) - self.seq
            if n <= 0:
                self.awake = datetime.now(UTC) + timedelta(seconds=every)
                return []
            t = make(n, self.seq, now)
            self.seq += n
            self.awake = datetime.now(UTC) + timedelta(seconds=every)
            return [UpdateBatch(t, offsets={"fresh/0": self.seq}), Progress(Frontier(now + 1), "fresh/0", ("fresh/0",))]

        def next_awake(self):
            return self.awake

    class Src(UpdateSource):
        def list_parts(self):
            return ["fresh/0"]

        def build_partition(self, key, resume_offset):
            return Part()

    d = tempfile.mkdtemp(prefix="sf-bench-fresh-")
    try:
        client = storage.open(d, fsync=False)
        shard = str(storage.ShardId.new())
        out: list = []
        flow = Dataflow("fresh")
        s = op.input("in", flow, Src())
        op.output("out", persist_sink("sink", consolidate("cons", s), client, shard, schema=SCHEMA), TestingSink(out))
        reset_stop()
        threading.Timer(seconds, request_stop).start()
        run_main(flow)
        commits = {(c.lower.time, c.upper.time): c.wall_ms for c in out}
        print(f"  ours: {len(out)} appends, {sum(c.rows for c in out):,} rows")
        return lags(client, shard, commits)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_baseline(rate: int, seconds: float, every: float, tick: float) -> list[int]:
    import storage

    d = tempfile.mkdtemp(prefix="sf-bench-fresh0-")
    try:
        client = storage.open(d, fsync=False)
        shard = str(storage.ShardId.new())
        w = client.open_writer(shard, SCHEMA)
        commits: dict[tuple[int, int], int] = {}
        buf: list[pa.Table] = []
        seq, upper = 0, 0
        end = time.monotonic() + seconds
        next_commit = time.monotonic() + tick
        t0 = time.monotonic()
        while time.monotonic() < end:
            now = int(time.time() * 1000)
            n = int(rate * (time.monotonic() - t0)) - seq
            if n > 0:
                buf.append(make(n, seq, now))
                seq += n
            if time.monotonic() >= next_commit:
                new = int(time.time() * 1000) + 1
                w.compare_and_append(pa.concat_tables(buf), upper, new)
                commits[(upper, new)] = int(time.time() * 1000)
                upper, buf, next_commit = new, [], next_commit + tick
            time.sleep(every)
        return lags(client, shard, commits)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=0.01, help="seconds between source batches")
    ap.add_argument("--tick", type=float, default=1.0)
    a = ap.parse_args()
    from _common import machine

    print(machine())
    print(f"rate {a.rate:,} updates/s for {a.seconds}s, a batch every {a.every}s, tick {a.tick}s")
    base = run_baseline(a.rate, a.seconds, a.every, a.tick)
    ours = run_ours(a.rate, a.seconds, a.every)
    print(f"  ours: {len(ours):,} rows ({len(ours) / a.seconds:,.0f}/s), p50 {pct(ours, .5):.0f} ms, p99 {pct(ours, .99):.0f} ms")
    print(f"  baseline (one append per tick): {len(base):,} rows, p50 {pct(base, .5):.0f} ms, p99 {pct(base, .99):.0f} ms")
    p99 = pct(ours, 0.99)
    print(f"freshness: ratio baseline p99 / ours p99 = {pct(base, .99) / max(p99, 1):.2f}; "
          f"p99 {p99:.0f} ms <= 2 x tick ({2000 * a.tick:.0f} ms): {'OK' if p99 <= 2000 * a.tick else 'ABOVE'}")


if __name__ == "__main__":
    main()

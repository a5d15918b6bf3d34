"""Append throughput: shardflow `compare_and_append` vs `pyarrow.parquet.write_table` alone.

Writes `--rows` updates (k string, v int64, _time, _diff) in `--batch-rows`
batches through `WriteHandle.compare_and_append` into a fresh shard
(`storage.open(tmpdir)`), and, in the same run, the same pre-generated batches
with `pq.write_table` to plain files (same compression as parts: snappy, with
statistics). Batch generation is not timed. Prints rows/s both ways and the
ratio shardflow / baseline (target >= 0.7).

The writer runs with the defaults users get: background compaction on (the
compactor thread runs at a low priority, `storage.compact.COMPACTOR_NICE`).
The time compaction takes to drain after the last append is printed, not
counted in the ratio; `--no-compact` measures the write path alone.

    .venv/bin/python bench/append.py                      # 10M rows, fsync on and off
    .venv/bin/python bench/append.py --no-fsync --repeat 5 --summary best
    .venv/bin/python bench/append.py --rows 1000000 --profile
    .venv/bin/python bench/append.py --fsync --compare-nice 0,10,19   # the compactor's priority
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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_rate, machine, peak_rss_mb, rate, rss_mb, summarise, timed  # noqa: E402

import storage  # noqa: E402
import storage.compact as storage_compact  # noqa: E402
from storage.updates import update_schema  # noqa: E402

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])
TARGET = 0.7
OFF = -100  # --compare-nice off: a writer with compact=False
DRAINS: list[tuple[float, int]] = []  # per compacting run: (s waiting for compaction after the appends, batches left)


def make_batches(rows: int, batch_rows: int, seed: int = 42) -> list[pa.Table]:
    """Batch i holds times in [i, i+1): keys 'key-<n>' over 1M distinct values, random v, diff +1."""
    phys = update_schema(SCHEMA)
    out = []
    for i, off in enumerate(range(0, rows, batch_rows)):
        n = min(batch_rows, rows - off)
        u1 = pc.random(n, initializer=seed + 2 * i)
        u2 = pc.random(n, initializer=seed + 2 * i + 1)
        ki = pc.cast(pc.floor(pc.multiply(u1, 1_000_000)), pa.int64())
        keys = pc.binary_join_element_wise("key-", pc.cast(ki, pa.string()), "")
        v = pc.cast(pc.floor(pc.multiply(pc.subtract(u2, 0.5), float(1 << 41))), pa.int64())
        out.append(
            pa.Table.from_arrays(
                [keys, v, pa.repeat(pa.scalar(i, pa.int64()), n), pa.repeat(pa.scalar(1, pa.int64()), n)],
                schema=phys,
            )
        )
    return out


def run_shardflow(
    batches: list[pa.Table], fsync: bool, prof: cProfile.Profile | None = None, compact: bool = True
) -> float:
    tmp = tempfile.mkdtemp(prefix="sf-bench-append-")
    try:
        client = storage.open(tmp, fsync=fsync)
        shard = storage.ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA) if compact else client.open_writer(shard, schema=SCHEMA, compact=False)
        if prof is not None:
            prof.enable()
        with timed() as t:
            for i, b in enumerate(batches):
                w.compare_and_append(b, expected_upper=i, new_upper=i + 1)
        if prof is not None:
            prof.disable()
        if compact:
            with timed() as d:  # not in the append time: it runs after the appends return
                client.wait_compaction(timeout=300)
            DRAINS.append((d[0], len(client.state(shard).batches)))
        got = client.inspect(shard)
        want = sum(b.num_rows for b in batches)
        assert got["rows"] == want and got["upper"] == len(batches), (got["rows"], want, got["upper"])
        client.close()
        return t[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_baseline(batches: list[pa.Table], fsync: bool = False) -> float:
    tmp = tempfile.mkdtemp(prefix="sf-bench-pq-")
    try:
        with timed() as t:
            for i, b in enumerate(batches):
                path = os.path.join(tmp, f"b{i:06d}.parquet")
                pq.write_table(b, path, compression="snappy", write_statistics=True)
                if fsync:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        return t[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batch-rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per side and mode (default 5)")
    ap.add_argument("--summary", choices=["best", "median"], default="median", help="how repeats are combined")
    ap.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=None,
                    help="shardflow blob fsync on/off; default: run both")
    ap.add_argument("--baseline-fsync", action="store_true",
                    help="also time write_table + fsync per file (informational)")
    ap.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                    help="background compaction, as `open_writer` does by default (--no-compact: the write path alone)")
    ap.add_argument("--compare-nice", default="",
                    help="comma-separated compactor nice values to run side by side (e.g. 0,19,off; off: compact=False)")
    ap.add_argument("--profile", action="store_true", help="cProfile one shardflow run; print top costs")
    a = ap.parse_args(argv)

    print(f"machine: {machine()}")
    print(f"pyarrow {pa.__version__}; rows={a.rows:,} batch_rows={a.batch_rows:,} repeat={a.repeat} ({a.summary}); "
          f"background compaction {'on' if a.compact else 'off'}")
    batches = make_batches(a.rows, a.batch_rows)
    rows = sum(b.num_rows for b in batches)
    print(f"generated {len(batches)} batches, {sum(b.nbytes for b in batches) / 2**20:.0f} MiB in memory; rss {rss_mb():.0f} MiB")
    # Warm-up, untimed: imports, sqlite init, allocator, and page-cache pages. On a VM,
    # the first touch of guest memory is several times slower than reusing freed
    # pages, so whichever side ran first would pay for it; one full pass evens that out.
    run_shardflow(batches[:3], fsync=False)
    run_baseline(batches)

    modes = [True, False] if a.fsync is None else [a.fsync]
    nices: list[int | None] = [None] if not a.compare_nice else [
        OFF if x == "off" else int(x) for x in a.compare_nice.split(",")]
    for fsync in modes:
        base: list[float] = []
        base_fs: list[float] = []
        sfs: dict[int | None, list[float]] = {n: [] for n in nices}
        drains: dict[int | None, list[tuple[float, int]]] = {n: [] for n in nices}
        for r in range(max(1, a.repeat)):
            # Interleave, rotating who goes first, and sync() before each run so no
            # run inherits the previous one's dirty-page writeback.
            runs: list[tuple[str, int | None]] = [("base", None)] + [("sf", n) for n in nices]
            if a.baseline_fsync:
                runs.append(("base_fs", None))
            k = r % len(runs)
            for which, nice in runs[k:] + runs[:k]:
                os.sync()
                if which == "sf":
                    if nice is not None and nice != OFF:
                        storage_compact.COMPACTOR_NICE = nice  # read when the client's compactor starts
                    on = a.compact and nice != OFF
                    sfs[nice].append(run_shardflow(batches, fsync, compact=on))
                    if on:
                        drains[nice].append(DRAINS[-1])
                else:
                    (base_fs if which == "base_fs" else base).append(run_baseline(batches, fsync=which == "base_fs"))
        tag = "fsync=on " if fsync else "fsync=off"
        base_r = rate(rows, summarise(base, a.summary))
        print(f"[{tag}] baseline pq.write_table: {fmt_rate(base_r)}  (runs s: {', '.join(f'{x:.2f}' for x in base)})")
        if base_fs:
            print(f"[{tag}] baseline + fsync/file  : {fmt_rate(rate(rows, summarise(base_fs, a.summary)))}")
        for nice, sf in sfs.items():
            who = "shardflow c_and_a" + ("" if nice is None else ", compaction off" if nice == OFF else f", compactor nice {nice}")
            sf_r = rate(rows, summarise(sf, a.summary))
            print(f"[{tag}] {who}: {fmt_rate(sf_r)}  (runs s: {', '.join(f'{x:.2f}' for x in sf)})")
            paired = sorted(b / x for b, x in zip(base, sf, strict=True))
            med = statistics.median(paired)
            print(f"[{tag}] {who} / baseline, paired per round: median {med:.2f} (spread {paired[0]:.2f}-{paired[-1]:.2f})"
                  f" (target >= {TARGET}: {'OK' if med >= TARGET else 'BELOW'})")
            if drains[nice]:
                print(f"[{tag}]   after the appends, background compaction drained in "
                      f"{', '.join(f'{d:.2f}' for d, _ in drains[nice])} s (not in the ratio), "
                      f"leaving {', '.join(str(n) for _, n in drains[nice])} batches")
    print(f"peak rss {peak_rss_mb():.0f} MiB")

    if a.profile:
        prof = cProfile.Profile()
        run_shardflow(batches, fsync=modes[-1], prof=prof, compact=a.compact)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        print(f"--- cProfile, fsync={'on' if modes[-1] else 'off'}, by tottime ---")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

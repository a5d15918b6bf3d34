"""Compaction: batch count and write amplification after many small appends.

`--appends` (default 1,000) appends of `--rows` (default 1,000) updates each
(k string, v int64, one time per append) go into a fresh shard twice, in the
same run:

- baseline: a writer with `compact=False` (no compaction at all);
- ours: a writer with the default `compact=True`, whose client compacts in the
  background after appends; at the end we wait for it to go idle.

Prints the number of batches (target <= 2 * log2(appends), ~20 for 1,000),
write amplification = (bytes of appended parts + bytes of parts written by
compaction) / bytes of appended parts (target <= 4), and the append wall time
with background compaction against the baseline (the cost of compaction as seen
by the writer). `--inline` instead calls `client.compact` after every append on
the writer's thread.

    .venv/bin/python bench/compaction.py
    .venv/bin/python bench/compaction.py --appends 200 --rows 500     # quick
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, timed  # noqa: E402

import storage  # noqa: E402

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


def make_batches(appends: int, rows: int) -> list[pa.Table]:
    """Deterministic: keys 'key-<n>' over 1M values, random v, time i in append i, diff +1."""
    rng = random.Random(7)
    out = []
    for i in range(appends):
        out.append(pa.table({
            "k": pa.array([f"key-{rng.randrange(1_000_000)}" for _ in range(rows)], pa.string()),
            "v": pa.array([rng.getrandbits(40) for _ in range(rows)], pa.int64()),
            "_time": pa.array([i] * rows, pa.int64()),
            "_diff": pa.array([1] * rows, pa.int64()),
        }))
    return out


def blob_bytes(client: storage.Client, shard: str) -> int:
    return sum(m.size for m in client.blob.list(f"{shard}/"))


def run(batches: list[pa.Table], *, compact: bool, inline: bool, fsync: bool) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix="bench-compaction-")
    try:
        client = storage.open(root, fsync=fsync)
        shard = storage.ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA, compact=compact and not inline)
        written = 0
        with timed() as t_append:
            for i, b in enumerate(batches):
                w.compare_and_append(b, i, i + 1)
                if inline:
                    written += client.compact(shard).bytes_written
        with timed() as t_drain:
            client.wait_compaction()
        if compact and not inline:
            written = client.compactor.totals.bytes_written
            assert not client.compactor.errors, client.compactor.errors
        total = blob_bytes(client, shard)  # nothing was gc'd: every part ever written
        appended = total - written
        s = client.state(shard)
        out = {
            "append_s": t_append[0],
            "drain_s": t_drain[0],
            "batches": len(s.batches),
            "appended_bytes": appended,
            "compaction_bytes": written,
            "wamp": total / appended,
        }
        client.close()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--appends", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--inline", action="store_true", help="compact on the writer's thread after each append")
    ap.add_argument("--fsync", action="store_true", help="fsync parts (default off: measures our work, not the disk)")
    a = ap.parse_args()
    print(machine())
    batches = make_batches(a.appends, a.rows)
    base = run(batches, compact=False, inline=False, fsync=a.fsync)
    ours = run(batches, compact=True, inline=a.inline, fsync=a.fsync)
    target_batches = 2 * math.log2(a.appends)
    mode = "inline" if a.inline else "background"
    print(f"{a.appends} appends x {a.rows} rows, compaction {mode}")
    print(f"baseline (compact=False): {base['append_s']:.2f}s, {base['batches']:.0f} batches")
    print(f"ours     (compact=True):  {ours['append_s']:.2f}s appending + {ours['drain_s']:.2f}s draining the compactor")
    ok_b = "OK" if ours["batches"] <= target_batches else "ABOVE"
    print(f"batches: {ours['batches']:.0f} (target <= {target_batches:.1f}: {ok_b})")
    ok_w = "OK" if ours["wamp"] <= 4 else "ABOVE"
    print(
        f"write amplification: {ours['wamp']:.2f} = ({ours['appended_bytes'] / 1e6:.1f} MB appended + "
        f"{ours['compaction_bytes'] / 1e6:.1f} MB by compaction) / {ours['appended_bytes'] / 1e6:.1f} MB (target <= 4: {ok_w})"
    )
    total = ours["append_s"] + ours["drain_s"]
    print(f"append time ratio ours/baseline: {ours['append_s'] / base['append_s']:.2f} "
          f"(including the drain: {total / base['append_s']:.2f})")


if __name__ == "__main__":
    main()

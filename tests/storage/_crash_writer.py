"""Crash-test writer: streams CAS appends to a shard until it is killed.

Run as `python _crash_writer.py ROOT SHARD ROWS [PART_ROWS]` by tests/storage/test_crash.py.

Batch `n` holds ROWS updates with `batch = n`, `i = 0..ROWS-1`, all at time `n`,
appended as `[n, n + 1)` with `compare_and_append`. After each successful append
it prints `ACK n` and flushes, so the parent knows exactly which batches were
acknowledged. It starts at the shard's current upper, so it continues whatever
an earlier (killed) writer left. PART_ROWS splits each batch into several parts,
so "whole or absent" covers multi-part batches.
"""

from __future__ import annotations

import sys

import pyarrow as pa

import storage
import storage.write

SCHEMA = pa.schema([("batch", pa.int64()), ("i", pa.int64()), ("pad", pa.string())])


def batch(n: int, rows: int) -> pa.Table:
    return pa.table(
        {
            "batch": pa.array([n] * rows, pa.int64()),
            "i": pa.array(range(rows), pa.int64()),
            "pad": pa.array([f"row {n}.{i} " + "x" * 40 for i in range(rows)]),
            "_time": pa.array([n] * rows, pa.int64()),
            "_diff": pa.array([1] * rows, pa.int64()),
        }
    )


def main() -> None:
    root, shard, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        storage.parts.PART_MAX_ROWS = int(sys.argv[4])
    client = storage.open(root)
    w = client.open_writer(shard, schema=SCHEMA, writer_id="crash-writer")
    upper = w.upper
    assert upper.time is not None
    n = upper.time
    print("READY", flush=True)
    while True:
        w.compare_and_append(batch(n, rows), n, n + 1)
        print(f"ACK {n}", flush=True)
        n += 1


if __name__ == "__main__":
    main()

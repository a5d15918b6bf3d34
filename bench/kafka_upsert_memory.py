"""Peak RSS of the Kafka upsert envelope's state at `--keys` distinct keys (target: 10M keys within 1 GiB).

Drives `connectors.kafka_upsert.UpsertState` (the part of `KafkaSource(envelope="upsert")`
whose size grows with the keys) directly, without a broker: `--keys` inserts of distinct
keys in batches of `--batch` (as the source applies consumed batches), then `--updates`
updates of existing keys and a tenth as many tombstones, each batch acknowledged (`ack`)
like a running flow's committed offsets. Rows: the source's row schema for
`{"id", "customer", "amount"}` with a text key. Prints the time, the state file size and
the process's peak RSS (ru_maxrss) after each phase.

    .venv/bin/python bench/kafka_upsert_memory.py                      # 10M keys
    .venv/bin/python bench/kafka_upsert_memory.py --keys 1000000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from connectors.kafka import KafkaSource  # noqa: E402
from connectors.kafka_upsert import UpsertState  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch(schema: pa.Schema, keys: pa.Array, first_offset: int, t: int, tomb_every: int = 0) -> tuple:
    n = len(keys)
    ks = pc.binary_join_element_wise(pa.scalar("k"), keys.cast(pa.string()), "")
    amount = pc.divide(keys.cast(pa.float64()), pa.scalar(10.0))
    rows = pa.table({"key": ks, "id": keys, "customer": pc.binary_join_element_wise(pa.scalar("c"), keys.cast(pa.string()), ""),
                     "amount": amount, "_time": pa.repeat(pa.scalar(t, pa.int64()), n)})
    rows = rows.cast(schema.append(pa.field("_time", pa.int64())))
    offs = pa.array(range(first_offset, first_offset + n), pa.int64())
    tomb = (pc.equal(pc.bit_wise_and(offs, pa.scalar(tomb_every - 1, pa.int64())), pa.scalar(0, pa.int64()))
            if tomb_every else pa.repeat(pa.scalar(False), n))
    return rows, ks.cast(pa.binary()), offs, tomb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--updates", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    args = ap.parse_args()
    schema = pa.schema([("id", pa.int64()), ("customer", pa.string()), ("amount", pa.float64())])
    src = KafkaSource("unused:9092", "orders", schema=schema, key_format="text", metadata=("key",),
                      envelope="upsert", upsert_state="unused")
    row_schema = src.row_schema()
    with tempfile.TemporaryDirectory(prefix="bench-upsert-") as tmp:
        st = UpsertState(tmp, "orders:0", row_schema, None)
        print(f"start: peak RSS {peak_mb():.0f} MiB; load {os.getloadavg()[0]:.1f}", flush=True)
        t0, off, out_rows = time.perf_counter(), 0, 0
        for lo in range(0, args.keys, args.batch):
            keys = pa.array(range(lo, min(lo + args.batch, args.keys)), pa.int64())
            rows, k, offs, tomb = batch(row_schema, keys, off, 1)
            out_rows += st.apply(rows, k, offs, tomb).num_rows
            off += len(keys)
            st.ack(off)
        size = os.path.getsize(st.path) / 2**20
        print(f"{args.keys:,} inserts: {time.perf_counter() - t0:.1f}s, {out_rows:,} updates out, state {size:.0f} MiB, "
              f"peak RSS {peak_mb():.0f} MiB", flush=True)
        t0, out_rows = time.perf_counter(), 0
        step = max(1, args.keys // max(1, args.updates))
        for lo in range(0, args.updates, args.batch):
            keys = pc.multiply(pa.array(range(lo, min(lo + args.batch, args.updates)), pa.int64()), pa.scalar(step))
            rows, k, offs, tomb = batch(row_schema, keys, off, 2, tomb_every=16)
            out_rows += st.apply(rows, k, offs, tomb).num_rows
            off += len(keys)
            st.ack(off)
        size = os.path.getsize(st.path) / 2**20
        print(f"{args.updates:,} updates (1/16 tombstones): {time.perf_counter() - t0:.1f}s, {out_rows:,} updates out, "
              f"state {size:.0f} MiB, peak RSS {peak_mb():.0f} MiB (target <= 1024 at 10M keys)", flush=True)
        st.close()


if __name__ == "__main__":
    main()

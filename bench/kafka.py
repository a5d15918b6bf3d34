"""Kafka -> collection vs a straight-line confluent-kafka consumer writing Parquet, same run, alternated.

Starts a tansu broker (tests/connectors/kafka_broker.py), produces `--records`
JSON records `{"id", "customer", "amount"}` with keys to a `--partitions`
topic (not timed), then alternates `--rounds` times:

- ours: `shardflow run` of a batch flow (`KafkaSource` json -> consolidate ->
  persist_sink) into a fresh data dir: a whole process, startup included;
- baseline: a whole process that assigns every partition from the start,
  `consume(num_messages=20000)` until the end offsets, decodes each batch's values
  with `pyarrow.json` over the joined lines, adds key/partition/offset/timestamp
  columns, and writes one Parquet file.

Both produce the same columns. Prints each round's seconds and the ratio baseline
time / ours time (our throughput relative to the baseline; target >= 0.5), then the
median and range of the per-round ratios.

    .venv/bin/python bench/kafka.py                       # 1M records, 3 rounds
    .venv/bin/python bench/kafka.py --records 200000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "connectors"))
sys.path.insert(0, ROOT)

FLOW = '''
import os
import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow
from connectors.kafka import KafkaSource
from flows.operators import consolidate

SCHEMA = pa.schema([("id", pa.int64()), ("customer", pa.string()), ("amount", pa.float64())])


def build(ctx):
    def src(**kw):
        return KafkaSource(os.environ["KAFKA_BOOTSTRAP"], os.environ["KAFKA_TOPIC"], schema=SCHEMA, mode=ctx.mode,
                           metadata=("key", "partition", "offset", "timestamp"), on_error="raise", name="orders", **kw)
    ctx.collection("orders", src().row_schema())
    flow = Dataflow("bench_kafka")
    s = src(resume=ctx.resume_offsets("orders"), resume_upper=ctx.upper("orders"))
    ctx.persist("sink", consolidate("cons", op.input("in", flow, s)), "orders")
    return flow
'''


def baseline(bootstrap: str, topic: str, out: str) -> None:
    """The straight-line consumer (runs in its own process)."""
    import io

    import pyarrow as pa
    import pyarrow.json as pajson
    import pyarrow.parquet as pq
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    schema = pa.schema([("id", pa.int64()), ("customer", pa.string()), ("amount", pa.float64())])
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench", "enable.auto.commit": False})
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    nxt = dict.fromkeys(parts, 0)
    tables = []
    po = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    while any(nxt[p] < ends[p] for p in parts):
        msgs = [m for m in c.consume(num_messages=20000, timeout=1.0) if m.error() is None]
        if not msgs:
            continue
        values = [m.value() for m in msgs]
        buf = b"\n".join(values)
        t = pajson.read_json(io.BytesIO(buf), read_options=pajson.ReadOptions(block_size=len(buf) + 1), parse_options=po)
        offs = [m.offset() for m in msgs]
        prts = [m.partition() for m in msgs]
        t = t.append_column("key", pa.array([m.key() for m in msgs], pa.binary()))
        t = t.append_column("partition", pa.array(prts, pa.int32()))
        t = t.append_column("offset", pa.array(offs, pa.int64()))
        t = t.append_column("timestamp", pa.array([m.timestamp()[1] for m in msgs], pa.int64()).cast(pa.timestamp("ms", tz="UTC")))
        tables.append(t)
        for p, o in zip(prts, offs, strict=True):
            nxt[p] = max(nxt[p], o + 1)
    c.close()
    pq.write_table(pa.concat_tables(tables), out)


def produce(broker, topic: str, n: int, partitions: int) -> None:  # type: ignore[no-untyped-def]
    p = broker.producer(**{"linger.ms": 20, "batch.num.messages": 10000, "queue.buffering.max.messages": 500000})
    for i in range(n - partitions):
        v = json.dumps({"id": i, "customer": f"c{i % 1000}", "amount": (i % 997) / 10})
        p.produce(topic, value=v.encode(), key=b"k%d" % (i % 1000), partition=i % partitions)
        if i % 10000 == 0:
            p.poll(0)
    assert p.flush(120) == 0
    # SUBTLE: tansu reports the high watermark as the last batch's base offset + 1: one last
    # record per partition in a batch of its own makes it exact, so both sides read everything.
    for j in range(partitions):
        broker.produce(topic, [json.dumps({"id": n - partitions + j, "customer": "c", "amount": 0}).encode()],
                       partition=j, keys=[b"last"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_child:
        baseline(*args.baseline_child)
        return
    from kafka_broker import KafkaBroker

    with KafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        broker.create_topic("orders", args.partitions)
        t0 = time.perf_counter()
        produce(broker, "orders", args.records, args.partitions)
        print(f"produced {args.records:,} records in {time.perf_counter() - t0:.1f}s; load {os.getloadavg()[0]:.1f}")
        flow = os.path.join(tmp, "flow.py")
        with open(flow, "w") as f:
            f.write(FLOW)
        env = {**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap, "KAFKA_TOPIC": "orders", "PYTHONPATH": ROOT}
        ratios = []
        for r in range(args.rounds):
            data = os.path.join(tmp, f"data{r}")
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "flows.cli", "run", flow, "--data", data, "--no-progress"],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
            ours = time.perf_counter() - t0
            assert res.returncode == 0, res.stderr
            q = subprocess.run([sys.executable, "-m", "flows.cli", "query", "--data", data, "--format", "csv",
                                "SELECT count(*) FROM orders"], cwd=ROOT, capture_output=True, text=True)
            assert q.stdout.split()[-1] == str(args.records), q.stdout + q.stderr
            shutil.rmtree(data)
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--baseline-child", broker.bootstrap,
                                  "orders", os.path.join(tmp, "base.parquet")], cwd=ROOT, env=env,
                                 capture_output=True, text=True)
            base = time.perf_counter() - t0
            assert res.returncode == 0, res.stderr
            ratios.append(base / ours)
            print(f"round {r + 1}: ours {ours:.2f}s ({args.records / ours:,.0f} rec/s), baseline {base:.2f}s "
                  f"({args.records / base:,.0f} rec/s), ratio {base / ours:.2f}; load {os.getloadavg()[0]:.1f}",
                  flush=True)
        print(f"ratio (baseline time / ours) median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds (target >= 0.5)")


if __name__ == "__main__":
    main()

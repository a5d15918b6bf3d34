"""KafkaSource against a real Kafka-protocol broker (tansu, started by the `kafka_broker` fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main
from kafka_broker import KafkaBroker

from connectors.files import ErrorBatch
from connectors.kafka import KafkaSource, KafkaSourceError
from storage import Progress, UpdateBatch

ROOT = Path(__file__).resolve().parents[2]
FLOW = str(ROOT / "tests" / "connectors" / "kafka_flow.py")
SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def topic(broker: KafkaBroker, partitions: int = 1) -> str:
    name = f"t{uuid.uuid4().hex[:10]}"
    broker.create_topic(name, partitions)
    return name


def rec(i: int) -> bytes:
    return json.dumps({"id": i, "name": f"n{i}"}).encode()


def run(src: KafkaSource) -> list[Any]:
    flow, out = Dataflow("k"), []
    op.output("out", op.input("in", flow, src), TestingSink(out))
    run_main(flow)
    return out


def root(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def data_rows(items: list[Any]) -> list[dict[str, Any]]:
    return [r for x in items if type(x) is UpdateBatch for r in x.table.to_pylist()]


def shardflow(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def query(data: Path, sql: str, *, check: bool = True) -> list[str]:
    r = shardflow("query", "--data", str(data), "--format", "csv", sql)
    assert r.returncode == 0 or not check, r.stderr
    return r.stdout.split("\n")[1:-1]


def test_batch_reads_to_the_end_with_metadata_offsets_and_one_time(kafka_broker: KafkaBroker) -> None:
    t = topic(kafka_broker, 2)
    kafka_broker.produce(t, [rec(i) for i in range(5)], partition=0, keys=[b"k%d" % i for i in range(5)],
                         headers=[[("h", b"v")]] * 5, timestamps=[1000 + i for i in range(5)])
    kafka_broker.produce(t, [rec(i) for i in range(5, 8)], partition=1)
    src = KafkaSource(kafka_broker.bootstrap, t, schema=SCHEMA, mode="batch", name="o")
    assert src.row_schema().names == ["key", "id", "name", "headers", "topic", "partition", "offset", "timestamp"]
    out = run(src)
    rows = data_rows(out)
    assert sorted(r["id"] for r in rows) == list(range(8))
    r0 = next(r for r in rows if r["id"] == 0)
    assert r0["key"] == b"k0" and r0["headers"] == [{"key": "h", "value": b"v"}]
    assert r0["topic"] == t and r0["partition"] == 0 and r0["offset"] == 0
    assert r0["timestamp"].timestamp() == 1.0
    assert {r["_time"] for r in rows} == {0} and {r["_diff"] for r in rows} == {1}
    last = {x.partition: x.frontier.time for x in out if isinstance(x, Progress)}
    assert last == {f"o/{t}:0": 1, f"o/{t}:1": 1}
    offs = {k: v for x in out if type(x) is UpdateBatch for k, v in (x.offsets or {}).items()}
    assert offs == {f"o/{t}:0": {f"{t}:0": 5}, f"o/{t}:1": {f"{t}:1": 3}}
    # Resumed after those offsets: only the new records, at the shard's upper.
    kafka_broker.produce(t, [rec(9)], partition=1)
    from storage import Frontier
    again = run(KafkaSource(kafka_broker.bootstrap, t, schema=SCHEMA, mode="batch", name="o",
                            resume=offs, resume_upper=Frontier(1)))
    assert [(r["id"], r["offset"], r["_time"]) for r in data_rows(again)] == [(9, 3, 1)]


def test_formats_and_bad_records_go_to_errors(kafka_broker: KafkaBroker) -> None:
    t = topic(kafka_broker)
    vals = [rec(1), b"{not json", b'{"id": "x"}', None, b'{\n "id": 5,\n "name": "m"}', b"\xff\xfe", b'{"id": 6, "name": "\xff"}']
    kafka_broker.produce(t, vals)
    out = run(KafkaSource(kafka_broker.bootstrap, t, schema=SCHEMA, mode="batch", metadata=("offset",)))
    assert [(r["id"], r["name"], r["offset"]) for r in data_rows(out)] == [(1, "n1", 0), (5, "m", 4)]
    errs = [r for x in out if isinstance(x, ErrorBatch) for r in x.table.to_pylist()]
    assert [e["offset"] for e in errs] == [1, 2, 3, 5, 6]
    assert errs[2]["error"] == "value is null" and errs[0]["value"] == b"{not json"
    text = run(KafkaSource(kafka_broker.bootstrap, t, format="text", mode="batch", metadata=()))
    assert [r["value"] for r in data_rows(text)][:2] == ["{\"id\": 1, \"name\": \"n1\"}", "{not json"]
    assert [r["offset"] for x in text if isinstance(x, ErrorBatch) for r in x.table.to_pylist()] == [5, 6]
    raw = run(KafkaSource(kafka_broker.bootstrap, t, format="bytes", mode="batch", metadata=()))
    assert [r["value"] for r in data_rows(raw)] == vals
    with pytest.raises(Exception) as ei:
        run(KafkaSource(kafka_broker.bootstrap, t, schema=SCHEMA, mode="batch", on_error="raise"))
    assert isinstance(root(ei.value), KafkaSourceError)
    assert f"record {t}:0 offset 1: JSON parse error" in str(root(ei.value))


def test_bad_setups_are_one_line(kafka_broker: KafkaBroker) -> None:
    with pytest.raises(KafkaSourceError, match=r"topic 'nope' not found on 127\.0\.0\.1:\d+"):
        KafkaSource(kafka_broker.bootstrap, "nope", format="bytes").check()
    with pytest.raises(KafkaSourceError, match=r"broker 127\.0\.0\.1:1 not reachable within 0\.5s"):
        KafkaSource("127.0.0.1:1", "x", format="bytes", connect_timeout=0.5).check()
    r = shardflow("run", FLOW, "--data", "/nonexistent-never/x", env={"KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
                                                                      "KAFKA_TOPIC": "nope"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "topic 'nope' not found" in lines[0], r.stderr


def test_cli_batch_end_to_end_and_rerun(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    t = topic(kafka_broker, 2)
    env = {"KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "KAFKA_TOPIC": t}
    kafka_broker.produce(t, [rec(i) for i in range(0, 20, 2)], partition=0, keys=[b"a"] * 10)
    kafka_broker.produce(t, [rec(i) for i in range(1, 20, 2)] + [b"bad"], partition=1)
    for workers in ("2", "1"):  # partitions spread over two workers; the rerun reads nothing again
        r = shardflow("run", FLOW, "--data", str(tmp_path), "-w", workers, env=env)
        assert r.returncode == 0, r.stderr
    got = query(tmp_path, "SELECT 1, id FROM rows UNION ALL "
                          "SELECT 0, \"offset\" FROM rows_errors WHERE error LIKE 'JSON parse error%' ORDER BY ALL")
    assert got == ["0,10"] + [f"1,{i}" for i in range(20)]


def test_cli_continuous_end_to_end(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    t = topic(kafka_broker, 2)
    env = {"KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "KAFKA_TOPIC": t}
    kafka_broker.produce(t, [rec(0)], partition=0)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", FLOW, "--data", str(tmp_path),
                             "--mode", "continuous", "--no-progress"], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kafka_broker.produce(t, [rec(i) for i in range(1, 20)], partition=0)
        kafka_broker.produce(t, [rec(i) for i in range(20, 40)], partition=1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and query(tmp_path, "SELECT count(*) FROM rows", check=False) != ["40"]:
            time.sleep(0.2)
    finally:
        proc.terminate()  # SIGTERM: final progress, flush, exit 0
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert query(tmp_path, "SELECT id, partition FROM rows ORDER BY id") == [
        f"{i},{0 if i < 20 else 1}" for i in range(40)]


def test_examples_kafka_orders_and_export(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    t = topic(kafka_broker)
    out, progress = topic(kafka_broker), topic(kafka_broker)
    orders = [{"id": 1, "customer": "a", "amount": 2.5}, {"id": 2, "customer": "b", "amount": 1.0},
              {"id": 1, "customer": "a", "amount": 3.0}]
    kafka_broker.produce(t, [json.dumps(o).encode() for o in orders] + [None], keys=[b"1", b"2", b"1", b"2"])
    env = {"KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "KAFKA_TOPIC": t, "ORDERS_ENVELOPE": "upsert",
           "KAFKA_EXPORT_TOPIC": out, "KAFKA_PROGRESS_TOPIC": progress}
    for example in ("kafka_orders.py", "kafka_export.py"):
        r = shardflow("run", str(ROOT / "examples" / example), "--data", str(tmp_path), env=env)
        assert r.returncode == 0, r.stderr
    assert query(tmp_path, "SELECT key, id, amount FROM orders") == ['"1",1,3']
    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": "t"})
    c.assign([TopicPartition(out, 0, OFFSET_BEGINNING)])
    msgs: list[Any] = []
    for _ in range(5):
        msgs += [json.loads(m.value()) for m in c.consume(100, 0.3) if m.error() is None]
    c.close()
    assert [(m["after"] or {}).get("amount") for m in msgs] == [3.0] and msgs[0]["_diff"] == 1


def test_broker_gone_mid_run_stops_a_continuous_job_with_one_line(tmp_path: Path) -> None:
    with KafkaBroker() as broker:  # its own broker: this test kills it
        t = topic(broker)
        broker.produce(t, [rec(1)])
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", FLOW, "--data", str(tmp_path),
                                 "--mode", "continuous", "--no-progress"], cwd=ROOT,
                                env={**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap, "KAFKA_TOPIC": t,
                                     "KAFKA_CONNECT_TIMEOUT": "2", "KAFKA_DISCOVER_INTERVAL": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and query(tmp_path, "SELECT count(*) FROM rows", check=False) != ["1"]:
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            raise
    # The broker is gone (killed by its pid); the job notices within its connect timeout (2 s).
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "not reachable within 2s" in lines[0] and "Traceback" not in err, err
    assert query(tmp_path, "SELECT id FROM rows") == ["1"]



def test_continuous_batches_commit_whole_at_one_time_from_timestamps(kafka_broker: KafkaBroker) -> None:
    """Each offset-carrying batch is at one time (the largest record timestamp, never below the
    frontier): a batch spread over times could be committed in part without its offsets."""
    import threading

    from connectors.base import request_stop, reset_stop

    t = topic(kafka_broker, 2)
    now = int(time.time() * 1000)
    # One producer batch (continuous mode does not need the watermark), so one consume gets them all.
    p = kafka_broker.producer(**{"linger.ms": 200, "batch.num.messages": 100})
    for i in range(6):
        p.produce(t, value=rec(i), partition=0, timestamp=now + 60_000 + 1000 * i)  # ahead of the idle ticks
    assert p.flush(30) == 0
    kafka_broker.produce(t, [rec(9)], partition=1, timestamps=[now - 60_000])  # older than its frontier: raised
    src = KafkaSource(kafka_broker.bootstrap, t, schema=SCHEMA, mode="continuous", name="c", tick=0.05,
                      metadata=("partition", "timestamp"))
    flow, out = Dataflow("k"), []
    op.output("out", op.input("in", flow, src), TestingSink(out))
    reset_stop()
    th = threading.Thread(target=run_main, args=(flow,), daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(data_rows(list(out))) < 7:
            time.sleep(0.05)
    finally:
        request_stop()
        th.join(30)
        reset_stop()
    batches = [x for x in out if type(x) is UpdateBatch and x.table.num_rows]
    assert sorted(r["id"] for r in data_rows(batches)) == [0, 1, 2, 3, 4, 5, 9]
    frontier: dict[str, int] = {}
    for x in out:
        if isinstance(x, Progress):
            assert x.frontier.time is not None and x.frontier.time >= frontier.get(x.partition or "", 0)
            frontier[x.partition or ""] = x.frontier.time
        elif type(x) is UpdateBatch and x.table.num_rows:
            rows = x.table.to_pylist()
            times = {r["_time"] for r in rows}
            assert len(times) == 1, f"a batch with offsets {x.offsets} spans times {sorted(times)}"
            (key,) = x.offsets or {}
            stamps = [int(r["timestamp"].timestamp() * 1000) for r in rows]
            assert times == {max(max(stamps), frontier.get(key, 0))}


def test_resume_finds_a_partition_offset_under_its_previous_owner(kafka_broker: KafkaBroker) -> None:
    """A partition added while a job ran was read by another source partition (`q % n`); after a
    restart it is its own source partition and resumes from the offset stored under that key."""
    t = topic(kafka_broker, 2)
    kafka_broker.produce(t, [rec(i) for i in range(4)], partition=1)
    resume = {f"o/{t}:0": {f"{t}:0": 0, f"{t}:1": 3}}  # t:1 was read, up to offset 2, by o/t:0's partition
    out = run(KafkaSource(kafka_broker.bootstrap, t, schema=SCHEMA, mode="batch", name="o", resume=resume,
                          metadata=("partition", "offset")))
    assert [(r["partition"], r["offset"], r["id"]) for r in data_rows(out)] == [(1, 3, 3)]

"""SIGKILL a continuous Kafka source job at random moments while records arrive; the
collection ends equal to the produced records: none lost, none doubled."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kafka_broker import KafkaBroker

ROOT = Path(__file__).resolve().parents[2]
FLOW = str(ROOT / "tests" / "connectors" / "kafka_flow.py")
CLI = [sys.executable, "-m", "flows.cli"]


def _rec(i: int) -> bytes:
    return json.dumps({"id": i, "name": f"n{i}"}).encode()


KEYS = 37


def key_of(i: int) -> bytes:
    return b"k%02d" % (i % KEYS)


def partition_of(i: int, envelope: str) -> int:
    return (i % KEYS) % 2 if envelope == "upsert" else i % 2


def value_of(i: int, envelope: str) -> bytes | None:
    return None if envelope == "upsert" and i % 13 == 12 else _rec(i)


def kill_loop(broker: KafkaBroker, data: Path, *, trials: int, records: int, seed: int, envelope: str = "append") -> None:
    rng = random.Random(seed)
    t = f"k{uuid.uuid4().hex[:10]}"
    broker.create_topic(t, 2)
    env = {**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap, "KAFKA_TOPIC": t, "KAFKA_ENVELOPE": envelope,
           "KAFKA_STATE": str(data / "upsert_state")}
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            p = broker.producer()
            for i in range(records):
                p.produce(t, value=value_of(i, envelope), key=key_of(i), partition=partition_of(i, envelope))
                p.poll(0)
                time.sleep(0.002 if i % 20 else 0.05)
            assert p.flush(30) == 0
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failed.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    for _ in range(trials):
        proc = subprocess.Popen([*CLI, "run", FLOW, "--data", str(data), "--mode", "continuous", "--no-progress"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.0, 4.0))  # startup, consuming, committing: any of them
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    producer.join(120)
    assert not failed, failed
    # Finish: a batch run reads to the end offsets and stops.
    r = subprocess.run([*CLI, "run", FLOW, "--data", str(data), "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    q = subprocess.run([*CLI, "query", "--data", str(data), "--format", "csv",
                        'SELECT id, partition, "offset" FROM rows ORDER BY id'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stderr
    rows = [tuple(int(x) for x in line.split(",")) for line in q.stdout.split()[1:]]
    if envelope == "upsert":  # the last record of each key, unless it was a tombstone
        last = {key_of(i): i for i in range(records)}
        want = sorted(i for i in last.values() if value_of(i, envelope) is not None)
        assert [r[0] for r in rows] == want, f"upsert state wrong after kills (seed {seed})"
        return
    assert [r[0] for r in rows] == list(range(records)), f"a record lost or doubled (seed {seed})"
    assert [(r[1], r[2]) for r in rows] == [(i % 2, i // 2) for i in range(records)]


def test_sigkill_continuous_kafka_job_is_exact(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    kill_loop(kafka_broker, tmp_path, trials=2, records=400, seed=int(time.time()))


@pytest.mark.slow
def test_sigkill_continuous_kafka_job_is_exact_many_times(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    kill_loop(kafka_broker, tmp_path, trials=12, records=3000, seed=int(time.time()))


@pytest.mark.slow  # the upsert rollback has a deterministic default test (test_kafka_upsert)
def test_sigkill_continuous_kafka_upsert_job_is_exact(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    kill_loop(kafka_broker, tmp_path, trials=2, records=400, seed=int(time.time()), envelope="upsert")


@pytest.mark.slow
def test_sigkill_continuous_kafka_upsert_job_is_exact_many_times(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    kill_loop(kafka_broker, tmp_path, trials=12, records=3000, seed=int(time.time()), envelope="upsert")

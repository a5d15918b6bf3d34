"""kafka_sink: a collection's changes to a topic in transactions with progress records; resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka_broker import KafkaBroker

ROOT = Path(__file__).resolve().parents[2]
EXPORT = str(ROOT / "tests" / "connectors" / "kafka_export_flow.py")
COUNTER = str(ROOT / "tests" / "flows" / "loadgen_counter_flow.py")
CLI = [sys.executable, "-m", "flows.cli"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


def read_topic(broker: KafkaBroker, topic: str) -> list[Any]:
    """Every committed message of `topic` (read_committed), as decoded JSON values."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "t", "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    try:
        tp = TopicPartition(topic, 0)
        _lo, end = c.get_watermark_offsets(tp, timeout=10)
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        out: list[Any] = []
        deadline = time.monotonic() + 60
        # To the end: past the watermark (tansu's is the last batch's base offset + 1), then one empty poll.
        while time.monotonic() < deadline:
            msgs = c.consume(10000, timeout=0.25)
            out += [json.loads(m.value()) for m in msgs if m.error() is None]
            pos = c.position([tp])[0].offset
            if not msgs and (end == 0 or pos >= end):
                return out
        raise AssertionError(f"{topic} not read to its end ({end}) within 60s")
    finally:
        c.close()


def setup(broker: KafkaBroker) -> dict[str, str]:
    out, progress = f"o{uuid.uuid4().hex[:8]}", f"p{uuid.uuid4().hex[:8]}"
    broker.create_topic(out)
    broker.create_topic(progress)
    return {"KAFKA_BOOTSTRAP": broker.bootstrap, "KAFKA_OUT": out, "KAFKA_PROGRESS": progress}


def counters(data: Path, *, check: bool = True) -> list[int]:
    r = cli("query", "--data", str(data), "--format", "csv", "SELECT counter FROM counter ORDER BY 1")
    assert r.returncode == 0 or not check, r.stderr
    return [int(x) for x in r.stdout.split()[1:]]


def check_exported(broker: KafkaBroker, env: dict[str, str], want: list[int]) -> None:
    progress = read_topic(broker, env["KAFKA_PROGRESS"])
    # The consumer rule of kafka_sink: a message counts if a progress record names its `_txn`
    # (tansu shows aborted transactions even to read_committed consumers).
    txns = {m["txn"] for m in progress}
    msgs = [m for m in read_topic(broker, env["KAFKA_OUT"]) if m["_txn"] in txns]
    uppers = [m["upper"] for m in progress]
    assert uppers == sorted(uppers) and len(set(uppers)) == len(uppers), "progress went back or repeated"
    assert all(m["before"] is None and m["_diff"] == 1 and m["_time"] < uppers[-1] for m in msgs)
    got = sorted(m["after"]["counter"] for m in msgs)
    assert got == want, "an update lost or doubled in the topic"


def test_export_batch_then_resume(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    env = setup(kafka_broker)
    assert cli("run", COUNTER, "--data", str(tmp_path), env={"COUNTER_TICKS": "5"}).returncode == 0
    r = cli("run", EXPORT, "--data", str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    check_exported(kafka_broker, env, list(range(1, 51)))
    assert cli("run", COUNTER, "--data", str(tmp_path), env={"COUNTER_TICKS": "8"}).returncode == 0
    r = cli("run", EXPORT, "--data", str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    check_exported(kafka_broker, env, list(range(1, 81)))
    # The durable hold follows the export's progress: since = last upper - 1.
    last = read_topic(kafka_broker, env["KAFKA_PROGRESS"])[-1]["upper"]
    r = cli("holds", "list", "--data", str(tmp_path))
    held = [ln.split() for ln in r.stdout.splitlines() if f"kafka-export:{env['KAFKA_OUT']}" in ln]
    assert [(h[0], h[3], h[-1]) for h in held] == [("counter", str(last - 1), "durable")], r.stdout


def kill_loop(broker: KafkaBroker, data: Path, *, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    env = setup(broker)
    counter = subprocess.Popen([*CLI, "run", COUNTER, "--data", str(data), "--mode", "continuous", "--no-progress"],
                               cwd=ROOT, env={**os.environ, "COUNTER_RATE": "20"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not counters(data, check=False):
            time.sleep(0.2)  # the counter flow is up and has committed (its SIGTERM handler is in place)
        for _ in range(trials):
            proc = subprocess.Popen([*CLI, "run", EXPORT, "--data", str(data), "--mode", "continuous", "--no-progress"],
                                    cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            time.sleep(rng.uniform(1.0, 4.0))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        counter.terminate()
        _out, err = counter.communicate(timeout=60)
    assert counter.returncode == 0, err
    r = cli("run", EXPORT, "--data", str(data), env=env)  # batch: up to the counter's final upper
    assert r.returncode == 0, r.stderr
    want = counters(data)
    assert want == list(range(1, len(want) + 1)) and want
    check_exported(broker, env, want)


@pytest.mark.slow
def test_sigkill_export_is_exact_many_times(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    kill_loop(kafka_broker, tmp_path, trials=10, seed=int(time.time()))

"""KafkaSource's upsert envelope: retractions from DuckDB state on disk, rolled back to the committed offsets."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main
from kafka_broker import KafkaBroker

from connectors.files import ErrorBatch
from connectors.kafka import KafkaSource
from storage import Frontier, UpdateBatch

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def run(src: KafkaSource) -> list[Any]:
    flow, out = Dataflow("k"), []
    op.output("out", op.input("in", flow, src), TestingSink(out))
    run_main(flow)
    return out


def updates(items: list[Any]) -> list[tuple[str, int, int, int]]:
    return sorted((r["key"], r["id"], r["_time"], r["_diff"])
                  for x in items if type(x) is UpdateBatch for r in x.table.to_pylist())


def contents(items: list[Any]) -> dict[tuple[str, int], int]:
    c: Counter[tuple[str, int]] = Counter()
    for k, i, _t, d in updates(items):
        c[(k, i)] += d
    return {k: v for k, v in c.items() if v}


def offsets(items: list[Any]) -> dict[str, Any]:
    return {k: v for x in items if type(x) is UpdateBatch for k, v in (x.offsets or {}).items()}


def source(broker: KafkaBroker, t: str, state: Path, **kw: Any) -> KafkaSource:
    return KafkaSource(broker.bootstrap, t, schema=SCHEMA, key_format="text", metadata=("key",),
                       envelope="upsert", upsert_state=str(state), mode="batch", name="u", **kw)


def produce(broker: KafkaBroker, t: str, recs: list[tuple[bytes | None, dict[str, Any] | None]]) -> None:
    broker.produce(t, [None if v is None else json.dumps(v).encode() for _, v in recs], keys=[k for k, _ in recs])


def test_upsert_retracts_previous_values_and_tombstones_delete(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    t = f"u{uuid.uuid4().hex[:10]}"
    kafka_broker.create_topic(t)
    produce(kafka_broker, t, [(b"a", {"id": 1}), (b"b", {"id": 2}), (b"a", {"id": 3}), (b"b", None),
                              (None, {"id": 9}), (b"c", {"id": 4})])
    out = run(source(kafka_broker, t, tmp_path))
    assert contents(out) == {("a", 3): 1, ("c", 4): 1}
    assert [r["error"] for x in out if isinstance(x, ErrorBatch) for r in x.table.to_pylist()] == [
        "upsert record without a key"]
    # The next run (offsets committed, upper 1) retracts from the state kept on disk.
    produce(kafka_broker, t, [(b"a", {"id": 5}), (b"c", None), (b"b", {"id": 6})])
    again = run(source(kafka_broker, t, tmp_path, resume=offsets(out), resume_upper=Frontier(1)))
    assert updates(again) == [("a", 3, 1, -1), ("a", 5, 1, 1), ("b", 6, 1, 1), ("c", 4, 1, -1)]


def test_upsert_state_rolls_back_what_was_never_committed(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    t = f"u{uuid.uuid4().hex[:10]}"
    kafka_broker.create_topic(t)
    produce(kafka_broker, t, [(b"a", {"id": 1}), (b"b", {"id": 2})])
    first = run(source(kafka_broker, t, tmp_path))
    produce(kafka_broker, t, [(b"a", {"id": 3})])
    # A run whose offsets never became durable (killed before its commit) ...
    lost = run(source(kafka_broker, t, tmp_path, resume=offsets(first), resume_upper=Frontier(1)))
    assert updates(lost) == [("a", 1, 1, -1), ("a", 3, 1, 1)]
    # ... leaves no trace: the rerun from the committed offsets retracts id 1 again, not id 3.
    rerun = run(source(kafka_broker, t, tmp_path, resume=offsets(first), resume_upper=Frontier(1)))
    assert updates(rerun) == updates(lost)
    # And from scratch (nothing committed at all): no retraction of anything.
    fresh = run(source(kafka_broker, t, tmp_path))
    assert contents(fresh) == {("a", 3): 1, ("b", 2): 1}

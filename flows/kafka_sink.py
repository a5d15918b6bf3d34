"""`kafka_sink`: write a collection's changes to a Kafka topic, exactly once, with progress records.

Needs the `kafka` extra (`confluent-kafka`).

Messages (the *before/after* envelope): each update `(row, time, diff)` is one
message on `topic` whose value is the JSON object

    {"before": null, "after": {<row>}, "_time": 17, "_diff": 1, "_txn": "<run>-<n>"}    # diff > 0
    {"before": {<row>}, "after": null, "_time": 17, "_diff": -1, "_txn": "<run>-<n>"}   # diff < 0

(`_diff` keeps its count: an update of diff 2 is one message, not two). The
message key is the JSON of the `key` columns when given (so one row's changes stay
in one partition, in order), else none. Binary values appear as JSON strings
(DuckDB's `to_json`).

Progress: after the updates of all times `< U` are written and acknowledged, the
record `{"topic": <topic>, "upper": U, "txn": "<run>-<n>"}` goes to
`progress_topic` (key: the topic name): all times below `U` are final. `_txn`
names the write (one per frontier step) that a message belongs to.

Exactly once (transactional, the default): the updates of a whole frontier step
`[lower, U)` and the progress record `U` are produced in **one Kafka
transaction** (`transactional_id`, stable across restarts of the same export).
A restart resumes from the last progress record (`export_resume_upper`) and its
producer fences the previous one (`init_transactions` aborts its open
transaction). Guarantees:

- on a broker that hides aborted transactions from `isolation.level=read_committed`
  consumers (Apache Kafka; librdkafka's default isolation), such consumers see
  every update exactly once, no gap, no duplicate;
- on any broker, with or without transactions (`transactional_id=""`: an
  idempotent producer only): a consumer that keeps a message only if a progress
  record carries its `_txn` sees every update exactly once. The updates of a
  step killed before its progress record are written again by the next run
  under another `_txn`; the ones of a step whose progress record is visible are
  all there (they were acknowledged first) and are not written again. tansu
  v0.6, the test broker, shows aborted transactions to read_committed
  consumers, so the tests read this way.

Holds: `hold` (a critical since handle on the input collection's shard, e.g.
`client.open_critical_since(shard, "kafka-export:<topic>", "kafka-export")`) is
downgraded to `U - 1` after each commit, so compaction never passes the point a
restarted export resumes from, however long it is down.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic

from storage import DIFF, TIME, Progress, SinceHandle, UpdateBatch
from storage.errors import ShardflowError

from .operators import FrontierTracker, check_item, one_key

__all__ = ["KafkaSinkError", "export_resume_upper", "kafka_sink"]


class KafkaSinkError(ShardflowError):
    """The broker refused a write, a transaction, or the progress topic is unreadable."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def export_resume_upper(
    bootstrap: str,
    progress_topic: str,
    topic: str,
    *,
    transactional_id: str | None = None,
    config: Mapping[str, Any] | None = None,
    timeout: float = 10.0,
) -> int | None:
    """The `upper` of the last committed progress record for `topic` (None: nothing exported yet).

    First fences the export's previous producer (`init_transactions` with the same
    `transactional_id`, default as `kafka_sink`'s; `""` skips this): its open
    transaction, if a kill left one, is aborted instead of holding back
    read_committed reads of the progress topic until the transaction times out.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

    if transactional_id != "":
        fence = Producer({"bootstrap.servers": bootstrap, "log.connection.close": False, **(config or {}),
                          "transactional.id": transactional_id or f"shardflow-export-{topic}"})
        try:
            fence.init_transactions(timeout)
        except KafkaException as e:
            raise KafkaSinkError(f"kafka_sink: init_transactions on {bootstrap} failed within {timeout:g}s ({e})") from None

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"shardflow-export-{topic}",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "log.connection.close": False, **(config or {})})
    try:
        try:
            md = c.list_topics(progress_topic, timeout=timeout)
        except KafkaException as e:
            raise KafkaSinkError(f"kafka_sink: broker {bootstrap} not reachable within {timeout:g}s ({e})") from None
        tm = md.topics.get(progress_topic)
        if tm is None or tm.error is not None or not tm.partitions:
            raise KafkaSinkError(f"kafka_sink: progress topic {progress_topic!r} not found on {bootstrap}")
        best: int | None = None
        tps = [TopicPartition(progress_topic, p, OFFSET_BEGINNING) for p in sorted(tm.partitions)]
        ends = {}
        for tp in tps:
            _lo, hi = c.get_watermark_offsets(TopicPartition(progress_topic, tp.partition), timeout=timeout)
            ends[tp.partition] = hi
        c.assign(tps)
        # Read to the end: until every partition's position passed its watermark and a poll is empty.
        # (Not the watermark alone: tansu reports it as the last batch's base offset + 1.)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = c.consume(1000, timeout=0.3)
            for m in msgs:
                err, value = m.error(), m.value()
                if err is not None:
                    raise KafkaSinkError(f"kafka_sink: reading {progress_topic!r}: {err.str()}")
                if m.key() == topic.encode() and value is not None:
                    u = int(json.loads(value)["upper"])
                    best = u if best is None else max(best, u)
            if not msgs:
                pos = {tp.partition: tp.offset for tp in c.position([TopicPartition(progress_topic, p) for p in ends])}
                if all(ends[p] <= 0 or (pos[p] is not None and pos[p] >= ends[p]) for p in ends):
                    return best
        raise KafkaSinkError(f"kafka_sink: progress topic {progress_topic!r} not read to its end within {timeout:g}s")
    finally:
        c.close()


class _KafkaSinkLogic(StatefulBatchLogic[Any, int, None]):
    def __init__(self, step_id: str, conf: dict[str, Any], topic: str, progress_topic: str, key: Sequence[str],
                 transactional: bool, hold: SinceHandle | None, resume_upper: int | None) -> None:
        from confluent_kafka import Producer

        self.step_id = step_id
        self.topic = topic
        self.progress_topic = progress_topic
        self.key = list(key)
        self.transactional = transactional
        self.hold = hold
        self.tracker = FrontierTracker()
        self.pending: list[pa.Table] = []
        self.emitted: int | None = resume_upper
        self.producer = Producer(conf)
        self.con = duckdb.connect()
        self.failed: list[str] = []
        self.run = uuid.uuid4().hex[:12]  # names this run's transactions: `_txn` = "<run>-<seq>"
        self.seq = 0
        if transactional:
            try:
                self.producer.init_transactions(30)
            except Exception as e:  # noqa: BLE001 - KafkaException: one line
                raise KafkaSinkError(f"kafka_sink {step_id!r}: init_transactions failed: {e}") from None

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed.append(str(err))

    def on_batch(self, values: list[Any]) -> tuple[Iterable[int], bool]:
        for v in values:
            check_item(self.step_id, v)
            if isinstance(v, Progress):
                self.tracker.observe(v)
            elif isinstance(v, UpdateBatch) and v.table.num_rows:
                self.pending.append(v.table)
        f = self.tracker.frontier()
        if f is None or f.time is None or (self.emitted is not None and f.time <= self.emitted):
            return [], StatefulBatchLogic.RETAIN
        return self._flush(f.time), StatefulBatchLogic.RETAIN

    def _encode(self, t: pa.Table, txn: str) -> tuple[list[str], list[str] | None]:
        cols = [n for n in t.schema.names if n not in (TIME, DIFF)]
        row = "struct_pack(" + ", ".join(f"{_q(c)} := {_q(c)}" for c in cols) + ")"
        key = ("to_json(struct_pack(" + ", ".join(f"{_q(c)} := {_q(c)}" for c in self.key) + "))::VARCHAR"
               if self.key else "NULL")
        self.con.register("__t", t)
        try:
            out = self.con.sql(
                f"SELECT to_json({{'before': CASE WHEN _diff < 0 THEN {row} END, "
                f"'after': CASE WHEN _diff > 0 THEN {row} END, '_time': _time, '_diff': _diff, '_txn': '{txn}'}})::VARCHAR AS v, "
                f"{key} AS k FROM __t ORDER BY _time"
            ).to_arrow_table()
        finally:
            self.con.unregister("__t")
        return out.column("v").to_pylist(), (out.column("k").to_pylist() if self.key else None)

    def _flush(self, upper: int) -> list[int]:
        lower = self.emitted
        ready, keep = [], []
        ut = pa.scalar(upper, pa.int64())
        for t in self.pending:
            below = pc.less(t.column(TIME), ut)
            ready.append(t.filter(below))
            rest = t.filter(pc.invert(below))
            if rest.num_rows:
                keep.append(rest)
        self.pending = keep
        if lower is not None:  # a resumed export: times below its progress were written before
            ready = [t.filter(pc.greater_equal(t.column(TIME), pa.scalar(lower, pa.int64()))) for t in ready]
        ready = [t for t in ready if t.num_rows]
        p = self.producer
        self.seq += 1
        txn = f"{self.run}-{self.seq}"
        try:
            if self.transactional:
                p.begin_transaction()
            if ready:
                values, keys = self._encode(pa.concat_tables(ready) if len(ready) > 1 else ready[0], txn)
                produce, topic, cb = p.produce, self.topic, self._delivered
                if keys is None:
                    for i, v in enumerate(values):
                        produce(topic, value=v, on_delivery=cb)
                        if i % 10000 == 9999:
                            p.poll(0)
                else:
                    for i, (v, k) in enumerate(zip(values, keys, strict=True)):
                        produce(topic, value=v, key=k, on_delivery=cb)
                        if i % 10000 == 9999:
                            p.poll(0)
                # SUBTLE: every update is acknowledged before its progress record is sent, so a
                # visible progress record implies its updates are all there, even on a broker
                # that shows aborted transactions (tansu v0.6) or without transactions.
                if p.flush(60):
                    raise KafkaSinkError(f"kafka_sink {self.step_id!r}: messages not delivered within 60s")
                if self.failed:
                    raise KafkaSinkError(f"kafka_sink {self.step_id!r}: {len(self.failed)} messages failed: {self.failed[0]}")
            p.produce(self.progress_topic, key=self.topic,
                      value=json.dumps({"topic": self.topic, "upper": upper, "txn": txn}), on_delivery=self._delivered)
            if self.transactional:
                p.commit_transaction(60)
            elif p.flush(60):
                raise KafkaSinkError(f"kafka_sink {self.step_id!r}: messages not delivered within 60s")
        except KafkaSinkError:
            raise
        except Exception as e:  # noqa: BLE001 - KafkaException: one line
            raise KafkaSinkError(f"kafka_sink {self.step_id!r}: writing [{lower}, {upper}) to {self.topic!r} failed: {e}") from None
        if self.failed:
            raise KafkaSinkError(f"kafka_sink {self.step_id!r}: {len(self.failed)} messages failed: {self.failed[0]}")
        self.emitted = upper
        if self.hold is not None:
            try:
                self.hold.compare_and_downgrade_since(self.hold.opaque, (self.hold.opaque, upper - 1))
            except Exception:  # noqa: BLE001, S110 - a hold is best effort here; the next commit retries
                pass
        return [upper]

    def on_eof(self) -> tuple[Iterable[int], bool]:
        return [], StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        return None


@operator
def kafka_sink(
    step_id: str,
    up: Stream[Any],
    bootstrap: str,
    topic: str,
    *,
    progress_topic: str,
    transactional_id: str | None = None,
    key: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    hold: SinceHandle | None = None,
    resume_upper: int | None = None,
) -> Stream[int]:
    """Write the updates of `up` to `topic`, with progress records in `progress_topic` (module docstring).

    Args:
        up: `UpdateBatch`/`Progress` items, e.g. from a `ShardSource` of the collection.
        bootstrap: `bootstrap.servers`.
        topic: The data topic. `progress_topic`: where progress records go.
        transactional_id: Stable per export (default `"shardflow-export-<topic>"`);
            `""` for the idempotent, at-least-once mode (brokers without transactions).
        key: Row columns whose JSON is the message key.
        hold: A critical since handle on the input's shard, downgraded with progress.
        resume_upper: `export_resume_upper(...)`: updates below it are not written again.

    Returns:
        A stream of the uppers committed (one per transaction).
    """
    transactional = transactional_id != ""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "linger.ms": 5, "log.connection.close": False,
                            "enable.idempotence": True, **(config or {})}
    if transactional:
        conf["transactional.id"] = transactional_id or f"shardflow-export-{topic}"
    keyed = one_key("key", up)
    out = op.stateful_batch(
        "write", keyed,
        lambda _resume: _KafkaSinkLogic(step_id, conf, topic, progress_topic, key, transactional, hold, resume_upper),
    )
    committed = op.key_rm("unkey", out)
    op.inspect("done", committed, lambda _step, _upper: None)  # a flow needs an output step
    return committed

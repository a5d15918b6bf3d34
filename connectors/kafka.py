"""`KafkaSource`: Kafka topics as a source of updates, on confluent-kafka (librdkafka).

Needs the `kafka` extra (`pip install shardflow[kafka]`, i.e. `confluent-kafka`).

Partitions: each topic partition that exists when the source starts is one
bytewax source partition, keyed `"<name>/<topic>:<partition>"`. In continuous
mode every partition re-reads the topic metadata every `discover_interval`
seconds; a partition `q` added later to topic `T` is read by the source
partition of `T:(q % n)`, where `n` is `T`'s partition count at start (the same
rule on every worker, so exactly one reads it). After a restart it is a source
partition of its own.

Offsets: per source partition, `{"<topic>:<partition>": next offset}` for every
Kafka partition it reads. They are committed in the shard's compare-and-set with
the data (never as consumer-group commits: the consumer uses `assign`, no group).
A resumed partition starts each Kafka partition at the largest next offset found
for it under any key of `resume` (ownership can move after partitions were added;
offsets only grow, so the largest is the latest). Exactly-once rests on one broker
behaviour: a fetch from offset `o` returns the partition's records at offsets
`>= o`, in offset order, and an offset is never reused for another record. A
next offset that retention has deleted is an error (`auto.offset.reset=error`),
not a silent skip.

Batch mode reads each partition up to the high watermark seen when the partition
starts (records at offsets `>=` it are left for the next run) and stops. The
watermark is used *only* to know where to stop, never for offsets: tansu (the
test broker) reports it as the base offset of the last record batch + 1, so there
a batch run may stop early inside the last producer batch; the rest comes with the
next run, neither lost nor doubled. A partition also stops once its fetch
position reaches the watermark (control records of transactions have offsets but
are never delivered).

Columns (row schema, `row_schema()`): `key`, the value column(s), `headers`,
`topic`, `partition`, `offset`, `timestamp` (`metadata=` picks which of the
non-value columns to keep). The value is:

- `format="json"`: an object per record, decoded into `schema`'s columns
  (unknown fields ignored, missing ones null), with `pyarrow.json` over the
  concatenated values of a whole consumed batch;
- `format="bytes"`: a `value` binary column;
- `format="text"`: a `value` string column (UTF-8).

Records that do not decode (bad JSON, wrong types, invalid UTF-8, a null value
in json format) are, with `on_error="collect"` (default), emitted as an
`ErrorBatch` (rows under `ERRORS_SCHEMA`: topic, partition, offset, error,
value) with the same time and offsets as the good ones: route them with
`connectors.files.split_errors` and `ctx.persist_split` into the `<name>_errors`
collection (`errors_collection`). With `on_error="raise"` the first one stops the run with a
`KafkaSourceError` naming topic, partition and offset.

Time (`_time`, milliseconds):

- continuous mode, `time="timestamp"` (default): the records of one consumed
  batch (what one `consume` call returned, at most `max_batch`) share one time,
  the largest record timestamp among them (create or log-append time; ingestion
  time when they have none), raised to the partition's frontier. After each batch
  the partition emits `Progress(time + 1)`; when idle, every `tick` seconds,
  `Progress(now)`. So times never decrease within a partition, and a record older
  than what its partition already promised (a producer's clock behind, or late
  delivery) gets the frontier as its time. The exact timestamps stay in the
  `timestamp` column. The frontier starts at the shard's upper (`resume_upper`).
- continuous mode, `time="ingestion"`: the batch's time is `max(now, frontier)`.

SUBTLE: one time per batch is what makes a batch commit whole. The sink commits a
batch's offsets only once all its updates are below the frontier, but it may
commit some of its updates earlier (those below the other partitions' frontier);
if a kill came then, the batch would be read again at new times after the
committed offsets, doubling the part already committed.
- batch mode: every record of the run gets `_time = t0`, the shard's upper when
  the job started (0 for a new one), and each partition ends with
  `Progress(t0 + 1)`: a batch run is one step, the same on every worker, whatever
  the record timestamps.

Envelopes: `envelope="append"` (default) makes each record an insert.
`envelope="upsert"` (needs a key; see `connectors.kafka_upsert`) makes each
record set its key's value and a null value (a tombstone) delete it: the source
emits the retraction of the key's previous row with each new one.

Set-up errors are one line (`KafkaSourceError`): a broker that cannot be reached
within `connect_timeout`, a missing topic, a partition that disappears, offsets
deleted by retention.
"""

from __future__ import annotations

import bisect
import io
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from storage import Frontier, Progress, UpdateBatch, check_row_schema, update_schema
from storage.errors import InvalidInput

from .base import Item, UpdatePartition, UpdateSource, awake_in, partition_key, stop_requested
from .errors import ConnectorError
from .files import ErrorBatch

__all__ = ["ERRORS_SCHEMA", "METADATA", "KafkaSource", "KafkaSourceError"]


class KafkaSourceError(ConnectorError):
    """The broker, a topic or a record is not what the source needs; the message says which."""


#: Row schema of the `<name>_errors` collection.
ERRORS_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("error", pa.string()),
        ("value", pa.binary()),
    ]
)

HEADERS_TYPE = pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))
#: The metadata columns, in order (the value column(s) come right after `key`).
METADATA = ("key", "headers", "topic", "partition", "offset", "timestamp")
_META_TYPES = {
    "headers": HEADERS_TYPE,
    "topic": pa.string(),
    "partition": pa.int32(),
    "offset": pa.int64(),
    "timestamp": pa.timestamp("ms", tz="UTC"),
}

Format = Literal["json", "bytes", "text"]
_MAX_BATCH = 20_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _tp_name(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


class KafkaSource(UpdateSource):
    """Kafka topic partitions as a source of updates (see the module docstring).

    Args:
        bootstrap: `bootstrap.servers`, e.g. `"127.0.0.1:9092"`.
        topics: One topic name or several.
        format: `"json"` (needs `schema`), `"bytes"` or `"text"`.
        schema: The value's row schema for `format="json"`.
        key_format: `"bytes"` (binary `key` column) or `"text"` (UTF-8 string).
        metadata: Which of `METADATA` to keep as columns (default all).
        envelope: `"append"` or `"upsert"` (see `connectors.kafka_upsert`).
        mode: `"continuous"` follows the topics until `request_stop()`;
            `"batch"` reads to the end offsets seen at start, then ends.
        time: `"timestamp"` or `"ingestion"` (continuous mode; see the module docstring).
        name: Source name: partition keys are `"<name>/<topic>:<p>"`, errors go to
            `"<name>_errors"`. Default: the (first) topic.
        config: Extra librdkafka settings (security, ...); `group.id`,
            `enable.auto.commit` and `auto.offset.reset` are the source's.
        max_batch: Records per consumed batch at most.
        tick: Seconds between idle `Progress` in continuous mode.
        discover_interval: Seconds between metadata checks in continuous mode.
        connect_timeout: Seconds to wait for the broker's metadata.
        on_error: `"collect"` (bad records to `<name>_errors`) or `"raise"`.
        upsert_state: Folder of the upsert envelope's DuckDB state (required for upsert).
        resume: `{partition key: offsets}` from the shard's metadata.
        resume_upper: The shard's upper when the job started (times start there); required
            with `resume`, else `InvalidInput` (times below the resume point would be dropped).
    """

    def __init__(
        self,
        bootstrap: str,
        topics: str | Sequence[str],
        *,
        format: Format = "json",
        schema: pa.Schema | None = None,
        key_format: Literal["bytes", "text"] = "bytes",
        metadata: Sequence[str] = METADATA,
        envelope: Literal["append", "upsert"] = "append",
        mode: Literal["batch", "continuous"] = "continuous",
        time: Literal["timestamp", "ingestion"] = "timestamp",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        max_batch: int = _MAX_BATCH,
        tick: float = 0.2,
        discover_interval: float = 5.0,
        connect_timeout: float = 10.0,
        on_error: Literal["collect", "raise"] = "collect",
        upsert_state: str | None = None,
        resume: Mapping[str, Any] | None = None,
        resume_upper: Frontier | None = None,
    ) -> None:
        super().__init__(resume=resume, resume_upper=resume_upper)
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        where = f"KafkaSource({', '.join(self.topics)!s})"
        if not self.topics or not all(isinstance(t, str) and t for t in self.topics):
            raise InvalidInput(f"KafkaSource: topics must be one or more non-empty names, got {topics!r}")
        if format not in ("json", "bytes", "text"):
            raise InvalidInput(f"{where}: format must be 'json', 'bytes' or 'text', got {format!r}")
        if format == "json" and not isinstance(schema, pa.Schema):
            raise InvalidInput(f"{where}: format='json' needs schema=pyarrow.Schema (the value's columns)")
        if key_format not in ("bytes", "text"):
            raise InvalidInput(f"{where}: key_format must be 'bytes' or 'text', got {key_format!r}")
        bad = [m for m in metadata if m not in METADATA]
        if bad:
            raise InvalidInput(f"{where}: unknown metadata column(s) {bad}; choose from {list(METADATA)}")
        if envelope not in ("append", "upsert"):
            raise InvalidInput(f"{where}: envelope must be 'append' or 'upsert', got {envelope!r}")
        if envelope == "upsert" and not upsert_state:
            raise InvalidInput(f"{where}: envelope='upsert' needs upsert_state=<folder for its DuckDB state>")
        if mode not in ("batch", "continuous"):
            raise InvalidInput(f"{where}: mode must be 'batch' or 'continuous', got {mode!r}")
        if time not in ("timestamp", "ingestion"):
            raise InvalidInput(f"{where}: time must be 'timestamp' or 'ingestion', got {time!r}")
        if on_error not in ("collect", "raise"):
            raise InvalidInput(f"{where}: on_error must be 'collect' or 'raise', got {on_error!r}")
        if not (isinstance(max_batch, int) and max_batch > 0):
            raise InvalidInput(f"{where}: max_batch must be a positive int, got {max_batch!r}")
        if self.resume and resume_upper is None:
            # SUBTLE: times start at resume_upper (0 without it). A resumed batch run would
            # put its new records at 0, below the resume point, where a persist sink drops
            # them as already committed: every rerun silently ingests nothing.
            raise InvalidInput(
                f"{where}: resumes need resume_upper= (the collection's upper, e.g. "
                f"resume_upper=ctx.upper(name) in a flow file), so that new times start past it"
            )
        self.where = where
        self.bootstrap = bootstrap
        self.format: Format = format
        self.value_schema = schema
        self.key_format = key_format
        self.metadata = tuple(m for m in METADATA if m in metadata)
        self.envelope = envelope
        self.mode = mode
        self.time = time
        self.name = name or self.topics[0]
        self.errors_collection = f"{self.name}_errors"
        self.config = dict(config or {})
        self.max_batch = max_batch
        self.tick = tick
        self.discover_interval = discover_interval
        self.connect_timeout = connect_timeout
        self.on_error = on_error
        self.upsert_state = upsert_state
        self._schema = self._row_schema()
        self.acked: dict[str, int] = {}
        self._parts: list[tuple[str, int]] | None = None
        self._counts: dict[str, int] = {}

    # -- schema -------------------------------------------------------------------------

    def _row_schema(self) -> pa.Schema:
        fields: list[pa.Field] = []
        if "key" in self.metadata:
            fields.append(pa.field("key", pa.string() if self.key_format == "text" else pa.binary()))
        if self.format == "json":
            assert self.value_schema is not None
            fields += list(self.value_schema)
        else:
            fields.append(pa.field("value", pa.string() if self.format == "text" else pa.binary()))
        fields += [pa.field(m, _META_TYPES[m]) for m in self.metadata if m != "key"]
        schema = pa.schema(fields)
        check_row_schema(schema, self.where)
        return schema

    def row_schema(self) -> pa.Schema:
        """The collection's row schema (key, value column(s), metadata)."""
        return self._schema

    # -- broker -------------------------------------------------------------------------

    def consumer_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap,
            "log.connection.close": False,
            "log_level": 2,  # librdkafka's own error logs would add lines to the one-line errors
            "fetch.wait.max.ms": 50,
            **self.config,
            # The source's own: offsets live in the shard, never in a consumer group.
            "group.id": f"shardflow-{self.name}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "error",
        }

    def metadata_now(self, consumer: Any = None) -> dict[str, int]:
        """`{topic: partition count}` from the broker (bounded wait); raises `KafkaSourceError`."""
        from confluent_kafka import Consumer, KafkaException

        own = consumer is None
        c = Consumer(self.consumer_config()) if own else consumer
        try:
            out: dict[str, int] = {}
            for t in self.topics:
                try:
                    md = c.list_topics(t, timeout=self.connect_timeout)
                except KafkaException as e:
                    msg = (f"{self.where}: broker {self.bootstrap} not reachable within "
                           f"{self.connect_timeout:g}s ({e.args[0].str() if e.args else e})")
                    raise KafkaSourceError(msg) from None
                tm = md.topics.get(t)
                if tm is None or tm.error is not None or not tm.partitions:
                    why = tm.error.str() if tm is not None and tm.error is not None else "no partitions"
                    raise KafkaSourceError(f"{self.where}: topic {t!r} not found on {self.bootstrap} ({why})")
                out[t] = len(tm.partitions)
                if set(tm.partitions) != set(range(out[t])):
                    raise KafkaSourceError(f"{self.where}: topic {t!r} has partitions {sorted(tm.partitions)}, not 0..n-1")
            return out
        finally:
            if own:
                c.close()

    def check(self) -> None:
        """Fail now, with one line, if the broker is unreachable or a topic is missing."""
        self._partitions()

    def _partitions(self) -> list[tuple[str, int]]:
        if self._parts is None:
            self._counts = self.metadata_now()
            self._parts = [(t, p) for t in self.topics for p in range(self._counts[t])]
        return self._parts

    def list_parts(self) -> list[str]:
        return [partition_key(self.name, _tp_name(t, p)) for t, p in self._partitions()]

    def ack(self, offsets: Mapping[str, Any] | None) -> None:
        """The sink committed `offsets` (`Committed.offsets`): upsert undo entries below them may go."""
        for v in (offsets or {}).values():
            if isinstance(v, Mapping):
                for tp, o in v.items():
                    if o is not None and int(o) > self.acked.get(tp, -1):
                        self.acked[tp] = int(o)

    def resume_offset_of(self, tp: str) -> int | None:
        """The next offset of Kafka partition `tp` (`"topic:p"`) over every key of `resume`."""
        best: int | None = None
        for v in self.resume.values():
            if isinstance(v, Mapping) and tp in v:
                o = int(v[tp])
                best = o if best is None else max(best, o)
        return best

    def build_partition(self, key: str, resume_offset: Any) -> UpdatePartition:
        tp = key[len(self.name) + 1:]
        topic, _, p = tp.rpartition(":")
        return _KafkaPartition(self, key, topic, int(p))


def _decode_errors(values: list[bytes | None], idx: list[int], schema: pa.Schema) -> tuple[pa.Table | None, dict[int, str]]:
    """Decode the JSON objects `values[i]` for `i in idx`: (table of the good ones, {i: error})."""
    errors: dict[int, str] = {}
    if None in values:
        errors = {i: "value is null" for i in idx if values[i] is None}
        idx = [i for i in idx if i not in errors]
    if not idx:
        return None, errors
    if len(idx) == len(values):  # the usual case: one parse of the whole batch, no per-value work
        buf = b"\n".join(values)  # type: ignore[arg-type]
        if buf.count(b"\n") == len(values) - 1 and b"\r" not in buf:
            try:
                t = _parse(buf, schema)
                if t.num_rows == len(values):
                    return t, errors
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                pass
    tables: list[pa.Table] = []
    _bisect(values, idx, schema, tables, errors)
    return (pa.concat_tables(tables) if len(tables) > 1 else tables[0]) if tables else None, errors


def _parse(buf: bytes, schema: pa.Schema) -> pa.Table:
    ro = pajson.ReadOptions(block_size=max(len(buf) + 1, 1 << 16), use_threads=len(buf) > (1 << 20))
    po = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    t = pajson.read_json(io.BytesIO(buf), read_options=ro, parse_options=po)
    t = t.select(schema.names).cast(schema)
    for col in t.columns:  # SUBTLE: pyarrow.json lets invalid UTF-8 through into strings
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col.validate(full=True)
    return t


def _bisect(values: list[bytes | None], idx: list[int], schema: pa.Schema, out: list[pa.Table], errors: dict[int, str]) -> None:
    """The slow path of a batch that failed to parse whole: halves until the bad values are alone."""
    # One value per line: JSON whitespace newlines become spaces (a raw newline inside a
    # string is invalid JSON either way; json.loads decides for those rare values).
    lines = []
    for i in idx:
        v = values[i]
        assert v is not None
        if b"\n" in v or b"\r" in v:
            try:
                json.loads(v)
            except ValueError as e:
                errors[i] = f"JSON parse error: {e}"
                continue
            v = v.replace(b"\r", b" ").replace(b"\n", b" ")
        lines.append((i, v))
    if not lines:
        return
    try:
        t = _parse(b"\n".join(v for _, v in lines), schema)
        if t.num_rows != len(lines):
            raise pa.ArrowInvalid(f"{len(lines)} values decoded into {t.num_rows} rows (an empty value?)")
        out.append(t)
        return
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        if len(lines) == 1:
            errors[lines[0][0]] = str(e).splitlines()[0]
            return
    ids = [i for i, _ in lines]
    mid = len(ids) // 2
    _bisect(values, ids[:mid], schema, out, errors)
    _bisect(values, ids[mid:], schema, out, errors)


class _KafkaPartition(UpdatePartition):
    def __init__(self, src: KafkaSource, key: str, topic: str, partition: int) -> None:
        from confluent_kafka import Consumer

        self.src = src
        self.key = key
        self.keys = tuple(src.list_parts())
        self.topic = topic
        self.partition = partition
        self.home = (topic, partition)
        self.consumer = Consumer(src.consumer_config())
        #: "topic:p" -> next offset to read (None: from the beginning).
        self.next: dict[str, int | None] = {}
        self.counts_at_start = dict(src._counts)
        up = src.resume_upper
        self.t0 = up.time if up is not None and up.time is not None else 0
        self.frontier = self.t0
        self._announced = False
        self._done = False
        self._awake: datetime | None = None
        self._last_progress = 0.0
        self._last_discover = time.monotonic()
        self.end: int | None = None  # batch mode: the watermark seen at start
        self.states: dict[str, Any] = {}  # upsert: "topic:p" -> UpsertState
        self._last_ack = time.monotonic()
        self._assign([(topic, partition)])
        if src.mode == "batch":
            from confluent_kafka import TopicPartition

            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=src.connect_timeout)
            except Exception as e:  # noqa: BLE001 - KafkaException: one line
                raise KafkaSourceError(f"{src.where}: no end offset for {topic}:{partition} within "
                                       f"{src.connect_timeout:g}s ({e})") from None
            self.end = int(high)

    @property
    def offset(self) -> Any:
        return dict(self.next)

    def _assign(self, tps: list[tuple[str, int]]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        new = []
        for t, p in tps:
            name = _tp_name(t, p)
            o = self.src.resume_offset_of(name)
            self.next[name] = o
            new.append(TopicPartition(t, p, OFFSET_BEGINNING if o is None else o))
        if self.src.envelope == "upsert":
            from .kafka_upsert import UpsertState

            assert self.src.upsert_state is not None
            for t, p in tps:
                name = _tp_name(t, p)
                self.states[name] = UpsertState(self.src.upsert_state, name, self.src.row_schema(), self.next[name])
        self.consumer.incremental_assign(new)

    def _progress(self, t: int) -> Progress:
        return Progress(Frontier(t), partition=self.key, partitions=self.keys)

    def _discover(self) -> None:
        """Continuous mode: partitions added since start that this partition owns; gone ones fail."""
        counts = self.src.metadata_now(self.consumer)
        mine: list[tuple[str, int]] = []
        t, p = self.home
        n0 = self.counts_at_start[t]
        if counts[t] <= p:
            raise KafkaSourceError(f"{self.src.where}: partition {t}:{p} disappeared (topic now has {counts[t]})")
        for q in range(n0, counts[t]):
            if q % n0 == p and _tp_name(t, q) not in self.next:
                mine.append((t, q))
        if mine:
            self._assign(mine)

    def next_batch(self) -> list[Item]:
        if self._done:
            raise StopIteration()
        src = self.src
        items: list[Item] = []
        if not self._announced:
            self._announced = True
            items.append(self._progress(self.frontier))
        if src.mode == "batch":
            return items + self._batch_step()
        if stop_requested():
            self._done = True
            return items + [self._progress(self.frontier)]
        now = time.monotonic()
        if now - self._last_discover >= src.discover_interval:
            self._last_discover = now
            self._discover()
        msgs = self.consumer.consume(num_messages=src.max_batch, timeout=0)
        msgs = self._check(msgs)
        if msgs:
            items += self._emit(msgs)
            self._awake = None
            self._last_progress = now
        else:
            if now - self._last_progress >= src.tick:
                self._last_progress = now
                self.frontier = max(self.frontier, _now_ms())
                items.append(self._progress(self.frontier))
            self._awake = awake_in(min(0.05, src.tick))
        return items

    def _batch_step(self) -> list[Item]:
        assert self.end is not None
        name = _tp_name(self.topic, self.partition)
        if stop_requested() or (self.next[name] or 0) >= self.end:
            return self._finish()
        msgs = self._check(self.consumer.consume(num_messages=self.src.max_batch, timeout=0.1))
        if msgs:
            offs = [m.offset() for m in msgs]
            cut = bisect.bisect_left(offs, self.end)
            msgs = msgs[:cut]
        items = self._emit(msgs) if msgs else []
        if (self.next[name] or 0) >= self.end or self._position() >= self.end:
            items += self._finish()
        return items

    def _position(self) -> int:
        from confluent_kafka import TopicPartition

        pos = self.consumer.position([TopicPartition(self.topic, self.partition)])[0].offset
        return int(pos) if pos is not None and pos >= 0 else -1

    def _finish(self) -> list[Item]:
        self._done = True
        return [self._progress(self.t0 + 1)]

    def _check(self, msgs: list[Any]) -> list[Any]:
        bad = [m for m in msgs if m.error() is not None]
        if not bad:
            return msgs
        from confluent_kafka import KafkaError

        transient = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                     KafkaError._RESOLVE, KafkaError.REQUEST_TIMED_OUT, KafkaError.LEADER_NOT_AVAILABLE,
                     KafkaError.NOT_LEADER_FOR_PARTITION}
        for m in bad:
            err = m.error()
            if err.code() == KafkaError._PARTITION_EOF:
                continue
            if not err.fatal() and (err.code() in transient or err.retriable()):
                # librdkafka retries by itself; the source only checks, with a bounded wait, that
                # the broker still answers and the topic is there (else one line).
                self._discover() if self.src.mode == "continuous" else self.src.metadata_now(self.consumer)
                continue
            where = f"{m.topic()}:{m.partition()}" if m.topic() else self.key
            if err.code() == KafkaError._AUTO_OFFSET_RESET:
                msg = (f"{self.src.where}: the next offset of {where} ({self.next.get(where)}) is no longer on "
                       f"the broker (deleted by retention?): {err.str()}")
            else:
                msg = f"{self.src.where}: consuming {where} failed: {err.str()}"
            raise KafkaSourceError(msg)
        return [m for m in msgs if m.error() is None]

    def _times(self, ts: list[int], n: int) -> pa.Array:
        """The `_time` of a consumed batch: one time for all its records (see the module docstring)."""
        if self.src.mode == "batch":
            t = self.t0
        elif self.src.time == "ingestion":
            t = max(_now_ms(), self.frontier)
        else:
            top = max(ts)
            t = max(top if top >= 0 else _now_ms(), self.frontier)
        return pa.repeat(pa.scalar(t, pa.int64()), n)

    def _emit(self, msgs: list[Any]) -> list[Item]:
        """One consumed batch -> the data batch (+ errors batch) and Progress."""
        src = self.src
        n = len(msgs)
        values = [m.value() for m in msgs]
        offsets = [m.offset() for m in msgs]
        partitions = [m.partition() for m in msgs]
        ts = [m.timestamp()[1] for m in msgs]
        times = self._times(ts, n)
        for m in (msgs[-1],) if len({*partitions}) == 1 else msgs:
            self.next[_tp_name(m.topic(), m.partition())] = m.offset() + 1
        cols: dict[str, pa.Array] = {}
        if "key" in src.metadata or src.envelope == "upsert":
            cols["key"] = cols["raw_key"] = pa.array([m.key() for m in msgs], pa.binary())
            if src.key_format == "text":
                try:
                    cols["key"] = cols["key"].cast(pa.string())
                except pa.ArrowInvalid:
                    raise KafkaSourceError(f"{src.where}: a key in {self.key} offsets {offsets[0]}..{offsets[-1]} "
                                           "is not valid UTF-8 (use key_format='bytes')") from None
        if "headers" in src.metadata:
            cols["headers"] = pa.array([m.headers() for m in msgs], HEADERS_TYPE)
        if "topic" in src.metadata:
            cols["topic"] = pa.repeat(pa.scalar(self.topic), n) if len(src.topics) == 1 else pa.array(
                [m.topic() for m in msgs], pa.string())
        cols["partition"] = pa.array(partitions, pa.int32())
        cols["offset"] = pa.array(offsets, pa.int64())
        if "timestamp" in src.metadata:
            stamp = pa.array(ts, pa.int64())
            if min(ts) < 0:  # no timestamp (-1): null
                stamp = pc.if_else(pc.less(stamp, 0), pa.scalar(None, pa.int64()), stamp)
            cols["timestamp"] = stamp.cast(pa.timestamp("ms", tz="UTC"))
        errors: dict[int, str] = {}
        upsert = src.envelope == "upsert"
        if upsert and cols["raw_key"].null_count:
            for i, m in enumerate(msgs):
                if m.key() is None:
                    errors[i] = "upsert record without a key"
        if src.format == "json":
            assert src.value_schema is not None
            # Upsert: a null value is a tombstone (a delete), not a decode error.
            plain = not errors and not (upsert and None in values)
            idx = list(range(n)) if plain else [
                i for i in range(n) if i not in errors and not (upsert and values[i] is None)]
            decoded, bad = _decode_errors(values, idx, src.value_schema)
            errors.update(bad)
            ok = idx if plain and not bad else [i for i in range(n) if i not in errors]
            if decoded is None:
                decoded = src.value_schema.empty_table()
            if len(ok) != len(idx) - len(bad):  # tombstones among the kept rows: null rows there
                decoded = _scatter(decoded, [i for i in idx if i not in bad], ok)
            value_cols = {f.name: decoded.column(f.name) for f in src.value_schema}
        else:
            raw = pa.array(values, pa.binary())
            if src.format == "text":
                try:
                    raw.cast(pa.string())
                except pa.ArrowInvalid:
                    for i, v in enumerate(values):
                        try:
                            if v is not None:
                                v.decode("utf-8")
                        except UnicodeDecodeError as e:
                            errors[i] = f"invalid UTF-8: {e}"
            ok = [i for i in range(n) if i not in errors] if errors else list(range(n))
            if len(ok) != n:
                raw = raw.take(pa.array(ok, pa.int64()))
            value_cols = {"value": raw.cast(pa.string()) if src.format == "text" else raw}
        if errors and src.on_error == "raise":
            i = min(errors)
            raise KafkaSourceError(f"{src.where}: record {msgs[i].topic()}:{partitions[i]} offset {offsets[i]}: {errors[i]}")
        good_rows = None if len(ok) == n else pa.array(ok, pa.int64())

        def keep(a: Any) -> Any:
            return a if good_rows is None else a.take(good_rows)

        schema = src.row_schema()
        table = pa.Table.from_arrays([value_cols[f.name] if f.name in value_cols else keep(cols[f.name]) for f in schema],
                                     schema=schema)
        table = table.append_column("_time", keep(times))
        offs = {self.key: dict(self.next)}
        items: list[Item] = []
        if upsert:
            tomb = keep(pa.array([v is None for v in values], pa.bool_()))
            raw_key, offcol, partcol = keep(cols["raw_key"]), keep(cols["offset"]), keep(cols["partition"])
            parts = sorted({*partitions})
            outs = []
            for p in parts:
                sel = None if len(parts) == 1 else pc.equal(partcol, pa.scalar(p, pa.int32()))

                def f(a: Any, sel: Any = sel) -> Any:
                    return a if sel is None else a.filter(sel)

                state = self.states[_tp_name(self.topic if len(src.topics) == 1 else msgs[0].topic(), p)]
                outs.append(state.apply(f(table), f(raw_key), f(offcol), f(tomb)))
            items.append(UpdateBatch(pa.concat_tables(outs) if len(outs) > 1 else outs[0], offsets=offs))
            self._ack_states()
        else:
            table = table.append_column("_diff", pa.repeat(pa.scalar(1, pa.int64()), table.num_rows))
            items.append(UpdateBatch(table.cast(update_schema(schema)), offsets=offs))
        if errors:
            bad_idx = sorted(errors)
            bad_arr = pa.array(bad_idx, pa.int64())
            et = pa.table({
                "topic": pa.array([msgs[i].topic() for i in bad_idx], pa.string()),
                "partition": cols["partition"].take(bad_arr),
                "offset": cols["offset"].take(bad_arr),
                "error": pa.array([errors[i] for i in bad_idx], pa.string()),
                "value": pa.array([values[i] for i in bad_idx], pa.binary()),
                "_time": times.take(bad_arr),
                "_diff": pa.repeat(pa.scalar(1, pa.int64()), len(bad_idx)),
            })
            items.append(ErrorBatch(et.cast(update_schema(ERRORS_SCHEMA)), offsets=offs))
        if src.mode == "continuous":
            last = pc.max(times).as_py()
            self.frontier = max(self.frontier, last + 1)
            items.append(self._progress(self.frontier))
        return items

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            for st in self.states.values():
                st.close()

    def _ack_states(self) -> None:
        """Upsert: drop undo entries below the offsets the sink reported durable (`KafkaSource.ack`)."""
        now = time.monotonic()
        if now - self._last_ack < 5.0:
            return
        self._last_ack = now
        for name, st in self.states.items():
            acked = self.src.acked.get(name)
            if acked is not None:
                st.ack(acked)


def _scatter(table: pa.Table, at: list[int], kept: list[int]) -> pa.Table:
    """`table`'s rows placed at positions `at` among `kept` positions, null elsewhere."""
    pos = {p: j for j, p in enumerate(kept)}
    idx: list[int | None] = [None] * len(kept)
    for r, p in enumerate(at):
        idx[pos[p]] = r
    return table.take(pa.array(idx, pa.int64()))

"""Several copies of one append_sink flow on one data dir commit every source record once.

The committed source offsets are part of the compare-and-set: a copy that loses
the race re-reads them and drops what the other copy already committed, instead
of retrying its batch at the new upper (which wrote it twice).

Every concurrent run here is a real `shardflow run` process; the data is checked
afterwards through `shardflow query`: exact row count, no id twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from storage.errors import OffsetsMismatch

ROOT = Path(__file__).resolve().parents[2]
SHARDFLOW = [sys.executable, "-m", "flows.cli"]

TICKS, ROWS = 200, 20  # 4,000 rows, ids 1..4000

FLOW = """
import bytewax.operators as op
from bytewax.dataflow import Dataflow
from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource

def build(ctx):
    gen = Counter(seed=0, rows_per_tick=ROWS)
    flow = Dataflow("events")
    ctx.collection("events", gen.schemas()["counter"], data_source="ingestion")
    src = LoadgenSource(gen, "counter", ticks=TICKS, rate=RATE, resume=ctx.resume_offsets("events"))
    ctx.append("sink", op.input("in", flow, src), "events", batch_duration=0.02)
    return flow
"""


def _flow(tmp_path: Path, rate: float) -> Path:
    p = tmp_path / "events_flow.py"
    p.write_text(f"TICKS = {TICKS}\nROWS = {ROWS}\nRATE = {rate!r}\n" + FLOW)
    return p


def _query(data: Path, sql: str) -> list[str]:
    out = subprocess.run(
        [*SHARDFLOW, "query", "--data", str(data), "--format", "csv", sql],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[1:]


def _two_copies(tmp_path: Path, trial: int, rate: float) -> None:
    data = tmp_path / f"data{trial}"
    flow = _flow(tmp_path, rate)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([*SHARDFLOW, "run", str(flow), "--data", str(data)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    committed = 0
    for p, (o, e) in zip(procs, outs, strict=True):
        # Both copies finish: the one that lost a race dropped what was in and went on.
        assert p.returncode == 0, (p.returncode, o, e)
        m = re.search(r"([\d,]+) rows in", o + e)
        assert m is not None, (o, e)
        committed += int(m.group(1).replace(",", ""))
    # What the two copies say they committed adds up to one copy's input (often split between them).
    assert committed == TICKS * ROWS, outs
    n, distinct, lo, hi = _query(data, "SELECT count(*), count(DISTINCT counter), min(counter), max(counter) "
                                       "FROM events")[0].split(",")
    assert (int(n), int(distinct), int(lo), int(hi)) == (TICKS * ROWS, TICKS * ROWS, 1, TICKS * ROWS), trial
    assert _query(data, "SELECT count(*) FROM events WHERE counter IS NULL") == ["0"]


def test_two_concurrent_runs_commit_each_row_once(tmp_path: Path) -> None:
    for trial in range(2):
        _two_copies(tmp_path, trial, rate=400.0)


@pytest.mark.slow
def test_two_concurrent_runs_commit_each_row_once_loop(tmp_path: Path) -> None:
    for trial in range(8):
        _two_copies(tmp_path, trial, rate=[None, 200.0, 1000.0][trial % 3])


# ---- the API: two writers racing with offsets ----

SCHEMA = pa.schema([("id", pa.int64())])


def _rows(ids: range) -> pa.Table:
    return pa.table({"id": pa.array(list(ids), pa.int64())})


def test_writers_racing_with_offsets(tmp_path: Path) -> None:
    client = storage.open(str(tmp_path), fsync=False)
    shard = storage.ShardId.new()
    a = client.open_writer(shard, schema=SCHEMA, writer_id="a")
    b = client.open_writer(shard, writer_id="b")
    # Both read partition "p" from the start (nothing committed) and batch ticks 0 and 1.
    a.monotonic_append(_rows(range(0, 10)), offsets={"p": 0}, expected_offsets={"p": None})
    # b lost the race: the same input, expecting nothing committed, is refused (not retried at the new upper).
    with pytest.raises(OffsetsMismatch) as ei:
        b.monotonic_append(_rows(range(0, 10)), offsets={"p": 0}, expected_offsets={"p": None})
    assert ei.value.expected == {"p": None} and ei.value.current == {"p": 0}
    assert str(shard) in str(ei.value) and "\n" not in str(ei.value)
    # b re-reads the offsets and appends only what is not in yet.
    b.monotonic_append(_rows(range(10, 20)), offsets={"p": 1}, expected_offsets=ei.value.current)
    # Offsets merge per key in the CAS: another partition does not clobber "p".
    a.monotonic_append(_rows(range(100, 105)), offsets={"q": [7, "x"]}, expected_offsets={"q": None})
    s = client.state(shard)
    assert s.metadata["offsets"] == {"p": 1, "q": [7, "x"]}
    # Tuples compare as the JSON lists they read back as.
    a.monotonic_append(_rows(range(105, 106)), offsets={"q": (8, "x")}, expected_offsets={"q": (7, "x")})
    ids = sorted(client.open_leased_reader(shard).snapshot(client.state(shard).upper.time - 1)
                 .column("id").to_pylist())
    assert ids == [*range(0, 20), *range(100, 106)]
    client.close()


def test_writers_racing_threads(tmp_path: Path) -> None:
    """Two writers feed the same 100 ticks as fast as they can; the shard holds each tick once."""
    import threading

    client = storage.open(str(tmp_path), fsync=False)
    shard = storage.ShardId.new()
    client.open_writer(shard, schema=SCHEMA, writer_id="init")
    errors: list[BaseException] = []

    def run(name: str) -> None:
        w = client.open_writer(shard, writer_id=name)
        expected = None
        tick = 0
        try:
            while tick < 100:
                try:
                    w.monotonic_append(_rows(range(tick * 5, tick * 5 + 5)), offsets={"p": tick},
                                       expected_offsets={"p": expected})
                    expected = tick
                    tick += 1
                except OffsetsMismatch as e:
                    expected = e.current["p"]  # another writer is ahead: skip what it committed
                    tick = expected + 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors, errors
    assert time.monotonic() - t0 < 120
    ids = client.open_leased_reader(shard).snapshot(client.state(shard).upper.time - 1).column("id").to_pylist()
    assert sorted(ids) == list(range(500))
    client.close()


# ---- AppendLogic directly: two committers of one shard ----


def _logic(client: storage.Client, shard: str, resume: dict | None = None):  # type: ignore[no-untyped-def]
    from flows.sinks import AppendLogic

    return AppendLogic("sink", client, shard, 0.0, resume_offsets=resume or {})


def _tick(i: int, key: str = "p", off: object = None) -> storage.UpdateBatch:
    t = pa.table({"id": pa.array(range(i * 3, i * 3 + 3), pa.int64()),
                  "_time": pa.array([i] * 3, pa.int64()), "_diff": pa.array([1] * 3, pa.int64())})
    return storage.UpdateBatch(t, offsets={key: i if off is None else off})


def _ids(client: storage.Client, shard: str) -> list[int]:
    s = client.state(shard)
    return sorted(client.open_leased_reader(shard).snapshot(s.upper.time - 1).column("id").to_pylist())


def test_append_logic_copies_drop_what_the_other_committed(tmp_path: Path) -> None:
    client = storage.open(str(tmp_path), fsync=False)
    shard = str(storage.ShardId.new())
    client.open_writer(shard, schema=SCHEMA)
    a, b = _logic(client, shard), _logic(client, shard)
    a.on_batch([_tick(i) for i in range(5)])  # batch_duration 0: flushes at once
    out, _ = b.on_batch([_tick(i) for i in range(5)])
    assert list(out) == []  # all of it was in
    out, _ = b.on_batch([_tick(5), _tick(6)])
    assert [c.rows for c in out] == [6]
    # a is behind: tick 5 is in (dropped at the CAS), tick 6 on arrival, tick 7 is new.
    assert list(a.on_batch([_tick(5)])[0]) == []
    assert list(a.on_batch([_tick(6)])[0]) == []
    assert [c.rows for c in a.on_batch([_tick(7)])[0]] == [3]
    assert _ids(client, shard) == list(range(24))
    assert client.state(shard).metadata["offsets"] == {"p": 7}
    client.close()


def test_append_logic_stops_when_offsets_do_not_line_up(tmp_path: Path) -> None:
    """Opaque offsets that are not a batch boundary of this copy cannot be placed: one clear line."""
    client = storage.open(str(tmp_path), fsync=False)
    shard = str(storage.ShardId.new())
    client.open_writer(shard, schema=SCHEMA)
    a, b = _logic(client, shard), _logic(client, shard)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    b.now_getter = lambda: t0  # b buffers (its batch duration has not passed)
    b.batch_duration = 10.0
    b.last_commit = t0
    b.on_batch([_tick(0, "f", {"file": "x", "pos": 10}), _tick(1, "f", {"file": "x", "pos": 20})])
    a.on_batch([_tick(0, "f", {"file": "x", "pos": 15})])  # another batching of the same file
    with pytest.raises(OffsetsMismatch) as ei:
        b.flush()
    msg = str(ei.value)
    assert "\n" not in msg and shard in msg and "'f'" in msg and "stops" in msg, msg
    assert _ids(client, shard) == [0, 1, 2]  # only a's batch
    client.close()

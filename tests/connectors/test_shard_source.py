"""connectors.shard: snapshot then listen, resume from the frontier reached, batch mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import storage
from connectors.base import request_stop, reset_stop
from connectors.shard import ShardSource
from storage import Progress, UpdateBatch

SCHEMA = pa.schema([("k", pa.string())])


def upd(rows: list[tuple[str, int, int]]) -> pa.Table:
    return pa.table({"k": [r[0] for r in rows], "_time": [r[1] for r in rows], "_diff": [r[2] for r in rows]})


def poll(part: Any, n: int = 3) -> list[Any]:
    out: list[Any] = []
    for _ in range(n):
        out += part.next_batch()
    return out


def updates(items: list[Any]) -> list[tuple[str, int, int]]:
    return sorted((r["k"], r["_time"], r["_diff"]) for x in items if isinstance(x, UpdateBatch) for r in x.table.to_pylist())


@pytest.fixture
def shard(tmp_path: Path) -> tuple[storage.Client, str, storage.WriteHandle]:
    reset_stop()
    client = storage.open(tmp_path)
    sid = str(storage.ShardId.new())
    w = client.open_writer(sid, schema=SCHEMA)
    w.compare_and_append(upd([("a", 1, 1), ("b", 2, 1)]), 0, 5)
    return client, sid, w


def test_snapshot_then_listen_then_resume(shard: tuple[storage.Client, str, storage.WriteHandle]) -> None:
    client, sid, w = shard
    part = ShardSource(client, sid, name="in").build_part("x", "in/0", None)
    items = poll(part)
    assert updates(items) == [("a", 4, 1), ("b", 4, 1)], "the snapshot is at as_of = upper - 1"
    w.compare_and_append(upd([("a", 6, -1), ("c", 7, 1)]), 5, 9)
    items += poll(part)
    assert updates(items)[:2] == [("a", 4, 1), ("a", 6, -1)]
    batches = [x for x in items if isinstance(x, UpdateBatch)]
    assert batches[-1].offsets == {"in/0": 9}
    fronts = [x.frontier.time for x in items if isinstance(x, Progress)]
    assert fronts == [0, 5, 9]
    request_stop()
    try:
        assert part.next_batch() == []
        with pytest.raises(StopIteration):
            part.next_batch()
    finally:
        reset_stop()
        part.close()

    # Resume from the frontier reached: no snapshot, only times >= 9.
    w.compare_and_append(upd([("d", 9, 1)]), 9, 12)
    part2 = ShardSource(client, sid, name="in", resume={"in/0": 9}).build_part("x", "in/0", None)
    got = poll(part2)
    part2.close()
    assert updates(got) == [("d", 9, 1)]


def test_batch_mode_stops_at_the_upper_seen_at_start(shard: tuple[storage.Client, str, storage.WriteHandle]) -> None:
    client, sid, w = shard
    part = ShardSource(client, sid, as_of=1, mode="batch", name="in").build_part("x", "in/0", None)
    items = part.next_batch()
    w.compare_and_append(upd([("z", 5, 1)]), 5, 6)  # after the start: not read
    while True:
        try:
            items += part.next_batch()
        except StopIteration:
            break
    part.close()
    assert updates(items) == [("a", 1, 1), ("b", 2, 1)]
    assert [x.frontier.time for x in items if isinstance(x, Progress)] == [0, 2, 5]

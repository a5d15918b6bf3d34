"""The sinks on the batch API: workers write `Batch`es, the committer appends them through the handle.

- its commits wake the client's background compactor (they go through `WriteHandle`);
- a written-but-uncommitted part that goes missing is `CorruptPart` (the part store), not an assert;
- time comes from one `now_getter`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from flowtest_util import upd

import storage
from flows.sinks import AppendLogic, PersistLogic, WrittenBatch, _PartWriter
from storage import Frontier, Progress, UpdateBatch
from storage.errors import CorruptPart

SCHEMA = pa.schema([("k", pa.string())])


@pytest.fixture
def client(tmp_path: Any) -> Any:
    c = storage.open(str(tmp_path), fsync=False)
    yield c
    c.close()


def test_worker_writes_a_batch_the_committer_appends(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = str(storage.ShardId.new())
    client.open_writer(shard, SCHEMA)
    woken: list[str] = []
    monkeypatch.setattr(client.compactor, "request", woken.append)
    wb = _PartWriter("t", client, shard, None)(UpdateBatch(upd([("a", 2, 1), ("b", 4, 1)])))
    assert isinstance(wb, WrittenBatch) and (wb.batch.lower, wb.batch.upper) == (Frontier(2), Frontier(5))
    assert client.state(shard).batches == ()  # written, not appended
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    logic = PersistLogic("t", client, shard, None, now_getter=lambda: t0)
    out, _ = logic.on_batch([wb, Progress(Frontier(6))])
    (c,) = list(out)
    assert (c.lower, c.upper, c.rows, c.wall_ms) == (Frontier(0), Frontier(6), 2, int(t0.timestamp() * 1000))
    assert woken == [shard]  # the commit went through the handle
    with client.open_leased_reader(shard) as r:
        assert sorted(x["k"] for x in r.snapshot(5).to_pylist()) == ["a", "b"]


def test_missing_desired_part_is_corrupt_part(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    w.compare_and_append(upd([("x", 0, 1)]), 0, 1)  # foreign contents: the committer takes the slow path
    wb = _PartWriter("t", client, shard, None)(UpdateBatch(upd([("a", 1, 1)])))
    (p,) = wb.batch.parts
    client.blob.delete(p.key)
    logic = PersistLogic("t", client, shard, None)
    with pytest.raises(CorruptPart, match=f"shard {shard}: batch \\[1, 2\\) part {p.key}: missing"):
        logic.on_batch([wb, Progress(Frontier(3))])
    logic.close()


def test_append_logic_waits_by_its_now_getter(client: Any) -> None:
    shard = str(storage.ShardId.new())
    client.open_writer(shard, SCHEMA)
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    logic = AppendLogic("t", client, shard, 10.0, now_getter=lambda: now[0], resume_offsets={})
    out, _ = logic.on_batch([UpdateBatch(upd([("a", 0, 1)]))])
    assert [c.rows for c in out] == [1]
    out, _ = logic.on_batch([UpdateBatch(upd([("b", 0, 1)]))])
    assert list(out) == [] and logic.notify_at() == now[0] + timedelta(seconds=10)
    now[0] += timedelta(seconds=10)
    assert [c.rows for c in logic.on_notify()[0]] == [1]

"""The batch API (as in persist) and the part store.

`WriteHandle.batch` writes parts without appending; `compare_and_append_batch`
appends batches with the same outcomes and offsets-in-CAS semantics as
`compare_and_append`; `storage.compare_and_append_batches` appends to several
shards in one consensus transaction. `client.parts` is the one part store.
"""

from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa
import pytest

import storage
from storage import Batch, Frontier
from storage.errors import CorruptPart, InvalidBounds, OffsetsMismatch, Tombstone, UpperMismatch

SCHEMA = pa.schema([("k", pa.string())])


def _upd(keys: list[str], t: int) -> pa.Table:
    n = len(keys)
    return pa.table({"k": pa.array(keys, pa.string()), "_time": pa.array([t] * n, pa.int64()), "_diff": pa.array([1] * n, pa.int64())})


@pytest.fixture
def client(tmp_path: Any) -> Any:
    c = storage.open(str(tmp_path), fsync=False)
    yield c
    c.close()


def _rows(client: Any, shard: str, as_of: int) -> list[str]:
    with client.open_leased_reader(shard) as r:
        return sorted(x["k"] for x in r.snapshot(as_of).to_pylist())


def test_batch_is_invisible_until_appended(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    b = w.batch(_upd(["a", "b"], 3), lower=2, upper=5)
    assert isinstance(b, Batch) and b.rows == 2 and b.parts and b.shard_id == shard
    assert w.upper == Frontier(0) and client.state(shard).batches == ()
    assert pickle.loads(pickle.dumps(b)) == b  # workers hand batches to the committer
    res = w.compare_and_append_batch([b], expected_upper=0, new_upper=10)
    assert res == storage.Appended(Frontier(10))
    assert _rows(client, shard, 9) == ["a", "b"]


def test_several_batches_append_as_one(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA, compact=False)
    b1, b2 = w.batch(_upd(["a"], 1), lower=1, upper=2), w.batch(_upd(["b"], 4), lower=4, upper=5)
    w.compare_and_append_batch([b1, b2], expected_upper=0, new_upper=6)
    s = client.state(shard)
    assert len(s.batches) == 1 and len(s.batches[0].parts) == 2 and s.upper == Frontier(6)
    assert _rows(client, shard, 1) == ["a"] and _rows(client, shard, 5) == ["a", "b"]


def test_batch_outside_the_append_bounds_is_refused(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    b = w.batch(_upd(["a"], 7), lower=5, upper=8)
    with pytest.raises(InvalidBounds, match="not inside"):
        w.compare_and_append_batch([b], expected_upper=0, new_upper=7)
    with pytest.raises(InvalidBounds):
        w.batch(_upd(["a"], 9), lower=5, upper=8)
    other = client.open_writer(str(storage.ShardId.new()), SCHEMA)
    with pytest.raises(InvalidBounds, match="of shard"):
        other.compare_and_append_batch([b], expected_upper=0, new_upper=10)
    assert w.upper == Frontier(0)


def test_upper_mismatch_leaves_the_batch_for_a_retry(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    b = w.batch(_upd(["a"], 5), lower=5, upper=6)
    w.compare_and_append(_upd(["x"], 0), 0, 2)
    with pytest.raises(UpperMismatch) as ei:
        w.compare_and_append_batch([b], expected_upper=0, new_upper=6)
    assert ei.value.current == Frontier(2)
    w.compare_and_append_batch([b], expected_upper=2, new_upper=6)  # the same parts, at the new upper
    assert _rows(client, shard, 5) == ["a", "x"]


def test_token_and_offsets_in_the_same_cas(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    b = w.batch(_upd(["a"], 0), lower=0, upper=1)
    w.compare_and_append_batch([b], expected_upper=0, new_upper=1, token="t1", offsets={"p": 1})
    again = w.compare_and_append_batch([b], expected_upper=0, new_upper=1, token="t1", offsets={"p": 1})
    assert isinstance(again, storage.AlreadyCommitted)
    assert client.state(shard).metadata["offsets"] == {"p": 1}
    b2 = w.batch(_upd(["b"], 1), lower=1, upper=2)
    with pytest.raises(OffsetsMismatch) as ei:
        w.compare_and_append_batch([b2], expected_upper=1, new_upper=2, offsets={"p": 2}, expected_offsets={"p": 0})
    assert ei.value.current == {"p": 1}
    w.compare_and_append_batch([b2], expected_upper=1, new_upper=2, offsets={"p": 2}, expected_offsets={"p": 1})
    assert client.state(shard).metadata["offsets"] == {"p": 2}
    assert _rows(client, shard, 1) == ["a", "b"]


def test_multi_shard_append_is_atomic(client: Any) -> None:
    x, y = str(storage.ShardId.new()), str(storage.ShardId.new())
    wx, wy = client.open_writer(x, SCHEMA), client.open_writer(y, SCHEMA)
    bx, by = wx.batch(_upd(["a"], 0), lower=0, upper=1), wy.batch(_upd(["b"], 0), lower=0, upper=1)
    wy.compare_and_append(_upd(["y"], 0), 0, 1)  # y's upper moves: the whole append must fail
    with pytest.raises(UpperMismatch):
        storage.compare_and_append_batches(client, {x: ([bx], 0, 1), y: ([by], 0, 1)}, writer_id="t")
    assert wx.upper == Frontier(0) and wy.upper == Frontier(1)
    by = wy.batch(_upd(["b"], 1), lower=1, upper=2)
    ups = storage.compare_and_append_batches(client, {x: ([bx], 0, 2), y: ([by], 1, 2)}, writer_id="t")
    assert ups == {x: Frontier(2), y: Frontier(2)}
    assert _rows(client, x, 1) == ["a"] and _rows(client, y, 1) == ["b", "y"]


def test_multi_shard_at_upper_appends_at_each_current_upper(client: Any) -> None:
    x, y = str(storage.ShardId.new()), str(storage.ShardId.new())
    wx, wy = client.open_writer(x, SCHEMA), client.open_writer(y, SCHEMA)
    wy.compare_and_append(_upd([], 0), 0, 3)
    bx, by = wx.batch(_upd(["a"], 5), lower=5, upper=9), wy.batch(_upd(["b"], 5), lower=5, upper=9)
    storage.compare_and_append_batches(client, {x: ([bx], 5, 9), y: ([by], 5, 9)}, writer_id="t", at_upper=True)
    assert wx.upper == Frontier(9) and wy.upper == Frontier(9)
    late = wx.batch(_upd(["c"], 6), lower=6, upper=10)
    with pytest.raises(UpperMismatch):  # x's upper (9) is past 6
        storage.compare_and_append_batches(client, {x: ([late], 6, 10)}, writer_id="t", at_upper=True)


def test_tombstone(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    b = w.batch(_upd(["a"], 0), lower=0, upper=1)
    w.compare_and_append(_upd([], 0), 0, None)
    client.finalize(shard)
    with pytest.raises(Tombstone):
        w.compare_and_append_batch([b], expected_upper=0, new_upper=1)


def test_part_store_checks_every_read(client: Any) -> None:
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, SCHEMA)
    w.compare_and_append(_upd(["a", "b"], 0), 0, 1)
    s = client.state(shard)
    (b,) = s.batches
    (p,) = b.parts
    assert client.parts.read(shard, b, p).num_rows == 2
    assert client.parts.verify(shard, b, p) is not None
    client.blob.delete(p.key)
    for call in (client.parts.read, client.parts.verify):
        with pytest.raises(CorruptPart, match=f"shard {shard}: batch \\[0, 1\\) part {p.key}: missing"):
            call(shard, b, p)


def test_part_store_writes_large_tables_in_several_parts(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.parts, "PART_MAX_ROWS", 3)
    shard = str(storage.ShardId.new())
    t = _upd([str(i) for i in range(10)], 0)
    metas = client.parts.write(shard, t)
    assert [m.rows for m in metas] == [3, 3, 3, 1]
    assert pa.concat_tables(
        [client.parts.read(shard, storage.Batch(shard, Frontier(0), Frontier(1), metas), m) for m in metas]
    ).equals(t)

"""ReadHandle.snapshot_reader: snapshot() as a stream of record batches, pinned until closed."""

from __future__ import annotations

import gc as pygc
import os
from collections import Counter

import pyarrow as pa
import pytest

import storage
from storage.read import is_collapsed, snapshot_schema

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])
N = 300  # rows inserted per time




def _fill(client: storage.Client, shard: str, n: int) -> None:
    """n appends, one per time t: N new rows (k=f"k{t}-{j}"), a retraction of the row
    (t-1, 0) and a second copy of (t-1, 1), so consolidation changes the result."""
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    for t in range(n):
        k = [f"k{t}-{j}" for j in range(N)]
        v = list(range(N))
        d = [1] * N
        if t:
            k += [f"k{t - 1}-0", f"k{t - 1}-1"]
            v += [0, 1]
            d += [-1, 1]
        w.compare_and_append(pa.table({"k": k, "v": v, "_time": [t] * len(k), "_diff": d}), t, t + 1)


def _multiset(t: pa.Table | pa.RecordBatchReader) -> Counter[tuple[str, int, int]]:
    if isinstance(t, pa.RecordBatchReader):
        t = t.read_all()
    return Counter((x["k"], x["v"], x["_diff"]) for x in t.to_pylist())


def _keys(client: storage.Client, shard: str) -> set[str]:
    return {p.key for b in client.state(shard).batches for p in b.parts}


def _blob_keys(client: storage.Client, shard: str) -> set[str]:
    return {m.key for m in client.blob.list(f"{shard}/")}


def _published_pin(client: storage.Client, shard: str, r: storage.ReadHandle) -> int:
    """Heartbeat (publishes the oldest version `r` still reads) and return that seqno."""
    r.heartbeat()
    return client.inspect(shard)["leased_readers"][r.reader_id]["seqno"]


def _read_head(client: storage.Client, shard: str, r: storage.ReadHandle) -> int:
    """Snapshot the head with `r` (so `r` has read it) and return its seqno."""
    head = client.state(shard).seqno
    r.snapshot(client.state(shard).upper.time - 1)
    return head


def _compact(client: storage.Client, shard: str, old_keys: set[str]) -> set[str]:
    """Compact; return the parts of `old_keys` the new head no longer references (not empty)."""
    client.compact(shard)
    replaced = old_keys - _keys(client, shard)
    assert replaced
    return replaced


def test_same_multiset_as_snapshot(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 8)
    with client.open_leased_reader(shard, heartbeat=False) as r:
        for as_of in (0, 1, 4, 7):
            with r.snapshot_reader(as_of, batch_size=128) as reader:
                assert reader.schema == snapshot_schema(SCHEMA)
                got = _multiset(reader)
            assert got == _multiset(r.snapshot(as_of))
            assert sum(d * c for (_, _, d), c in got.items()) == N * (as_of + 1)
        # After full compaction with since at as_of, snapshot skips the GROUP BY (one collapsed batch).
        want = _multiset(r.snapshot(7))
        r.downgrade_since(7)
        client.compact(shard, full=True)
        (b,) = client.state(shard).batches
        assert is_collapsed(b, 7)
        with r.snapshot_reader(7, batch_size=128) as reader:
            assert _multiset(reader) == want == _multiset(r.snapshot(7))


def test_empty_result(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    w.compare_and_append(pa.table({"k": ["a", "a"], "v": [1, 1], "_time": [0, 1], "_diff": [1, -1]}), 0, 2)
    with client.open_leased_reader(shard, heartbeat=False) as r:
        reader = r.snapshot_reader(1)
        t = reader.read_all()
        assert t.num_rows == 0 and t.schema == snapshot_schema(SCHEMA)
        assert _multiset(r.snapshot_reader(0)) == Counter({("a", 1, 1): 1})


def test_large_result_comes_in_several_batches(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 10)
    with client.open_leased_reader(shard, heartbeat=False) as r, r.snapshot_reader(9, batch_size=500) as reader:
        sizes = [b.num_rows for b in reader]
    assert sum(sizes) == 10 * N - 9 and len(sizes) >= 2 and max(sizes) <= 500


def test_gc_while_half_consumed_keeps_the_parts(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 10)
    old_keys = _keys(client, shard)
    with client.open_leased_reader(shard, heartbeat=False) as r:
        want = _multiset(r.snapshot(9))
        seqno = client.state(shard).seqno
        reader = r.snapshot_reader(9, batch_size=100)
        first = reader.read_next_batch()
        replaced = _compact(client, shard, old_keys)
        _read_head(client, shard, r)  # the handle has read the new head, yet the open stream holds its pin
        assert _published_pin(client, shard, r) == seqno
        rep = client.gc(shard)
        assert rep.parts_deleted == 0 and old_keys <= _blob_keys(client, shard)
        rest = reader.read_all()
        assert _multiset(pa.concat_tables([pa.Table.from_batches([first]), rest])) == want
        # Exhausted: the pin is released without an explicit close.
        head = _read_head(client, shard, r)
        assert _published_pin(client, shard, r) == head > seqno
        assert client.gc(shard).parts_deleted == len(replaced)
        assert not replaced & _blob_keys(client, shard)


@pytest.mark.parametrize("how", ["close", "with", "del"])
def test_closing_early_releases_the_pin(client: storage.Client, how: str) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 10)
    old_keys = _keys(client, shard)
    with client.open_leased_reader(shard, heartbeat=False) as r:
        seqno = client.state(shard).seqno
        reader = r.snapshot_reader(9, batch_size=100)

        def half_read_and_held() -> set[str]:
            reader.read_next_batch()
            replaced = _compact(client, shard, old_keys)
            _read_head(client, shard, r)
            assert _published_pin(client, shard, r) == seqno
            assert client.gc(shard).parts_deleted == 0
            return replaced

        if how == "with":
            with reader:
                replaced = half_read_and_held()
        else:
            replaced = half_read_and_held()
            if how == "close":
                reader.close()
                with pytest.raises(pa.ArrowInvalid):
                    reader.read_next_batch()
            else:
                del reader
                pygc.collect()
        head = _read_head(client, shard, r)
        assert _published_pin(client, shard, r) == head > seqno
        assert client.gc(shard).parts_deleted == len(replaced)


def test_errors_are_raised_at_the_call(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 4)
    with client.open_leased_reader(shard, heartbeat=False) as r:
        with pytest.raises(storage.NotYetReadable):
            r.snapshot_reader(4, timeout=0.05)
        r.downgrade_since(2)
        with pytest.raises(storage.ReadBeforeSince):
            r.snapshot_reader(1)
        with pytest.raises(storage.InvalidInput):
            r.snapshot_reader(-1)
        # No pin was left behind by the failed calls.
        client.compact(shard)
        head = _read_head(client, shard, r)
        assert _published_pin(client, shard, r) == head


def test_corrupt_part_is_raised_at_the_call_and_leaves_no_pin(tmp_path) -> None:  # noqa: ANN001
    client = storage.open(tmp_path, fsync=False)
    shard = storage.ShardId.new()
    _fill(client, shard, 3)
    os.unlink(client.blob.local_path(client.state(shard).batches[1].parts[0].key))
    with client.open_leased_reader(shard, heartbeat=False) as r:
        seqno = client.state(shard).seqno
        with pytest.raises(storage.CorruptPart):
            r.snapshot_reader(2)
        assert _multiset(r.snapshot_reader(0)) == _multiset(r.snapshot(0))
        assert _published_pin(client, shard, r) == seqno
    client.close()

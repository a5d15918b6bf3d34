"""No poisoned shard: what a write accepts can be read back; what cannot be read is refused or named.

- strings must be valid UTF-8 (DuckDB refuses to read anything else), at any
  nesting depth, large and dictionary-encoded too;
- a batch whose |diffs| sum past int64 is refused; a count that passes int64
  across batches raises `DiffOverflow` naming the shard and the row, on every
  read path, never a raw DuckDB error;
- `verify` (fsck) finds both in parts written before these checks existed.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

import storage
from storage import state as st
from storage.errors import DiffOverflow, InvalidInput
from storage.frontier import Frontier
from storage.updates import update_schema

M = 2**63 - 1
BAD = b"bad \xff\xfe"


def bad_strings(values: list[bytes], type_: pa.DataType = pa.string()) -> pa.Array:
    """Strings holding arbitrary bytes: what pa.array(bytes).view(string) produces without a check."""
    return pa.array(values, pa.binary() if type_ == pa.string() else pa.large_binary()).view(type_)


def writer(client: storage.Client, schema: pa.Schema) -> storage.WriteHandle:
    return client.open_writer(storage.ShardId.new(), schema=schema, compact=False)


def upd(cols: dict[str, pa.Array], n: int, t: int = 0, diffs: list[int] | None = None) -> pa.Table:
    return pa.table({**cols, "_time": [t] * n, "_diff": diffs or [1] * n})


# ---------------------------------------------------------------- UTF-8


def _cases() -> list[tuple[str, pa.DataType, pa.Array, int]]:
    s = bad_strings([b"ok", b"fine", BAD])
    return [
        ("string", pa.string(), s, 2),
        ("large_string", pa.large_string(), bad_strings([b"ok", BAD, b"x"], pa.large_string()), 1),
        ("list", pa.list_(pa.string()),
         pa.ListArray.from_arrays(pa.array([0, 2, 2, 3], pa.int32()), s), 2),
        ("struct", pa.struct([("a", pa.int64()), ("b", pa.string())]),
         pa.StructArray.from_arrays([pa.array([1, 2, 3]), s], names=["a", "b"]), 2),
        ("dictionary", pa.dictionary(pa.int32(), pa.string()),
         pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, 1], pa.int32()), s)[:3], 2),
        ("map", pa.map_(pa.string(), pa.string()),
         pa.MapArray.from_arrays(pa.array([0, 1, 3], pa.int32()), pa.array(["k1", "k2", "k3"]), s), 1),
    ]


@pytest.mark.parametrize("name,type_,col,row", _cases(), ids=[c[0] for c in _cases()])
def test_invalid_utf8_is_refused_naming_column_and_row(
    client: storage.Client, name: str, type_: pa.DataType, col: pa.Array, row: int
) -> None:
    w = writer(client, pa.schema([("id", pa.int64()), ("v", type_)]))
    n = len(col)
    with pytest.raises(InvalidInput, match=rf"shard {w.shard_id}: column 'v' row {row}: string is not valid UTF-8"):
        w.compare_and_append(upd({"id": pa.array(range(n)), "v": col}, n), 0, 1)
    assert w.upper == Frontier(0)  # nothing became visible
    # The row found is the first bad one in a batch of several chunks too.
    t = upd({"id": pa.array(range(n)), "v": col}, n)
    two = pa.concat_tables([t.slice(0, 1), t.slice(0, 1), t.slice(1)])
    with pytest.raises(InvalidInput, match=rf"column 'v' row {row + 1}:"):
        w.compare_and_append(two, 0, 1)


def test_valid_utf8_is_accepted_and_reads_back(client: storage.Client) -> None:
    w = writer(client, pa.schema([("k", pa.string()), ("tags", pa.list_(pa.large_string()))]))
    keys = ["plain", "é", "日本語", "🙂", ""]
    t = upd({"k": keys, "tags": pa.array([[k] for k in keys], pa.list_(pa.large_string()))}, len(keys))
    w.compare_and_append(t, 0, 1)
    with client.open_leased_reader(w.shard_id) as r:
        assert sorted(r.snapshot(0).column("k").to_pylist()) == sorted(keys)


def test_unused_bad_dictionary_entry_is_refused() -> None:
    from storage.updates import check_strings

    d = pa.DictionaryArray.from_arrays(pa.array([0, 0], pa.int32()), bad_strings([b"ok", BAD]))
    with pytest.raises(InvalidInput, match="column 'v' an unused dictionary entry"):
        check_strings(pa.table({"v": d}), "t")


def test_invalid_utf8_through_monotonic_append(client: storage.Client) -> None:
    w = writer(client, pa.schema([("k", pa.string())]))
    with pytest.raises(InvalidInput, match="column 'k' row 0"):
        w.monotonic_append(pa.table({"k": bad_strings([BAD])}))


# ---------------------------------------------------------------- diffs past int64


def test_batch_whose_diffs_overflow_is_refused(client: storage.Client) -> None:
    w = writer(client, pa.schema([("k", pa.string())]))
    with pytest.raises(InvalidInput, match=r"column '_diff' row 1: diff 9223372036854775807 brings the batch"):
        w.compare_and_append(upd({"k": ["a", "a"]}, 2, diffs=[M, M]), 0, 1)
    with pytest.raises(InvalidInput, match=r"column '_diff' row 2: diff -9223372036854775808 cannot be retracted"):
        w.compare_and_append(upd({"k": ["a", "b", "c"]}, 3, diffs=[1, 1, -(2**63)]), 0, 1)
    # The row named is where the running sum of |diff| passes int64, even among many rows.
    n = 10_000
    diffs = [2**50] * n
    diffs[8191] = M
    with pytest.raises(InvalidInput, match=r"column '_diff' row 8191:"):
        w.compare_and_append(upd({"k": [f"k{i}" for i in range(n)]}, n, diffs=diffs), 0, 1)
    assert w.upper == Frontier(0)
    # NB: conservative: |diffs| past int64 are refused even where they would cancel.
    with pytest.raises(InvalidInput, match=r"row 1: diff -9223372036854775807"):
        w.compare_and_append(upd({"k": ["a", "a"]}, 2, diffs=[M, -M]), 0, 1)
    # Large diffs that fit are fine: a count may be as large as int64 allows.
    w.compare_and_append(upd({"k": ["a", "a"]}, 2, diffs=[2**62, 2**62 - 1]), 0, 1)
    w.compare_and_append(upd({"k": ["b"]}, 1, 1, diffs=[-M]), 1, 2)
    with client.open_leased_reader(w.shard_id) as r:
        assert sorted(r.snapshot(1, validate=False).to_pylist(), key=str) == [{"k": "a", "_diff": M}, {"k": "b", "_diff": -M}]


@pytest.fixture
def overflowed(client: storage.Client) -> storage.WriteHandle:
    """Row 'a' reaches M at time 1 and M + M at time 2: each batch alone is fine."""
    w = writer(client, pa.schema([("k", pa.string()), ("v", pa.int64())]))
    w.compare_and_append(upd({"k": ["b"], "v": [2]}, 1, 0), 0, 1)
    w.compare_and_append(upd({"k": ["a"], "v": [1]}, 1, 1, [M]), 1, 2)
    w.compare_and_append(upd({"k": ["a"], "v": [1]}, 1, 2, [M]), 2, 3)
    return w


def test_count_past_int64_across_batches_raises_diff_overflow(
    client: storage.Client, overflowed: storage.WriteHandle
) -> None:
    msg = (rf"shard {overflowed.shard_id}: the diffs of row {{'k': a, 'v': 1}} sum to 18446744073709551614, "
           "outside int64")
    with client.open_leased_reader(overflowed.shard_id) as r:
        assert len(r.snapshot(1)) == 2  # before the last batch, the count fits
        with pytest.raises(DiffOverflow, match=msg):
            r.snapshot(2)
        with pytest.raises(DiffOverflow, match=msg), r.snapshot_reader(2) as reader:
            reader.read_all()
    with pytest.raises(DiffOverflow, match=msg.replace(" sum to", " at time 0 sum to")):
        storage.consolidate(pa.table({"k": ["a", "a"], "v": [1, 1], "_time": [0, 0], "_diff": [M, M]}),
                            where=f"shard {overflowed.shard_id}")
    # Compaction consolidates too: once since lets it merge times 1 and 2, it must
    # not write a wrapped count (nor a clamped one).
    with client.open_leased_reader(overflowed.shard_id) as r:
        r.downgrade_since(2)
        with pytest.raises(DiffOverflow, match=msg.replace(" sum to", " at time 2 sum to")):
            client.compact(overflowed.shard_id, full=True)


def test_query_names_the_overflowing_row(client: storage.Client, overflowed: storage.WriteHandle) -> None:
    import duckdb

    from storage.updates import as_overflow

    with storage.query.connect(client, {"t": overflowed.shard_id}) as con, pytest.raises(duckdb.Error) as e:
        con.sql("SELECT * FROM t").fetchall()
    ov = as_overflow(e.value)
    assert isinstance(ov, DiffOverflow) and "{'k': a, 'v': 1}" in str(ov)


# ---------------------------------------------------------------- verify (fsck) on old parts


def _append_unchecked(client: storage.Client, shard: str, table: pa.Table, lower: int, upper: int) -> None:
    """Append the way a shardflow without the write checks did: parts as given, then the CAS."""
    parts = client.parts.write(shard, table)
    batch = st.BatchMeta(Frontier(lower), Frontier(upper), Frontier.MIN, parts)
    m = client.machine(shard)
    m.apply(st.compare_and_append, batch, writer_id="old", token=None, metadata=None, lease_ms=60_000)


def test_verify_finds_invalid_utf8_in_old_parts(client: storage.Client) -> None:
    schema = pa.schema([("k", pa.string())])
    w = writer(client, schema)
    w.compare_and_append(upd({"k": ["a"]}, 1), 0, 1)
    assert client.verify(w.shard_id).ok
    old = pa.Table.from_arrays([bad_strings([b"ok", BAD]), pa.array([1, 1]), pa.array([1, 1])],
                               schema=update_schema(schema))
    _append_unchecked(client, w.shard_id, old, 1, 2)
    rep = client.verify(w.shard_id)
    assert not rep.ok and len(rep.problems) == 1
    assert isinstance(rep.problems[0], storage.CorruptPart)
    assert f"shard {w.shard_id}: batch [1, 2) part " in str(rep.problems[0])
    assert str(rep.problems[0]).endswith("column 'k' row 1: string is not valid UTF-8")


def test_verify_finds_a_count_past_int64(client: storage.Client, overflowed: storage.WriteHandle) -> None:
    rep = client.verify(overflowed.shard_id)
    assert not rep.ok
    assert [type(p) for p in rep.problems] == [DiffOverflow]
    assert "{'k': a, 'v': 1}" in str(rep.problems[0])


def test_verify_reports_a_directory_in_place_of_a_part(client: storage.Client) -> None:
    import os
    import shutil

    w = writer(client, pa.schema([("k", pa.string())]))
    w.compare_and_append(upd({"k": ["a"]}, 1), 0, 1)
    (part,) = client.state(w.shard_id).batches[0].parts
    path = client.blob.local_path(part.key)
    assert path is not None
    os.remove(path)
    os.mkdir(path)
    rep = client.verify(w.shard_id)
    assert [str(p).split(": ")[-1] for p in rep.problems] == ["unreadable (Is a directory)"]
    shutil.rmtree(path)

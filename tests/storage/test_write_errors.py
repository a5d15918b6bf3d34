"""Every error of the write and read paths, with message checks (DESIGN §3, §7; issue 2).

Each message is one line, names the shard, and names the bad value. Nothing
becomes visible on any error: the snapshot, the upper and the seqno are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pytest

import storage
from storage import Frontier, ShardId
from storage.consensus import VersionedData
from storage.errors import (
    InvalidBounds,
    InvalidInput,
    NotYetReadable,
    ReadBeforeSince,
    SchemaMismatch,
    ShardflowError,
    ShardNotFound,
    StateCorrupt,
    UpperMismatch,
)
from storage.machine import shard_key

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


def upd(
    k: list[Any], v: list[Any], t: list[Any], d: list[Any] | None = None, /, **types: pa.DataType
) -> pa.Table:
    """Updates with columns k, v, _time, _diff; `types` overrides a column's type."""
    d = d if d is not None else [1] * len(k)
    return pa.table(
        {
            "k": pa.array(k, types.get("k", pa.string())),
            "v": pa.array(v, types.get("v", pa.int64())),
            "_time": pa.array(t, types.get("_time", pa.int64())),
            "_diff": pa.array(d, types.get("_diff", pa.int64())),
        }
    )


def rows(table: pa.Table) -> list[tuple[Any, ...]]:
    return sorted(tuple(r.values()) for r in table.to_pylist())


class Shard:
    """A shard holding `a,1 @0` and `b,2 @5` with upper 10, plus a reader."""

    def __init__(self, root: str):
        self.client = storage.open(root, fsync=False)
        self.id = ShardId.new()
        self.w = self.client.open_writer(self.id, schema=SCHEMA)
        self.w.compare_and_append(upd(["a", "b"], [1, 2], [0, 5]), 0, 10)
        self.r = self.client.open_leased_reader(self.id, heartbeat=False)
        self.before = self.observe()

    def observe(self) -> tuple[Any, ...]:
        s = self.client.state(self.id)
        return (s.seqno, s.upper, s.since, rows(self.r.snapshot(9)), len(list(self.client.blob.list(""))))

    def assert_unchanged(self, parts_may_leak: bool = False) -> None:
        seqno, upper, since, snap, nparts = self.observe()
        assert (seqno, upper, since, snap) == self.before[:4]
        if not parts_may_leak:
            # Errors found before the blob write leave no orphaned parts.
            assert nparts == self.before[4]


@pytest.fixture
def shard(tmp_path: Any) -> Iterator[Shard]:
    s = Shard(str(tmp_path))
    yield s
    with contextlib.suppress(StateCorrupt):  # test_state_corrupt leaves an undecodable head
        s.r.expire()
    s.client.close()


def check_message(err: BaseException, shard: str, *needles: str) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    assert str(shard) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert isinstance(err, ShardflowError)
    return msg


# ---- SchemaMismatch ----


@pytest.mark.parametrize(
    ("table", "needles"),
    [
        pytest.param(pa.table({"k": ["a"], "_time": [10], "_diff": [1]}), ["missing column 'v'"], id="missing-column"),
        pytest.param(
            pa.table({"k": ["a"], "v": [1], "_diff": [1]}), ["missing column '_time'"], id="missing-time"
        ),
        pytest.param(
            pa.table({"k": ["a"], "v": [1], "_time": [10]}), ["missing column '_diff'"], id="missing-diff"
        ),
        pytest.param(
            pa.table({"k": ["a"], "v": [1], "x": [1.5], "_time": [10], "_diff": [1]}),
            ["unexpected column 'x'"],
            id="extra-column",
        ),
        pytest.param(upd(["a"], ["1"], [10], v=pa.string()), ["'v'", "string", "int64"], id="wrong-type"),
        # A narrower int is cast (lossless, issue 14); a value past the schema's range is not.
        pytest.param(upd(["a"], [1 << 63], [10], v=pa.uint64()), ["'v'", "uint64", "int64", "without loss"], id="int-out-of-range"),
        pytest.param(upd([1], [1], [10], k=pa.int64()), ["'k'", "int64", "string"], id="wrong-type-k"),
        pytest.param(upd(["a"], [1], [10], _time=pa.int32()), ["'_time'", "int64", "int32"], id="time-int32"),
        pytest.param(upd(["a"], [1], [10.0], _time=pa.float64()), ["'_time'", "int64", "double"], id="time-float"),
        pytest.param(upd(["a"], [1], [10], [1], _diff=pa.int8()), ["'_diff'", "int64", "int8"], id="diff-int8"),
        pytest.param(upd(["a"], [1], [10], ["1"], _diff=pa.string()), ["'_diff'", "int64", "string"], id="diff-str"),
    ],
)
def test_schema_mismatch(shard: Shard, table: pa.Table, needles: list[str]) -> None:
    with pytest.raises(SchemaMismatch) as ei:
        shard.w.compare_and_append(table, 10, 20)
    check_message(ei.value, shard.id, *needles)
    shard.assert_unchanged()
    with pytest.raises(SchemaMismatch):
        shard.w.append(table, 10, 20)
    shard.assert_unchanged()


def test_wrong_type_names_column_and_both_types(shard: Shard) -> None:
    with pytest.raises(SchemaMismatch) as ei:
        shard.w.compare_and_append(upd(["a"], [1.5], [10], v=pa.float64()), 10, 20)
    msg = check_message(ei.value, shard.id)
    assert "column 'v' has type double" in msg and "int64" in msg


def test_columns_in_another_order_are_accepted(shard: Shard) -> None:
    t = pa.table({"_diff": [1], "v": [7], "_time": [10], "k": ["z"]})
    shard.w.compare_and_append(t, 10, 20)
    assert ("z", 7, 1) in rows(shard.r.snapshot(10))


def test_open_writer_with_other_schema(shard: Shard) -> None:
    other = pa.schema([("k", pa.string()), ("v", pa.string())])
    with pytest.raises(SchemaMismatch) as ei:
        shard.client.open_writer(shard.id, schema=other)
    check_message(ei.value, shard.id, "v string", "v int64")
    shard.assert_unchanged()


@pytest.mark.parametrize("name", ["_time", "_diff"])
def test_reserved_column_names_in_schema(tmp_path: Any, name: str) -> None:
    client = storage.open(str(tmp_path), fsync=False)
    sid = ShardId.new()
    with pytest.raises(InvalidInput) as ei:
        client.open_writer(sid, schema=pa.schema([(name, pa.int64())]))
    check_message(ei.value, sid, repr(name))
    assert client.list_shards() == []


# ---- InvalidInput ----


def test_negative_time(shard: Shard) -> None:
    with pytest.raises(InvalidInput) as ei:
        shard.w.compare_and_append(upd(["a", "b"], [1, 2], [10, -3]), 10, 20)
    check_message(ei.value, shard.id, "-3", "negative")
    shard.assert_unchanged()


def test_null_time(shard: Shard) -> None:
    with pytest.raises(InvalidInput) as ei:
        shard.w.compare_and_append(upd(["a", "b"], [1, 2], [10, None]), 10, 20)
    check_message(ei.value, shard.id, "'_time'", "null")
    shard.assert_unchanged()


def test_null_diff(shard: Shard) -> None:
    with pytest.raises(InvalidInput) as ei:
        shard.w.compare_and_append(upd(["a"], [1], [10], [None]), 10, 20)
    check_message(ei.value, shard.id, "'_diff'", "null")
    shard.assert_unchanged()


def test_not_arrow(shard: Shard) -> None:
    # A list of dicts is taken (issue 14); a list of tuples is not.
    with pytest.raises(InvalidInput) as ei:
        shard.w.compare_and_append([("a", 1, 10, 1)], 10, 20)
    check_message(ei.value, shard.id, "list")
    shard.assert_unchanged()


@pytest.mark.parametrize("bad", ["nope", "s123", "S" + str(ShardId.new())[1:], str(ShardId.new()) + "\n", ""])
def test_malformed_shard_id(tmp_path: Any, bad: str) -> None:
    client = storage.open(str(tmp_path), fsync=False)
    for op in (
        lambda: client.open_writer(bad, schema=SCHEMA),
        lambda: client.open_leased_reader(bad),
        lambda: client.inspect(bad),
        lambda: ShardId(bad),
    ):
        with pytest.raises(InvalidInput) as ei:
            op()
        msg = str(ei.value)
        assert "\n" not in msg and repr(bad) in msg and "s<uuid>" in msg
    assert client.list_shards() == []


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_frontier_arguments(shard: Shard, bad: Any) -> None:
    with pytest.raises(InvalidInput) as ei:
        shard.w.compare_and_append(upd([], [], []), 10, bad)
    assert repr(bad) in str(ei.value)
    with pytest.raises(InvalidInput):
        shard.r.snapshot(bad)
    shard.assert_unchanged()


# ---- InvalidBounds ----


@pytest.mark.parametrize(
    ("times", "lower", "upper", "needles"),
    [
        pytest.param([9], 10, 20, ["update time 9 not in [10, 20)"], id="below-lower"),
        pytest.param([10, 20], 10, 20, ["update time 20 not in [10, 20)"], id="at-upper"),
        pytest.param([25], 10, 20, ["update time 25 not in [10, 20)"], id="after-upper"),
        pytest.param([], 10, 5, ["new upper 5", "expected upper 10"], id="upper-before-lower-empty"),
        pytest.param([10], 10, 5, ["new upper 5", "expected upper 10"], id="upper-before-lower"),
        pytest.param([10], 10, 10, ["1 updates", "[10, 10)"], id="data-in-empty-range"),
    ],
)
def test_invalid_bounds(shard: Shard, times: list[int], lower: int, upper: int, needles: list[str]) -> None:
    n = len(times)
    t = upd(["x"] * n, list(range(n)), times)
    with pytest.raises(InvalidBounds) as ei:
        shard.w.compare_and_append(t, lower, upper)
    check_message(ei.value, shard.id, *needles)
    shard.assert_unchanged()
    with pytest.raises(InvalidBounds):
        shard.w.append(t, lower, upper)
    shard.assert_unchanged()


def test_invalid_bounds_checked_before_upper(shard: Shard) -> None:
    # Bounds are invalid usage; it is reported even when the upper is wrong too.
    with pytest.raises(InvalidBounds):
        shard.w.compare_and_append(upd(["x"], [1], [3]), 4, 8)
    shard.assert_unchanged()


def test_time_at_max_with_empty_upper(shard: Shard) -> None:
    big = (1 << 63) - 1
    shard.w.compare_and_append(upd(["x"], [1], [big]), 10, Frontier.EMPTY)
    assert shard.w.upper == Frontier.EMPTY


# ---- UpperMismatch ----


@pytest.mark.parametrize("expected", [0, 5, 11, 30])
def test_upper_mismatch(shard: Shard, expected: int) -> None:
    t = upd(["x"], [1], [expected])
    with pytest.raises(UpperMismatch) as ei:
        shard.w.compare_and_append(t, expected, expected + 10)
    err = ei.value
    assert err.expected == expected and err.current == 10
    assert isinstance(err.current, Frontier) and isinstance(err.expected, Frontier)
    assert err.shard == shard.id
    check_message(err, shard.id, f"expected upper {expected}", "found 10")
    # A mismatch past the upper may leave orphaned parts for gc; nothing is visible.
    shard.assert_unchanged(parts_may_leak=expected > 10)


def test_upper_mismatch_other_writer(shard: Shard) -> None:
    w2 = shard.client.open_writer(shard.id, writer_id="w-other")
    w2.compare_and_append(upd(["c"], [3], [12]), 10, 15)
    with pytest.raises(UpperMismatch) as ei:
        shard.w.compare_and_append(upd(["d"], [4], [10]), 10, 20)
    assert (ei.value.expected, ei.value.current) == (10, 15)
    assert rows(shard.r.snapshot(14)) == [("a", 1, 1), ("b", 2, 1), ("c", 3, 1)]


def test_append_with_gap_is_upper_mismatch(shard: Shard) -> None:
    with pytest.raises(UpperMismatch) as ei:
        shard.w.append(upd(["x"], [1], [12]), 12, 20)
    assert (ei.value.expected, ei.value.current) == (12, 10)
    shard.assert_unchanged()


# ---- reads ----


def test_read_before_since(shard: Shard) -> None:
    assert shard.r.downgrade_since(6) == 6
    assert shard.client.state(shard.id).since == 6
    for as_of in (0, 5):
        with pytest.raises(ReadBeforeSince) as ei:
            shard.r.snapshot(as_of)
        check_message(ei.value, shard.id, f"as_of {as_of}", "since 6")
        with pytest.raises(ReadBeforeSince):
            next(iter(shard.r.listen(as_of, timeout=0)))
    assert rows(shard.r.snapshot(6)) == [("a", 1, 1), ("b", 2, 1)]
    # A since only moves forward.
    assert shard.r.downgrade_since(3) == 6
    with pytest.raises(ReadBeforeSince):
        shard.r.snapshot(5)
    # A new reader starts at the shard's since.
    r2 = shard.client.open_leased_reader(shard.id, heartbeat=False)
    assert r2.since == 6
    with pytest.raises(ReadBeforeSince):
        r2.snapshot(5)
    r2.expire()


@pytest.mark.parametrize("as_of", [10, 11, 1000])
def test_not_yet_readable(shard: Shard, as_of: int) -> None:
    with pytest.raises(NotYetReadable) as ei:
        shard.r.snapshot(as_of, timeout=0.1)
    check_message(ei.value, shard.id, f"as_of {as_of}", "upper 10")
    assert isinstance(ei.value, TimeoutError)
    shard.assert_unchanged()


def test_shard_not_found(tmp_path: Any) -> None:
    client = storage.open(str(tmp_path), fsync=False)
    sid = ShardId.new()
    with pytest.raises(ShardNotFound) as ei:
        client.open_leased_reader(sid)
    check_message(ei.value, sid, "does not exist")
    with pytest.raises(ShardNotFound) as ei:
        client.open_writer(sid)  # no schema: cannot create it
    check_message(ei.value, sid, "does not exist")
    with pytest.raises(ShardNotFound):
        client.inspect(sid)
    # None of these created it.
    assert client.list_shards() == []


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\xffnot json", b"{}", b'{"v": 99}', b"[]", b'{"v": 1, "shard_id": "x"}'],
)
def test_state_corrupt(shard: Shard, garbage: bytes) -> None:
    key = shard_key(shard.id)
    head = shard.client.consensus.head(key)
    assert head is not None
    assert shard.client.consensus.compare_and_set(key, head.seqno, VersionedData(head.seqno + 1, garbage))
    for op in (
        lambda: shard.r.snapshot(9),
        lambda: shard.w.upper,
        lambda: shard.w.compare_and_append(upd(["x"], [1], [10]), 10, 20),
        lambda: shard.client.inspect(shard.id),
        lambda: shard.client.open_leased_reader(shard.id),
        lambda: shard.client.open_writer(shard.id, schema=SCHEMA),
    ):
        with pytest.raises(StateCorrupt) as ei:
            op()
        check_message(ei.value, shard.id, f"seqno {head.seqno + 1}", "cannot decode")


def test_state_corrupt_at_creation(tmp_path: Any) -> None:
    client = storage.open(str(tmp_path), fsync=False)
    sid = ShardId.new()
    assert client.consensus.compare_and_set(shard_key(sid), None, VersionedData(0, b"garbage"))
    with pytest.raises(StateCorrupt) as ei:
        client.open_writer(sid, schema=SCHEMA)
    check_message(ei.value, sid, "seqno 0")


# ---- closing ----


def test_empty_upper_closes_the_shard(shard: Shard) -> None:
    out = shard.w.compare_and_append(upd(["c"], [3], [50]), 10, Frontier.EMPTY)
    assert out == storage.Appended(Frontier.EMPTY)
    assert shard.w.upper == Frontier.EMPTY
    # Every time is now readable, at once.
    assert rows(shard.r.snapshot(10**12, timeout=0)) == [("a", 1, 1), ("b", 2, 1), ("c", 3, 1)]
    events = list(shard.r.listen(9, timeout=0))
    assert events[-1] == storage.Progress(Frontier.EMPTY)
    w2 = shard.client.open_writer(shard.id, writer_id="w-late")
    for lower, upper in ((10, 20), (10**6, 10**6 + 1)):
        with pytest.raises(UpperMismatch) as ei:
            w2.compare_and_append(upd(["d"], [4], [lower]), lower, upper)
        assert ei.value.current == Frontier.EMPTY and ei.value.current.is_empty
        assert ei.value.expected == lower
        check_message(ei.value, shard.id, "found empty")
    # The non-CAS form is a no-op on a closed shard (its upper is past every upper).
    assert w2.append(upd(["d"], [4], [10]), 10, 20) == storage.Appended(Frontier.EMPTY)
    insp = shard.client.inspect(shard.id)
    assert insp["upper"] is None and not insp["tombstone"]
    assert insp["rows"] == 3


def test_close_with_none(shard: Shard) -> None:
    shard.w.compare_and_append(upd([], [], []), 10, None)
    assert shard.w.upper.is_empty


# ---- accepted inputs ----


class CapsuleOnly:
    """Exposes only the Arrow PyCapsule stream protocol (like polars or pandas results)."""

    def __init__(self, table: pa.Table):
        self._table = table

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self._table.__arrow_c_stream__(requested_schema)


def _inputs() -> list[Any]:
    t = upd(["c", "c"], [3, 3], [10, 11], [1, 1])
    con = duckdb.connect()
    con.register("src", t)
    return [
        pytest.param(t.to_batches()[0], id="record-batch"),
        pytest.param(pa.RecordBatchReader.from_batches(t.schema, t.to_batches()), id="batch-reader"),
        pytest.param(CapsuleOnly(t), id="arrow-c-stream"),
        pytest.param(
            con.sql("SELECT k, v, _time::BIGINT AS _time, _diff::BIGINT AS _diff FROM src"),
            id="duckdb-relation",
        ),
    ]


@pytest.mark.parametrize("data", _inputs())
def test_accepted_inputs(shard: Shard, data: Any) -> None:
    assert not isinstance(data, pa.Table)
    shard.w.compare_and_append(data, 10, 20)
    assert rows(shard.r.snapshot(19)) == [("a", 1, 1), ("b", 2, 1), ("c", 3, 2)]


def test_duckdb_relation_with_wrong_types(shard: Shard) -> None:
    rel = duckdb.sql("SELECT 'c' AS k, 3 AS v, 10 AS _time, 1 AS _diff")  # INTEGER, not BIGINT
    with pytest.raises(SchemaMismatch) as ei:
        shard.w.compare_and_append(rel, 10, 20)
    check_message(ei.value, shard.id, "int32", "int64")
    shard.assert_unchanged()

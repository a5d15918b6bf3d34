"""Table tests of `storage.updates.consolidate`, `Frontier` and `ShardId` (DESIGN §1).

Consolidation tables are `(input, since, expected)`; every table includes diffs
that cancel to zero, as in differential dataflow's `consolidation.rs` tests.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pyarrow as pa
import pytest

import storage
from storage import Frontier, ShardId, consolidate
from storage.errors import InvalidInput, ShardflowError
from storage.frontier import MAX_TIME, advance

SCHEMA = pa.schema(
    [("k", pa.string()), ("v", pa.int64()), ("_time", pa.int64()), ("_diff", pa.int64())]
)

Row = tuple[str | None, int | None, int, int]


def _table(rows: list[Row]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"k": k, "v": v, "_time": t, "_diff": d} for k, v, t, d in rows], schema=SCHEMA
    )


def _rows(table: pa.Table) -> Counter[Row]:
    """The table as a multiset; consolidated output must hold each (row, time) once."""
    out: Counter[Row] = Counter()
    for r in table.to_pylist():
        key = (r["k"], r["v"], r["_time"], r["_diff"])
        out[key] += 1
    return out


CONSOLIDATE_CASES: list[tuple[str, list[Row], int | None, list[Row]]] = [
    ("empty", [], None, []),
    ("single", [("a", 1, 0, 1)], None, [("a", 1, 0, 1)]),
    ("insert then retract cancels", [("a", 1, 3, 1), ("a", 1, 3, -1)], None, []),
    ("only zero diff dropped", [("a", 1, 3, 0)], None, []),
    ("sum per row and time", [("a", 1, 3, 1), ("a", 1, 3, 1), ("a", 1, 3, 1)], None, [("a", 1, 3, 3)]),
    (
        "different times stay apart",
        [("a", 1, 3, 1), ("a", 1, 4, -1)],
        None,
        [("a", 1, 3, 1), ("a", 1, 4, -1)],
    ),
    (
        "different rows stay apart",
        [("a", 1, 3, 1), ("a", 2, 3, -1), ("b", 1, 3, 1)],
        None,
        [("a", 1, 3, 1), ("a", 2, 3, -1), ("b", 1, 3, 1)],
    ),
    ("negative accumulation kept", [("a", 1, 0, -1), ("a", 1, 0, -2)], None, [("a", 1, 0, -3)]),
    (
        "partial cancel",
        [("a", 1, 5, 2), ("a", 1, 5, -1), ("b", 2, 5, 1), ("b", 2, 5, -1)],
        None,
        [("a", 1, 5, 1)],
    ),
    (
        "since advances then cancels",
        [("a", 1, 1, 1), ("a", 1, 2, -1), ("b", 1, 1, 1)],
        5,
        [("b", 1, 5, 1)],
    ),
    (
        "since advances and sums",
        [("a", 1, 0, 1), ("a", 1, 3, 1), ("a", 1, 7, 1)],
        4,
        [("a", 1, 4, 2), ("a", 1, 7, 1)],
    ),
    ("since below every time changes nothing", [("a", 1, 7, 1), ("a", 1, 8, 1)], 2, [("a", 1, 7, 1), ("a", 1, 8, 1)]),
    ("since at a time", [("a", 1, 3, 1), ("a", 1, 4, 1)], 3, [("a", 1, 3, 1), ("a", 1, 4, 1)]),
    ("since 0", [("a", 1, 0, 1), ("a", 1, 0, -1), ("a", 1, 1, 1)], 0, [("a", 1, 1, 1)]),
    (
        "nulls are values of their own",
        [(None, 1, 0, 1), (None, 1, 0, 1), (None, None, 0, 1), (None, None, 0, -1)],
        None,
        [(None, 1, 0, 2)],
    ),
    (
        "null cancels null after advance",
        [(None, None, 1, 1), (None, None, 2, -1)],
        2,
        [],
    ),
    (
        "large diffs",
        [("a", 1, 0, 1 << 40), ("a", 1, 0, -(1 << 40)), ("b", 1, 0, 1 << 40)],
        None,
        [("b", 1, 0, 1 << 40)],
    ),
]


@pytest.mark.parametrize(
    ("rows", "since", "expected"),
    [pytest.param(r, s, e, id=name) for name, r, s, e in CONSOLIDATE_CASES],
)
def test_consolidate_table(rows: list[Row], since: int | None, expected: list[Row]) -> None:
    out = consolidate(_table(rows), since=since)
    assert out.schema == SCHEMA
    got = _rows(out)
    # INVARIANT: unique per (row, time), no zero diffs.
    assert all(n == 1 for n in got.values()), got
    assert all(d != 0 for _, _, _, d in got)
    assert got == Counter(expected)


def test_consolidate_keeps_columns_and_types() -> None:
    schema = pa.schema(
        [("x", pa.int32()), ("s", pa.large_string()), ("_time", pa.int64()), ("_diff", pa.int64())]
    )
    t = pa.table(
        {"x": pa.array([1, 1, 2], pa.int32()), "s": pa.array(["p", "p", "q"], pa.large_string()),
         "_time": [0, 0, 0], "_diff": [1, 1, -1]},
        schema=schema,
    )
    out = consolidate(t)
    assert out.schema == schema
    assert sorted(out.to_pylist(), key=lambda r: r["x"]) == [
        {"x": 1, "s": "p", "_time": 0, "_diff": 2},
        {"x": 2, "s": "q", "_time": 0, "_diff": -1},
    ]


def test_consolidate_time_and_diff_only() -> None:
    t = pa.table({"_time": [1, 1, 2, 3], "_diff": [1, -1, 4, -4]})
    assert sorted(consolidate(t).to_pylist(), key=str) == [
        {"_time": 2, "_diff": 4},
        {"_time": 3, "_diff": -4},
    ]
    assert consolidate(t, since=3).num_rows == 0


def test_consolidate_is_idempotent() -> None:
    t = _table([("a", 1, 0, 1), ("a", 1, 0, 1), ("b", 2, 1, -1), ("b", 2, 1, 1), ("c", 3, 2, 5)])
    once = consolidate(t, since=1)
    assert _rows(consolidate(once, since=1)) == _rows(once)


# ---- advance ----

@pytest.mark.parametrize(
    ("t", "since", "expected"),
    [
        (0, Frontier(0), 0),
        (3, Frontier(5), 5),
        (5, Frontier(5), 5),
        (7, Frontier(5), 7),
        (7, Frontier.EMPTY, 7),
    ],
)
def test_advance(t: int, since: Frontier, expected: int) -> None:
    assert advance(t, since) == expected


# ---- Frontier ----

ORDERED = [Frontier(0), Frontier(1), Frontier(2), Frontier(10**12), Frontier(MAX_TIME), Frontier.EMPTY]


@pytest.mark.parametrize("i", range(len(ORDERED)))
@pytest.mark.parametrize("j", range(len(ORDERED)))
def test_frontier_total_order(i: int, j: int) -> None:
    a, b = ORDERED[i], ORDERED[j]
    assert (a < b) == (i < j)
    assert (a <= b) == (i <= j)
    assert (a > b) == (i > j)
    assert (a >= b) == (i >= j)
    assert (a == b) == (i == j)
    assert (a != b) == (i != j)
    assert (hash(a) == hash(b)) or i != j


@pytest.mark.parametrize(
    ("f", "t", "less_equal", "less_than"),
    [
        (Frontier(10), 9, False, False),
        (Frontier(10), 10, True, False),
        (Frontier(10), 11, True, True),
        (Frontier(0), 0, True, False),
        (Frontier.EMPTY, 0, False, False),
        (Frontier.EMPTY, MAX_TIME, False, False),
    ],
)
def test_frontier_less_equal(f: Frontier, t: int, less_equal: bool, less_than: bool) -> None:
    # `f.less_equal(t)` false means f "is beyond" t (DESIGN §1).
    assert f.less_equal(t) is less_equal
    assert f.less_than(t) is less_than


@pytest.mark.parametrize(
    ("f", "other", "equal"),
    [
        (Frontier(3), 3, True),
        (Frontier(3), 4, False),
        (Frontier.EMPTY, None, True),
        (Frontier(0), None, False),
        (Frontier(0), Frontier.MIN, True),
        (Frontier(1), True, False),  # a bool is not a time
        (Frontier(1), "1", False),
    ],
)
def test_frontier_equality(f: Frontier, other: object, equal: bool) -> None:
    assert (f == other) is equal


def test_frontier_compares_with_ints() -> None:
    assert Frontier(3) < 4 and not Frontier(3) < 3
    assert Frontier.EMPTY > 10**15
    assert max(Frontier(3), Frontier.EMPTY) == Frontier.EMPTY
    assert min(Frontier(3), Frontier(2)) == 2
    assert sorted([Frontier.EMPTY, Frontier(2), Frontier(1)]) == [1, 2, Frontier.EMPTY]


@pytest.mark.parametrize("value", [3, None, Frontier(3), Frontier.EMPTY])
def test_frontier_of_and_json_round_trip(value: int | Frontier | None) -> None:
    f = Frontier.of(value)
    assert isinstance(f, Frontier)
    assert Frontier.from_json(f.to_json()) == f
    assert Frontier.of(f) is f


def test_frontier_str_repr() -> None:
    assert str(Frontier(7)) == "7" and repr(Frontier(7)) == "Frontier(7)"
    assert str(Frontier.EMPTY) == "empty" and repr(Frontier.EMPTY) == "Frontier.EMPTY"
    assert Frontier.EMPTY.is_empty and not Frontier.MIN.is_empty


@pytest.mark.parametrize("bad", [-1, MAX_TIME + 1, 1.5, "3", True])
def test_frontier_rejects_non_times(bad: object) -> None:
    with pytest.raises(InvalidInput, match="frontier time must be an int64 >= 0") as ei:
        Frontier(bad)  # type: ignore[arg-type]
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, ShardflowError)


# ---- ShardId ----

_UUID = uuid.UUID("0f3a6c1e-8b2d-4e5f-9a7b-1c2d3e4f5a6b")

def test_shard_id_round_trip() -> None:
    s = ShardId.new()
    text = str(s)
    assert text.startswith("s") and len(text) == 37
    assert ShardId(text) == s
    assert str(ShardId(text)) == text
    assert isinstance(s, str)
    assert ShardId(s) is s
    assert repr(s) == f"ShardId({text!r})"
    assert {s: 1}[text] == 1  # usable as a str key
    assert ShardId.new() != s


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "nope",
        str(_UUID),  # missing the "s" prefix
        "s" + str(_UUID).upper(),
        "s" + str(_UUID) + "x",
        "s" + _UUID.hex,  # no dashes
        " s" + str(_UUID),
        "s" + str(_UUID) + "\n",  # `$` would accept a trailing newline
        "shard/s" + str(_UUID),
    ],
)
def test_shard_id_rejects_malformed(bad: str) -> None:
    with pytest.raises(InvalidInput, match="is not of the form s<uuid>") as ei:
        ShardId(bad)
    assert repr(bad) in str(ei.value)


def test_shard_id_rejects_non_str() -> None:
    with pytest.raises(InvalidInput):
        ShardId(123)  # type: ignore[arg-type]


def test_public_names() -> None:
    for name in ("Frontier", "ShardId", "consolidate", "UpdateBatch", "Progress", "open"):
        assert name in storage.__all__

"""storage.query's fast paths (plain scan, unnest without GROUP BY) give exactly the general path's
multiset: at random as_of times, over shards with random appends, retractions, since moves and
compactions (tiered and full), filtered or not; negative counts fail alike."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stq

import storage
from storage import query as q

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string())])


def table(rows: list[tuple[int | None, int, int]]) -> pa.Table:
    """(k, time, diff) -> updates; v is a function of k (NULL for k NULL or k == 3)."""
    k = [r[0] for r in rows]
    return pa.table({
        "k": pa.array(k, pa.int64()),
        "v": pa.array([None if x is None or x == 3 else f"v{x}" for x in k], pa.string()),
        "_time": pa.array([r[1] for r in rows], pa.int64()),
        "_diff": pa.array([r[2] for r in rows], pa.int64()),
    })


def reference(updates: list[tuple[int | None, int, int]], as_of: int) -> Counter[Any] | None:
    """The snapshot at as_of as a multiset of (k, v); None if a count is negative."""
    c: Counter[Any] = Counter()
    for k, t, d in updates:
        if t <= as_of:
            c[(k, None if k is None or k == 3 else f"v{k}")] += d
    if any(n < 0 for n in c.values()):
        return None
    return +c


@contextmanager
def fast_paths(on: bool, split_share: float | None = None) -> Iterator[None]:
    old = q.FAST_PATHS, q.SPLIT_MAX_SHARE
    q.FAST_PATHS = on
    if split_share is not None:
        q.SPLIT_MAX_SHARE = split_share
    try:
        yield
    finally:
        q.FAST_PATHS, q.SPLIT_MAX_SHARE = old


QUERIES = [
    "SELECT k, v FROM x",
    "SELECT k, v FROM x WHERE k >= 2",
    "SELECT v FROM x WHERE v IS NULL OR v < 'v4'",
]


def run(client: storage.Client, shard: str, as_of: int, fast: bool, split_share: float | None = None) -> list[Any]:
    """Each query's sorted rows and one aggregate; or the error type's name."""
    with fast_paths(fast, split_share):
        try:
            with storage.query.connect(client, {"x": shard}, as_of=as_of, timeout=0) as con:
                out: list[Any] = [sorted(con.sql(sql).fetchall(), key=repr) for sql in QUERIES]
                out.append(con.sql("SELECT count(*), sum(k), count(v) FROM x").fetchall())
                return out
        except storage.errors.NegativeCount:
            return ["NegativeCount"]


def expected(updates: list[tuple[int | None, int, int]], as_of: int) -> list[Any]:
    ref = reference(updates, as_of)
    if ref is None:
        return ["NegativeCount"]
    rows = list(ref.elements())
    out: list[Any] = [
        sorted(rows, key=repr),
        sorted([r for r in rows if r[0] is not None and r[0] >= 2], key=repr),
        sorted([(r[1],) for r in rows if r[1] is None or r[1] < "v4"], key=repr),
    ]
    ks = [r[0] for r in rows if r[0] is not None]
    out.append([(len(rows), sum(ks) if ks else None, sum(1 for r in rows if r[1] is not None))])
    return out


key = stq.one_of(stq.none(), stq.integers(0, 6))
diff = stq.sampled_from([1, 1, 1, 1, 2, 3, -1, -1])
append = stq.tuples(stq.just("append"), stq.lists(stq.tuples(key, diff), max_size=8), stq.integers(1, 4))
op = stq.one_of(
    append,
    append,
    stq.tuples(stq.just("compact"), stq.booleans(), stq.just(0)),
    stq.tuples(stq.just("since"), stq.integers(0, 6), stq.just(0)),
)


def play(client: storage.Client, ops: list[Any]) -> tuple[str, list[tuple[int | None, int, int]], Any]:
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    r = client.open_leased_reader(shard)
    updates: list[tuple[int | None, int, int]] = []
    upper = 0
    for i, (kind, a, b) in enumerate(ops):
        if kind == "append":
            rows = [(k, upper + (j * 7 + i) % b, d) for j, (k, d) in enumerate(a)]
            w.compare_and_append(table(rows), upper, upper + b)
            updates += rows
            upper += b
        elif kind == "compact":
            client.compact(shard, full=a)
        elif upper:
            r.downgrade_since(min(upper - 1, r.since.time + a))  # type: ignore[operator]
    return shard, updates, r


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 300 in the slow variant
@given(ops=stq.lists(op, min_size=1, max_size=10), picks=stq.lists(stq.integers(0, 10**6), min_size=1, max_size=3))
def test_fast_path_equals_general_path_and_reference(ops: list[Any], picks: list[int]) -> None:
    fast_path_equals_general_path_and_reference(ops, picks)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=stq.lists(op, min_size=1, max_size=10), picks=stq.lists(stq.integers(0, 10**6), min_size=1, max_size=3))
def test_fast_path_equals_general_path_and_reference_long(ops: list[Any], picks: list[int]) -> None:
    fast_path_equals_general_path_and_reference(ops, picks)


def fast_path_equals_general_path_and_reference(ops: list[Any], picks: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        client = storage.open(d, fsync=False)
        try:
            shard, updates, r = play(client, ops)
            s = client.state(shard)
            if not s.upper.time:
                return
            since = s.since.time or 0
            for p in picks:
                as_of = since + p % (s.upper.time - since)
                want = expected(updates, as_of)
                assert run(client, shard, as_of, fast=False) == want  # the general path
                assert run(client, shard, as_of, fast=True) == want
                # Every retraction few enough for the split path (the default share rarely is, here).
                assert run(client, shard, as_of, fast=True, split_share=1.0) == want
            r.expire()
        finally:
            client.close()


def _kinds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    seen: list[tuple[str, bool]] = []
    real = q.view_plan

    def spy(*a: Any) -> tuple[str, bool]:
        out = real(*a)
        seen.append(out)
        return out

    monkeypatch.setattr(q, "view_plan", spy)
    return seen


# (ops, as_of from the end: upper - 1 - n, the plan expected there)
SCENARIOS = {
    "inserts only, uncompacted: a scan with the time filter": (
        [("append", [(1, 1), (2, 1)], 3), ("append", [(1, 1)], 3)], 1, ("scan", True)),
    "inserts only, read at the last time: a scan without it": (
        [("append", [(1, 1), (2, 1)], 1), ("append", [(1, 1)], 1)], 0, ("scan", False)),
    "counts above 1, no retraction: unnest": (
        [("append", [(1, 2), (2, 1)], 2), ("append", [(1, 3)], 2)], 1, ("unnest", True)),
    "retractions, uncompacted: consolidate": (
        [("append", [(1, 1), (2, 1)], 2), ("append", [(1, -1)], 2)], 0, ("consolidate", True)),
    "retractions, fully compacted at since: a scan": (
        [("append", [(1, 1), (2, 1), (4, 1)], 2), ("append", [(1, -1), (5, 1)], 2), ("since", 6, 0),
         ("compact", True, 0)], 0, ("scan", False)),
    "retractions and counts above 1, fully compacted at since: unnest": (
        [("append", [(1, 1), (2, 1), (2, 1)], 2), ("append", [(1, -1)], 2), ("since", 6, 0),
         ("compact", True, 0)], 0, ("unnest", False)),
    "fully compacted, read before since reached the end: consolidate": (
        [("append", [(1, 1), (2, 1)], 2), ("append", [(1, -1)], 3), ("since", 1, 0),
         ("compact", True, 0)], 0, ("consolidate", True)),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_plan_is_taken_and_exact(name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ops, back, plan = SCENARIOS[name]
    client = storage.open(tmp_path, fsync=False)
    try:
        shard, updates, r = play(client, ops)
        as_of = client.state(shard).upper.time - 1 - back  # type: ignore[operator]
        seen = _kinds(monkeypatch)
        assert run(client, shard, as_of, fast=True) == expected(updates, as_of)
        assert seen == [plan]
        r.expire()
    finally:
        client.close()


def test_later_batches_are_not_opened(tmp_path: Any) -> None:
    """--as-of before a batch's lower: that batch's parts are neither verified nor read."""
    client = storage.open(tmp_path, fsync=False)
    try:
        shard, updates, r = play(client, [("append", [(1, 1)], 2), ("append", [(2, 1)], 2)])
        late = client.state(shard).batches[-1].parts[0]
        path = client.blob.local_path(late.key)
        assert path is not None
        os.remove(path)
        assert run(client, shard, 1, fast=True) == expected(updates, 1)
        with pytest.raises(storage.errors.CorruptPart):
            run(client, shard, 2, fast=True)
        r.expire()
    finally:
        client.close()


def test_view_plan_refuses_what_could_overflow() -> None:
    """unnest only where no row's sum can pass int64; otherwise the checked GROUP BY."""
    from storage import state as st
    from storage.frontier import Frontier

    def b(rows: int) -> st.BatchMeta:
        return st.BatchMeta(Frontier(0), Frontier(10), Frontier(0), (st.PartMeta("p", "", rows, 1),))

    assert q.view_plan([b(10)], (1, 2**31), 9) == ("unnest", False)
    assert q.view_plan([b(2**33)], (1, 2**31), 9) == ("consolidate", True)
    assert q.view_plan([b(10)], (1, 2**32), 9) == ("consolidate", True)
    assert q.view_plan([b(10)], (-1, 1), 9) == ("consolidate", True)
    assert q.view_plan([b(10)], None, 9) == ("consolidate", True)


def _spy_split(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    seen: list[tuple[str, bool]] = []
    real = q._split

    def spy(*a: Any) -> tuple[str, bool]:
        out = real(*a)
        seen.append(out)
        return out

    monkeypatch.setattr(q, "_split", spy)
    return seen


def test_few_retractions_split_exact_and_checked(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard of many inserts and one retraction (of a NULL key, the hard case for a join):
    only that row is consolidated, the rest is an anti-join; a later retraction past 0 is
    named by any query at its time, however filtered."""
    client = storage.open(tmp_path, fsync=False)
    try:
        ops: list[Any] = [("append", [(k % 7 if k % 9 else None, 1) for k in range(60)], 3),
                          ("append", [(None, -1), (2, 2)], 3),
                          ("append", [(5, -1)] * 20, 3)]
        shard, updates, r = play(client, ops)
        seen = _spy_split(monkeypatch)
        assert run(client, shard, 5, fast=True) == expected(updates, 5)
        assert seen == [("split", False)]
        # At 2 no retraction has happened yet: the statistics of the batches read say so.
        assert run(client, shard, 2, fast=True) == expected(updates, 2)
        assert len(seen) == 1
        # At 8, k=5 is retracted more often than inserted.
        assert expected(updates, 8) == ["NegativeCount"]
        for sql in ("SELECT count(*) FROM x WHERE k = 1", "SELECT 1"):
            with pytest.raises(storage.errors.NegativeCount, match="'k': 5"), fast_paths(True, 1.0), \
                    storage.query.connect(client, {"x": shard}, as_of=8, timeout=0) as con:
                con.sql(sql).fetchall()
        r.expire()
    finally:
        client.close()


def test_split_sums_are_overflow_checked(tmp_path: Any) -> None:
    client = storage.open(tmp_path, fsync=False)
    try:
        big = -(2**62)
        shard, _, r = play(client, [("append", [(k, 1) for k in range(50)], 1)])
        w = client.open_writer(shard, compact=False)
        for i in range(3):
            w.compare_and_append(table([(1, 1 + i, big)]), 1 + i, 2 + i)
        with pytest.raises((storage.errors.DiffOverflow, storage.errors.NegativeCount)), fast_paths(True, 1.0), \
                storage.query.connect(client, {"x": shard}, timeout=0) as con:
            con.sql("SELECT count(*) FROM x WHERE k = 2").fetchall()
        r.expire()
    finally:
        client.close()

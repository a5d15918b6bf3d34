"""Compaction: the pure planner on its own, then `compact` against real shards."""

from __future__ import annotations

import math
import os

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

import storage
from storage import state as st
from storage.compact import (
    FANOUT,
    MergePlan,
    advance_time,
    compact,
    plan_compaction,
    run_merge,
    tier,
)
from storage.frontier import Frontier

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


# ---------------------------------------------------------------- planner (pure)


def _batch(lo: int, hi: int, rows: int, name: str | None = None) -> st.BatchMeta:
    parts = (st.PartMeta(name or f"p{lo}-{hi}", "0" * 64, rows, rows),) if rows else ()
    return st.BatchMeta(Frontier(lo), Frontier(hi), Frontier(0), parts)


def _state(rows: list[int], since: int = 0) -> st.ShardState:
    bs = tuple(_batch(i, i + 1, r) for i, r in enumerate(rows))
    return st.ShardState("s", 0, SCHEMA, since=Frontier(since), upper=Frontier(len(rows)), batches=bs)


def _spans(plans: list[MergePlan]) -> list[tuple[int, int]]:
    return [(p.lower.time, p.upper.time) for p in plans]  # type: ignore[misc]


def _apply_plans(rows: list[int], plans: list[MergePlan]) -> list[int]:
    """The batch sizes after running `plans` (no consolidation)."""
    out, i = [], 0
    spans = {p.lower.time: p for p in plans}
    while i < len(rows):
        p = spans.get(i)
        if p is None:
            out.append(rows[i])
            i += 1
        else:
            out.append(sum(rows[p.lower.time : p.upper.time]))  # type: ignore[misc]
            i = p.upper.time  # type: ignore[assignment]
    return out


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], []),
        ([10], []),
        ([10, 10], []),  # same tier, fewer than FANOUT: keep
        ([10] * FANOUT, [(0, FANOUT)]),  # FANOUT of one tier: merge them
        ([10] * (FANOUT - 1) + [100], [(0, FANOUT)]),  # newer outranks older: stragglers join it
        ([1000, 10, 1000], [(1, 3)]),  # straggler joins the newer bigger batch, not the older one
        ([1000, 0, 10], [(1, 3)]),  # an empty batch before data merges into it
        ([1000, 10, 0], []),  # a trailing empty batch waits (idle ticks would churn)
        ([0, 0], []),  # both empty but "adjacent empties" are merged by append itself; tiers equal
        ([1000, 100, 10, 1], []),  # strictly decreasing tiers: the spine shape
    ],
)
def test_plan_table(rows: list[int], expected: list[tuple[int, int]]) -> None:
    assert _spans(plan_compaction(_state(rows))) == expected


def test_plan_empty_runs_merge_when_fanout_of_them() -> None:
    # Runs of empty batches (tier -1) are not merged by count (they cost nothing to
    # keep next to each other, and append already folds adjacent empties)...
    assert plan_compaction(_state([0] * FANOUT)) == []
    # ...but data after them absorbs them, without rewriting anything.
    plans = plan_compaction(_state([0] * 3 + [5]))
    assert _spans(plans) == [(0, 4)] and not plans[0].rewrites


def test_plan_records_since_and_tombstone_plans_nothing() -> None:
    plans = plan_compaction(_state([10] * FANOUT, since=3))
    assert plans and all(p.since == Frontier(3) for p in plans)
    tomb = st.ShardState("s", 0, SCHEMA, since=Frontier.EMPTY, upper=Frontier.EMPTY)
    assert plan_compaction(tomb) == []


def test_tier() -> None:
    assert tier(_batch(0, 1, 0)) == -1
    assert [tier(_batch(0, 1, n)) for n in (1, FANOUT - 1, FANOUT, FANOUT**2 - 1, FANOUT**2)] == [0, 0, 1, 1, 2]


def test_advance_time_stays_inside_the_batch() -> None:
    assert advance_time(Frontier(0), Frontier(10)) is None
    assert advance_time(Frontier(5), Frontier(10)) == 5
    assert advance_time(Frontier(50), Frontier(10)) == 9
    assert advance_time(Frontier(50), Frontier.EMPTY) == 50


def _run_to_fixpoint(rows: list[int], fanout: int = FANOUT) -> tuple[list[int], int]:
    """Append `rows` one batch at a time, compacting fully after each; return sizes and rows rewritten."""
    cur: list[int] = []
    rewritten = 0
    for r in rows:
        cur.append(r)
        for _ in range(100):
            plans = plan_compaction(_state(cur), fanout=fanout)
            if not plans:
                break
            rewritten += sum(p.rows for p in plans if p.rewrites)
            cur = _apply_plans(cur, plans)
        else:
            raise AssertionError("planning did not converge")
    return cur, rewritten


def test_equal_appends_stay_logarithmic_and_write_amplification_is_bounded() -> None:
    sizes, rewritten = _run_to_fixpoint([1000] * 1000)
    assert len(sizes) <= 2 * math.log2(1000)
    assert (1000 * 1000 + rewritten) / (1000 * 1000) <= 4


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.sampled_from([0, 1, 3, 10, 50, 400]), min_size=1, max_size=150))
def test_plans_are_adjacent_disjoint_and_converge(rows: list[int]) -> None:
    state = _state(rows)
    plans = plan_compaction(state)
    last = -1
    for p in plans:
        # INVARIANT: each plan is a run of >= 2 adjacent batches of the state, oldest first.
        assert len(p.inputs) >= 2
        i = state.batches.index(p.inputs[0])
        assert state.batches[i : i + len(p.inputs)] == p.inputs
        assert i > last
        last = i + len(p.inputs) - 1
    sizes, _ = _run_to_fixpoint(rows)
    # O(log n): at most FANOUT - 1 batches per tier, plus empties and one straggler.
    nonempty = [s for s in sizes if s]
    n = max(1, sum(rows))
    tiers = math.floor(math.log(n, FANOUT)) + 1
    assert len(nonempty) <= (FANOUT - 1) * tiers + 1, sizes
    # Tiers never increase from older to newer batches (the spine's shape).
    ts = [tier(_batch(0, 1, s)) for s in nonempty]
    assert ts == sorted(ts, reverse=True)


# ---------------------------------------------------------------- compact (IO)




def _upd(rows: list[tuple[str, int, int, int]]) -> pa.Table:
    k, v, t, d = zip(*rows, strict=True) if rows else ((), (), (), ())
    return pa.table(
        {"k": pa.array(k, pa.string()), "v": pa.array(v, pa.int64()), "_time": pa.array(t, pa.int64()),
         "_diff": pa.array(d, pa.int64())}
    )


def _model(updates: list[tuple[str, int, int, int]], as_of: int) -> list[tuple[str, int, int]]:
    acc: dict[tuple[str, int], int] = {}
    for k, v, t, d in updates:
        if t <= as_of:
            acc[(k, v)] = acc.get((k, v), 0) + d
    return sorted((k, v, d) for (k, v), d in acc.items() if d)


def _snap(r: storage.ReadHandle, as_of: int) -> list[tuple[str, int, int]]:
    return sorted((x["k"], x["v"], x["_diff"]) for x in r.snapshot(as_of).to_pylist())


def _fill(client: storage.Client, shard: str, n: int, per: int = 3) -> list[tuple[str, int, int, int]]:
    """`n` batches [10i, 10i+10) of inserts and retractions; returns every update."""
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    ups: list[tuple[str, int, int, int]] = []
    for i in range(n):
        b = [(f"k{(i * per + j) % 7}", j, 10 * i + j, 1) for j in range(per)]
        if i % 3 == 2:  # retract something older, sometimes cancelling it outright
            b.append((f"k{((i - 1) * per) % 7}", 0, 10 * i + 5, -1))
        ups += b
        w.compare_and_append(_upd(b), 10 * i, 10 * i + 10)
    return ups


def test_compact_preserves_every_snapshot_at_or_after_since(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    ups = _fill(client, shard, 20)
    reader = client.open_leased_reader(shard)
    reader.downgrade_since(95)
    before = client.state(shard)
    assert before.since == Frontier(95) and len(before.batches) == 20
    report = compact(client, shard)
    after = client.state(shard)
    st.check_invariants(after)
    assert report.merges_applied >= 1 and report.batches_after == len(after.batches) < 20
    assert len(after.batches) <= FANOUT
    for as_of in range(95, 200):
        assert _snap(reader, as_of) == _model(ups, as_of), as_of
    with pytest.raises(storage.ReadBeforeSince):
        reader.snapshot(94)
    # Merged batches carry the plan's since; their updates stay inside [lower, upper).
    for b in after.batches:
        if len(b.parts) and b.lower.time < 90:
            assert b.since == Frontier(95)
        for p in b.parts:
            t = pq.read_table(client.blob.local_path(p.key)).column("_time").to_pylist()
            assert all(b.lower.time <= x < b.upper.time for x in t)  # type: ignore[operator]
    reader.expire()


def test_compact_consolidates_below_since(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    for i in range(FANOUT):  # the same row inserted and retracted over and over
        w.compare_and_append(_upd([("a", 1, 2 * i, 1), ("a", 1, 2 * i + 1, -1)]), 2 * i, 2 * i + 2)
    w.compare_and_append(_upd([("b", 2, 2 * FANOUT, 1)]), 2 * FANOUT, 2 * FANOUT + 1)
    r = client.open_leased_reader(shard)
    r.downgrade_since(2 * FANOUT)
    compact(client, shard)
    s = client.state(shard)
    # Everything below since cancelled out: the first FANOUT batches merged into no parts.
    assert sum(b.rows for b in s.batches) == 1
    assert _snap(r, 2 * FANOUT) == [("b", 2, 1)]
    r.expire()


def test_compact_max_merges_and_idempotence(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, FANOUT * 3, per=1)
    r1 = compact(client, shard, max_merges=1)
    assert r1.merges_applied == 1
    compact(client, shard)
    again = compact(client, shard)
    assert again.merges_applied == 0 and again.batches_before == again.batches_after


def test_merge_whose_inputs_are_gone_is_not_applied_and_leaves_orphans(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    ups = _fill(client, shard, FANOUT)
    s0 = client.state(shard)
    [plan] = plan_compaction(s0)
    # A concurrent compaction wins first.
    compact(client, shard)
    s1 = client.state(shard)
    output = run_merge(client, s0, plan)
    new, applied = client.machine(shard).apply(st.apply_merge, plan.inputs, output)
    assert not applied and new.seqno == s1.seqno  # nothing was written
    live = {p.key for b in s1.batches for p in b.parts}
    assert output.parts and not ({p.key for p in output.parts} & live)
    # The losers' output is an orphan: gc removes it (here without grace).
    rep = client.gc(shard, grace_ms=0)
    assert all(not os.path.exists(client.blob.local_path(p.key)) for p in output.parts)
    assert rep.orphans_deleted >= len(output.parts)
    with client.open_leased_reader(shard) as r:
        assert _snap(r, 10 * FANOUT - 1) == _model(ups, 10 * FANOUT - 1)


def test_compact_raises_corrupt_part_for_a_live_batch(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, FANOUT)
    s = client.state(shard)
    os.unlink(client.blob.local_path(s.batches[2].parts[0].key))
    with pytest.raises(storage.CorruptPart, match=r"batch \[20, 30\) part "):
        compact(client, shard)
    assert client.state(shard).batches == s.batches  # nothing applied


def test_compact_on_tombstone_raises(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    _fill(client, shard, 2)
    client.finalize(shard)
    with pytest.raises(storage.Tombstone):
        client.compact(shard)


def test_writer_compacts_in_the_background_unless_opted_out(client: storage.Client) -> None:
    a, b = storage.ShardId.new(), storage.ShardId.new()
    wa = client.open_writer(a, schema=SCHEMA)  # compact=True by default
    wb = client.open_writer(b, schema=SCHEMA, compact=False)
    ups = []
    for i in range(40):
        u = [(f"k{i}", i, i, 1)]
        ups += u
        wa.compare_and_append(_upd(u), i, i + 1)
        wb.compare_and_append(_upd(u), i, i + 1)
    assert client.wait_compaction(30)
    assert not client.compactor.errors
    assert len(client.state(b).batches) == 40
    sa = client.state(a)
    st.check_invariants(sa)
    assert len(sa.batches) <= 2 * math.log2(40)
    with client.open_leased_reader(a) as r:
        for as_of in (0, 17, 39):
            assert _snap(r, as_of) == _model(ups, as_of)


def test_many_parts_merge_through_duckdb_matches_plain_consolidation(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    ups = _fill(client, shard, FANOUT * FANOUT, per=5)
    compact(client, shard)
    s = client.state(shard)
    assert len(s.batches) < FANOUT
    paths = [client.blob.local_path(p.key) for b in s.batches for p in b.parts]
    con = duckdb.connect()
    got = con.sql(
        "SELECT count(*) FROM (SELECT k, v, _time FROM read_parquet($p) GROUP BY ALL HAVING count(*) > 1)",
        params={"p": paths},
    ).fetchall()
    assert got == [(0,)]  # consolidated: unique per (row, time)
    with client.open_leased_reader(shard) as r:
        last = 10 * FANOUT * FANOUT - 1
        assert _snap(r, last) == _model(ups, last)


def test_full_compaction_collapses_to_one_batch_and_snapshot_skips_grouping(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    ups = _fill(client, shard, 14)
    r = client.open_leased_reader(shard)
    last = 139
    r.downgrade_since(last)
    rep = client.compact(shard, full=True)
    s = client.state(shard)
    assert rep.merges_applied == 1 and len(s.batches) == 1
    (b,) = s.batches
    assert b.consolidated and b.since == Frontier(last)
    from storage.read import is_collapsed

    assert is_collapsed(b, last)
    assert _snap(r, last) == _model(ups, last)
    # The state round-trips the flag; older states (no key) decode as not consolidated.
    assert st.ShardState.decode(s.encode(), "t").batches == s.batches
    assert "consolidated" not in st.BatchMeta(Frontier(0), Frontier(1), Frontier(0)).to_json()
    r.expire()


def test_partially_advanced_batch_is_not_collapsed(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    ups = _fill(client, shard, FANOUT + 1)
    r = client.open_leased_reader(shard)
    r.downgrade_since(25)  # inside the first merge's range: times >= 25 keep their own values
    client.compact(shard, full=True)
    (b,) = client.state(shard).batches
    from storage.read import is_collapsed

    assert b.consolidated and not is_collapsed(b, 10**6)
    for as_of in (25, 40, 10 * FANOUT + 9):
        assert _snap(r, as_of) == _model(ups, as_of)
    r.expire()


def test_non_rewriting_merge_keeps_its_parts_since_and_flag(client: storage.Client) -> None:
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    w.compare_and_append(_upd([("a", 1, 0, 1), ("a", 1, 1, 1)]), 0, 5)
    w.compare_and_append(_upd([]), 5, 10)  # an idle tick
    w.compare_and_append(_upd([("b", 1, 12, 1)] * 3), 10, 15)
    r = client.open_leased_reader(shard)
    r.downgrade_since(14)
    s = client.state(shard)
    [plan] = plan_compaction(s)
    assert (plan.lower.time, plan.upper.time, plan.rewrites) == (5, 15, False)
    out = run_merge(client, s, plan)
    # The parts are not rewritten, so the output must not claim they were advanced.
    assert out.parts == s.batches[2].parts and out.since == Frontier(0) and not out.consolidated
    client.compact(shard)
    assert _snap(r, 14) == [("a", 1, 2), ("b", 1, 3)]
    r.expire()

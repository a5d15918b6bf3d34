"""Table tests of `storage.controller.holds`: the pure capability math, no shards, no IO."""

from __future__ import annotations

import pytest

from storage.controller.holds import (
    ReadState,
    acquire,
    advance_upper,
    apply_policy,
    bring_up,
    hold_input,
    move_hold,
    rebase,
    since_to_push,
)
from storage.controller.policy import Multiple, ReadPolicy, ValidFrom, lag_writes_by, step_back
from storage.errors import InvariantViolated
from storage.frontier import Frontier

E = Frontier.EMPTY


def F(t: int | None) -> Frontier:
    return Frontier.of(t)


def up(name: str, policy: ReadPolicy, upper: int | None, shard_since: int = 0) -> ReadState:
    rs = ReadState(name, f"s-{name}", policy)
    bring_up(rs, F(upper), shard_since=F(shard_since))
    return rs


@pytest.mark.parametrize(
    ("policy", "upper", "shard_since", "implied"),
    [
        (ValidFrom(0), 100, 0, 0),
        (ValidFrom(10), 100, 0, 10),
        (ValidFrom(10), 100, 50, 50),  # never below the shard's since
        (step_back(), 100, 0, 99),
        (step_back(), 0, 0, 0),
        (lag_writes_by(1000, 1000), 12_345, 0, 11_000),
        (lag_writes_by(10, 1000), 12_345, 0, 12_330),
        (Multiple([ValidFrom(5), step_back()]), 100, 0, 5),
        (step_back(), None, 7, 7),  # a closed shard: the policy gives MIN, the shard's since wins
    ],
)
def test_bring_up(policy, upper, shard_since, implied):
    rs = up("a", policy, upper, shard_since)
    assert rs.implied == rs.since == F(implied)
    assert rs.caps.items() == [(implied, 1)]


@pytest.mark.parametrize(
    ("policy", "upper", "shard_since", "input_sinces", "implied"),
    [
        # a new dependent starts at its inputs' sinces when its own policy is below them ...
        (ValidFrom(0), 0, 0, [99], 99),
        (step_back(), 0, 0, [99], 99),
        (ValidFrom(0), 0, 0, [40, 99, 7], 99),  # the largest input since
        # ... and at its own capability when that is beyond them
        (ValidFrom(120), 0, 0, [99], 120),
        (step_back(), 200, 0, [99], 199),
        (ValidFrom(0), 0, 150, [99], 150),  # the shard's since still counts
        (ValidFrom(0), 50, 0, [], 0),  # no inputs: the policy alone
    ],
)
def test_bring_up_a_dependent_starts_at_its_inputs_sinces(policy, upper, shard_since, input_sinces, implied):
    rs = ReadState("d", "s-d", policy)
    bring_up(rs, F(upper), shard_since=F(shard_since), input_sinces=[F(t) for t in input_sinces])
    assert rs.implied == rs.since == F(implied)
    assert rs.caps.items() == [(implied, 1)]


def test_a_new_dependent_below_its_input_does_not_hold_it_back():
    a = up("a", step_back(), 100)
    d = ReadState("d", "s-d", ValidFrom(0))
    bring_up(d, F(0), shard_since=F(0), input_sinces=[a.since])
    hold_input(d, a)
    assert (a.since, d.since) == (F(99), F(99))
    assert d.input_holds == {"a": F(99)}
    assert a.caps.items() == [(99, 2)]


@pytest.mark.parametrize(
    ("policy", "uppers", "sinces"),
    [
        # the implied capability follows the upper forward ...
        (step_back(), [10, 20, 30], [9, 19, 29]),
        # ... never back, even if the upper seen is smaller
        (step_back(), [30, 10], [29, 29]),
        (lag_writes_by(10, 10), [25, 39, 40], [10, 20, 30]),
        (ValidFrom(3), [10, 20], [3, 3]),
    ],
)
def test_advance_upper(policy, uppers, sinces):
    rs = up("a", policy, 0)
    got = []
    for u in uppers:
        advance_upper(rs, F(u))
        got.append(rs.since.time)
    assert got == sinces
    assert rs.caps.items() == [(sinces[-1], 1)]


@pytest.mark.parametrize(
    ("moves", "since"),
    [
        # (hold index, to): two holds at 0 under a step_back policy at upper 100
        ([], 0),
        ([(0, 40)], 0),  # the other hold still pins 0
        ([(0, 40), (1, 50)], 40),
        ([(0, None), (1, None)], 99),  # both released: the policy's capability is left
        ([(0, 200), (1, 300)], 99),  # holds past the implied capability: it is the minimum
    ],
)
def test_holds_pin_since(moves, since):
    rs = up("a", ValidFrom(0), 100)
    h = [acquire(rs), acquire(rs)]
    assert h == [F(0), F(0)]
    rs.policy = step_back()
    apply_policy(rs)
    for i, t in moves:
        move_hold(rs, h[i], F(t))
        h[i] = F(t)
    assert rs.since == F(since)


def test_settle_returns_moved_states_inputs_first():
    a = up("a", ValidFrom(0), 100)
    b = up("b", ValidFrom(0), 100)
    hold_input(b, a)
    c = up("c", ValidFrom(0), 100)
    hold_input(c, b)
    assert (a.caps.items(), b.caps.items()) == ([(0, 2)], [(0, 2)])
    # Moving c's own capability moves nothing: its input holds move only with its since.
    assert apply_policy(c) == []
    a.policy = b.policy = c.policy = ValidFrom(30)
    assert [r.name for r in apply_policy(a)] == []  # b still holds a at 0
    assert [r.name for r in apply_policy(b)] == []  # c still holds b at 0
    assert [r.name for r in apply_policy(c)] == ["a", "b", "c"]
    assert (a.since, b.since, c.since) == (F(30), F(30), F(30))
    assert (b.input_holds, c.input_holds) == ({"a": F(30)}, {"b": F(30)})


def test_a_new_dependent_holds_its_input_at_the_larger_since():
    a = up("a", ValidFrom(20), 100)
    b = up("b", ValidFrom(5), 100)
    hold_input(b, a)
    assert b.input_holds == {"a": F(20)}
    assert a.caps.items() == [(20, 2)]


def test_dropping_releases_everything():
    a = up("a", ValidFrom(0), 100)
    h = acquire(a)
    a.dropped = True
    a.policy = ValidFrom(E)
    assert apply_policy(a) == [] and a.since == F(0)  # the hold still pins it
    assert a.implied.is_empty
    assert [r.name for r in move_hold(a, h, E)] == ["a"]
    assert a.since.is_empty and a.caps.is_empty()


@pytest.mark.parametrize(
    ("policy", "upper", "holds", "shard_since", "since", "implied", "moved"),
    [
        # a read-only view at since 0; the shard's real since is 99: since and implied move up
        (ValidFrom(0), 100, [], 99, 99, 99, ["a"]),
        (ValidFrom(0), 100, [0], 99, 99, 99, ["a"]),  # an older hold does not keep since below it
        # the in-memory since is already beyond it: nothing moves (the max of the two)
        (ValidFrom(120), 100, [], 99, 120, 120, []),
        (step_back(), 100, [], 99, 99, 99, []),
        (ValidFrom(0), 100, [], 0, 0, 0, []),
        (ValidFrom(0), 100, [], None, 0, 0, []),  # a tombstone: nothing to rebase onto
    ],
)
def test_rebase(policy, upper, holds, shard_since, since, implied, moved):
    rs = up("a", policy, upper)
    for _ in holds:
        acquire(rs)
    assert [r.name for r in rebase(rs, F(shard_since))] == moved
    assert (rs.since, rs.implied) == (F(since), F(implied))
    assert acquire(rs) == F(since)  # a hold taken now is at a readable time


def test_rebase_keeps_older_holds_releasable_and_since_at_the_floor():
    a = up("a", ValidFrom(0), 100)
    old = acquire(a)
    rebase(a, F(50))
    assert a.since == F(50) and a.caps.items() == [(0, 1), (50, 1)]
    assert move_hold(a, old, F(10)) == []  # still below the floor: since stays 50
    assert [r.name for r in move_hold(a, F(10), E)] == []
    assert a.caps.items() == [(50, 1)] and a.since == F(50)
    a.policy = ValidFrom(70)
    assert [r.name for r in apply_policy(a)] == ["a"] and a.since == F(70)


def test_rebase_moves_the_inputs_holds_forward():
    a = up("a", ValidFrom(0), 100)
    d = up("d", ValidFrom(0), 100)
    hold_input(d, a)
    a.policy = step_back()
    assert apply_policy(a) == [] and a.since == F(0)  # only d's hold pins a at 0 now
    assert [r.name for r in rebase(d, F(60))] == ["a", "d"]
    assert d.input_holds == {"a": F(60)} and a.since == F(60)


def test_since_never_moves_back():
    a = up("a", ValidFrom(10), 100)
    a.caps.update(F(5), +1)  # a capability below since: only a bug can add it
    with pytest.raises(InvariantViolated, match="'a'.*since would move back"):
        apply_policy(a)


@pytest.mark.parametrize(
    ("since", "handle_since", "pushed"),
    [
        (F(10), F(0), F(10)),
        (F(10), F(10), None),  # already there
        (F(5), F(10), None),  # never backwards: the handle is ahead
        (E, F(10), None),  # empty: finalized, never pushed
    ],
)
def test_since_to_push(since, handle_since, pushed):
    assert since_to_push(since, handle_since=handle_since) == pushed

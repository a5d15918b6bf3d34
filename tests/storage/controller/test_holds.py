"""Table tests of `storage.controller.holds`: the pure capability math, no shards, no IO.

Where holds live (the shard's handles) is the controller's business; these
check what one process computes: the implied capability, its own holds'
frontier, and since as seen.
"""

from __future__ import annotations

import pytest

from storage.controller.holds import (
    ReadState,
    acquire,
    advance_upper,
    apply_policy,
    bring_up,
    move_hold,
    observe,
    policy_at,
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
        (ValidFrom(500), 100, 0, 99),  # never past upper - 1: the latest time stays readable
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
    assert rs.implied == F(implied)
    assert rs.since == F(0)  # since is what the shard's handles say (`observe`), not the policy's
    assert rs.local.is_empty()


@pytest.mark.parametrize(
    ("policy", "upper", "shard_since", "input_sinces", "implied"),
    [
        # a new dependent starts at its inputs' sinces when its own policy is below them ...
        (ValidFrom(0), 0, 0, [99], 99),
        (step_back(), 0, 0, [99], 99),
        (ValidFrom(0), 0, 0, [40, 99, 7], 99),  # the largest input since
        # ... and at its own capability when that is beyond them
        (ValidFrom(120), 200, 0, [99], 120),
        (step_back(), 200, 0, [99], 199),
        (ValidFrom(0), 0, 150, [99], 150),  # the shard's since still counts
        (ValidFrom(0), 50, 0, [], 0),  # no inputs: the policy alone
    ],
)
def test_bring_up_a_dependent_starts_at_its_inputs_sinces(policy, upper, shard_since, input_sinces, implied):
    rs = ReadState("d", "s-d", policy)
    bring_up(rs, F(upper), shard_since=F(shard_since), input_sinces=[F(t) for t in input_sinces])
    assert rs.implied == F(implied)


@pytest.mark.parametrize(
    ("policy", "uppers", "implied", "moved"),
    [
        # the implied capability follows the upper forward ...
        (step_back(), [10, 20, 30], [9, 19, 29], [True, True, True]),
        # ... never back, even if the upper seen is smaller
        (step_back(), [30, 10], [29, 29], [True, False]),
        (lag_writes_by(10, 10), [25, 39, 40], [10, 20, 30], [True, True, True]),
        (ValidFrom(3), [10, 20], [3, 3], [True, False]),  # capped at upper - 1 = 0 at first
    ],
)
def test_advance_upper(policy, uppers, implied, moved):
    rs = up("a", policy, 0)
    got, got_moved = [], []
    for u in uppers:
        got_moved.append(advance_upper(rs, F(u)))
        got.append(rs.implied.time)
    assert (got, got_moved) == (implied, moved)


@pytest.mark.parametrize(
    ("policy", "upper", "implied"),
    [
        (ValidFrom(500), 100, 99),
        (ValidFrom(500), 0, 0),
        (ValidFrom(E), 100, None),  # a drop releases everything
        (step_back(), None, 0),  # a closed upper: the policy's own answer
        (lag_writes_by(0, 1), 100, 99),
    ],
)
def test_policy_at_keeps_the_latest_time_readable(policy, upper, implied):
    assert policy_at(policy, F(upper)) == F(implied)


def test_policy_never_moves_implied_back():
    rs = up("a", ValidFrom(50), 100)
    rs.policy = ValidFrom(10)
    assert apply_policy(rs) is False and rs.implied == F(50)
    rs.policy = ValidFrom(E)  # a drop: everything released
    assert apply_policy(rs) is True and rs.implied.is_empty


@pytest.mark.parametrize(
    ("moves", "frontiers"),
    [
        # (hold index, to) for two holds at 0; the process's frontier after each move (None: unmoved)
        ([], []),
        ([(0, 40)], [None]),  # the other hold still pins 0
        ([(0, 40), (1, 50)], [None, 40]),
        ([(0, None), (1, None)], [None, None]),  # both released: nothing left (empty)
        ([(0, 200), (1, 300)], [None, 200]),
    ],
)
def test_local_holds_frontier(moves, frontiers):
    rs = up("a", ValidFrom(0), 100)
    h = [acquire(rs, F(0)), acquire(rs, F(0))]
    got = []
    for i, t in moves:
        got.append(move_hold(rs, h[i], F(t)))
        h[i] = F(t)
    want = [None if f is None else F(f) for f in frontiers]
    if moves and moves[-1][1] is None and moves[0][1] is None:
        want[-1] = E  # the last release empties the process's holds: its reader goes
    assert got == want


def test_a_hold_below_since_is_a_bug():
    rs = up("a", ValidFrom(0), 100)
    observe(rs, F(30))
    with pytest.raises(InvariantViolated, match="'a'.*below since 30"):
        acquire(rs, F(10))
    assert acquire(rs, F(30)) == F(30)


def test_observed_since_never_moves_back():
    rs = up("a", ValidFrom(0), 100)
    assert observe(rs, F(40)) is True
    assert observe(rs, F(20)) is False  # a new handle registered lower: since as seen stays
    assert rs.since == F(40)


@pytest.mark.parametrize(
    ("implied", "handle_since", "after", "moved"),
    [
        (0, 99, 99, True),  # a read-only view's capability; the handle taken over is further on
        (120, 99, 120, False),  # already beyond it
        (0, None, 0, False),  # a tombstone: nothing to rebase onto
    ],
)
def test_rebase(implied, handle_since, after, moved):
    rs = up("a", ValidFrom(implied), 200)
    assert rebase(rs, F(handle_since)) is moved
    assert rs.implied == F(after)


@pytest.mark.parametrize(
    ("since", "handle_since", "pushed"),
    [
        (F(10), F(0), F(10)),
        (F(10), F(10), None),  # already there
        (F(5), F(10), None),  # never backwards: the handle is ahead
        (E, F(10), None),  # empty: released instead, never pushed
    ],
)
def test_since_to_push(since, handle_since, pushed):
    assert since_to_push(since, handle_since=handle_since) == pushed

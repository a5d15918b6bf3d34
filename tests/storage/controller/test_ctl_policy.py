"""Read policies (tables of (policy, upper, expected)), MutableAntichain, serialization."""

from __future__ import annotations

import pytest

from storage.controller import (
    LagWriteFrontier,
    Multiple,
    MutableAntichain,
    ValidFrom,
    lag_writes_by,
    step_back,
)
from storage.controller.policy import DEFAULT_POLICY, StepBack, policy_from_json
from storage.errors import InvalidInput, InvariantViolated
from storage.frontier import Frontier

E = Frontier.EMPTY


@pytest.mark.parametrize(
    "policy, upper, expected",
    [
        (ValidFrom(10), 500, 10),
        (ValidFrom(None), 500, E),
        (lag_writes_by(1000, 1000), 12_345, 11_000),
        (lag_writes_by(10, 1000), 12_345, 12_330),  # rounds to min(lag, granularity)
        (lag_writes_by(1000, 100), 12_345, 11_300),
        (lag_writes_by(1000, 1000), 500, 0),  # saturates at 0
        (lag_writes_by(0, 1000), 77, 77),
        (lag_writes_by(5, 5), E, 0),  # a closed collection does not advance
        (step_back(), 10, 9),
        (step_back(), 0, 0),
        (step_back(), E, 0),
        (Multiple([ValidFrom(5), step_back()]), 100, 5),
        (Multiple([ValidFrom(500), step_back()]), 100, 99),
        (LagWriteFrontier(lambda u: Frontier(u.time // 2)), 100, 50),
    ],
)
def test_policy_frontier(policy, upper, expected):
    assert policy.frontier(Frontier.of(upper)) == Frontier.of(expected)


def test_default_policy_is_one_second():
    assert lag_writes_by(1000, 1000) == DEFAULT_POLICY


@pytest.mark.parametrize(
    "policy",
    [ValidFrom(3), ValidFrom(None), lag_writes_by(7, 3), step_back(), Multiple([ValidFrom(1), lag_writes_by(2, 2)])],
)
def test_policy_json_roundtrip(policy):
    assert policy_from_json(policy.to_json()) == policy


def test_in_memory_only_policy_is_not_serialized():
    p = LagWriteFrontier(lambda u: u)
    assert p.to_json() is None
    assert Multiple([p, step_back()]).to_json() is None


def test_bad_policies():
    with pytest.raises(InvalidInput):
        lag_writes_by(-1, 10)
    with pytest.raises(InvalidInput):
        lag_writes_by(10, 0)
    with pytest.raises(InvalidInput):
        Multiple([])
    assert isinstance(Multiple([step_back]).policies[0], StepBack)


@pytest.mark.parametrize(
    "updates, frontier",
    [
        ([], E),
        ([(5, 1)], 5),
        ([(5, 1), (3, 2)], 3),
        ([(5, 1), (3, 2), (3, -2)], 5),
        ([(5, 1), (3, 1), (3, 1), (3, -1)], 3),  # repeated times accumulate
        ([(5, 1), (5, -1)], E),  # cancel to zero
        ([(None, 1), (4, 1)], 4),  # the empty frontier holds nothing
    ],
)
def test_mutable_antichain(updates, frontier):
    a = MutableAntichain()
    for t, d in updates:
        a.update(t, d)
    assert a.frontier() == Frontier.of(frontier)


def test_mutable_antichain_never_negative():
    a = MutableAntichain()
    a.update(3, 1)
    with pytest.raises(InvariantViolated):
        a.update(3, -2)

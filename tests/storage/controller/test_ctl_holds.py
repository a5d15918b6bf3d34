"""Read holds, implied capabilities and since; a hypothesis state machine over holds and policies."""

from __future__ import annotations

import shutil
import tempfile

import pyarrow as pa
import pytest
from ctl_helpers import KV, Clock
from hypothesis import HealthCheck, settings
from hypothesis import strategies as hs
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import storage
from storage.controller import (
    CollectionDesc,
    StorageController,
    ValidFrom,
    lag_writes_by,
    step_back,
)
from storage.errors import InvalidInput
from storage.frontier import Frontier


def advance(client, shard, to):
    w = client.open_writer(shard)
    up = w.upper
    if up < Frontier(to):
        w.compare_and_append(pa.table({"k": [], "v": []}, schema=KV).append_column(
            "_time", pa.array([], pa.int64())).append_column("_diff", pa.array([], pa.int64())), up, to)


def test_implied_capability_never_moves_back(client, ctl):
    ctl.create_collections([CollectionDesc("a", KV, read_policy=ValidFrom(0))])
    shard = ctl.collection("a").shard_id
    advance(client, shard, 100)
    ctl.set_read_policy({"a": ValidFrom(10)})
    assert ctl.frontiers("a") == (Frontier(10), Frontier(100))
    ctl.set_read_policy({"a": ValidFrom(5)})
    assert ctl.implied_capability("a") == Frontier(10)
    assert ctl.frontiers("a")[0] == Frontier(10)
    assert client.state(shard).since == Frontier(10)  # reached the critical since handle


def test_holds_accumulate_and_hold_since(client, ctl):
    ctl.create_collections([CollectionDesc("a", KV, read_policy=ValidFrom(0))])
    shard = ctl.collection("a").shard_id
    advance(client, shard, 100)
    h1, h2 = ctl.acquire_read_holds(["a", "a"])  # a repeated id: two holds
    assert h1.time == h2.time == Frontier(0)
    ctl.set_read_policy({"a": step_back()})
    assert ctl.frontiers("a")[0] == Frontier(0)
    h1.release()
    h1.release()  # idempotent: must not release h2's count
    assert ctl.frontiers("a")[0] == Frontier(0)
    h2.downgrade(40)
    assert ctl.frontiers("a")[0] == Frontier(40)
    assert client.state(shard).since == Frontier(40)
    with pytest.raises(InvalidInput, match="cannot move back"):
        h2.downgrade(30)
    with h2:
        pass
    assert h2.released
    assert ctl.frontiers("a")[0] == Frontier(99)
    assert client.state(shard).since == Frontier(99)


def test_derived_collection_holds_inputs(client, ctl):
    ctl.create_collections(
        [
            CollectionDesc("a", KV, read_policy=step_back()),
            CollectionDesc("d", KV, read_policy=ValidFrom(0), depends_on=("a",)),
        ]
    )
    sa, sd = ctl.collection("a").shard_id, ctl.collection("d").shard_id
    advance(client, sa, 100)
    advance(client, sd, 100)
    assert ctl.frontiers("a")[0] == Frontier(0)  # held by d's read frontier
    ctl.set_read_policy({"d": ValidFrom(30)})
    assert ctl.frontiers("d")[0] == Frontier(30)
    assert ctl.frontiers("a")[0] == Frontier(30)
    ctl.set_read_policy({"d": step_back()})
    assert ctl.frontiers("a")[0] == Frontier(99)
    ctl.drop_collections(["d"])
    advance(client, sa, 200)
    assert ctl.frontiers("a")[0] == Frontier(199)


def test_new_dependent_starts_at_its_inputs_since(client, ctl):
    # "Its initial since must be advanced as far as its dependency": d is not readable below a's since.
    ctl.create_collections([CollectionDesc("a", KV, read_policy=step_back())])
    sa = ctl.collection("a").shard_id
    advance(client, sa, 100)
    assert ctl.frontiers("a") == (Frontier(99), Frontier(100))
    ctl.create_collections([CollectionDesc("d", KV, read_policy=ValidFrom(0), depends_on=("a",))])
    assert ctl.frontiers("d") == (Frontier(99), Frontier(0))
    assert ctl.implied_capability("d") == Frontier(99)
    # d holds a at d's since (99), so a's since stays put and moves on with its policy
    assert ctl.frontiers("a")[0] == Frontier(99)
    h = ctl.acquire_read_holds(["d"])[0]
    assert h.time == Frontier(99)
    h.release()
    advance(client, ctl.collection("d").shard_id, 150)
    advance(client, sa, 200)
    ctl.set_read_policy({"d": step_back()})
    assert ctl.frontiers("d")[0] == Frontier(149)
    assert ctl.frontiers("a")[0] == Frontier(149)  # held by d


class HoldsMachine(RuleBasedStateMachine):
    """Invariant: since <= every live hold, since <= implied capability, both monotone;
    the shard's own since never passes a hold either."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.clock = Clock()
        self.client = storage.open(self.dir, clock=self.clock, fsync=False)
        self.ctl = StorageController.open(self.client, clock=self.clock, tick_interval_ms=None, compact=False)
        self.ctl.create_collections([CollectionDesc("a", KV, read_policy=ValidFrom(0))])
        self.shard = self.ctl.collection("a").shard_id
        self.upper = 0
        self.holds = []
        self.last_since = Frontier.MIN
        self.last_implied = Frontier.MIN

    def teardown(self) -> None:
        self.ctl.close()
        self.client.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(by=hs.integers(1, 50))
    def write(self, by):
        self.upper += by
        advance(self.client, self.shard, self.upper)
        self.ctl.frontiers("a")  # the controller learns the new upper

    @rule(p=hs.one_of(
        hs.integers(0, 300).map(ValidFrom),
        hs.just(step_back()),
        hs.tuples(hs.integers(0, 40), hs.integers(1, 40)).map(lambda x: lag_writes_by(*x)),
    ))
    def set_policy(self, p):
        self.ctl.set_read_policy({"a": p})

    @rule(n=hs.integers(1, 3))
    def acquire(self, n):
        hs_ = self.ctl.acquire_read_holds(["a"] * n)
        since = self.ctl.frontiers("a")[0]
        # At since, or at what this process's reader already holds (it never moves back).
        mine = [h.time for h in self.holds if not h.released]
        assert all(h.time == since or (mine and h.time == min(mine)) for h in hs_)
        self.holds.extend(hs_)

    @precondition(lambda self: self.holds)
    @rule(i=hs.integers(0, 100))
    def release(self, i):
        self.holds.pop(i % len(self.holds)).release()

    @precondition(lambda self: self.holds)
    @rule(i=hs.integers(0, 100), by=hs.integers(0, 30))
    def downgrade(self, i, by):
        h = self.holds[i % len(self.holds)]
        h.downgrade(h.time.time + by)

    @invariant()
    def since_bounded(self):
        since, _ = self.ctl.frontiers("a")
        implied = self.ctl.implied_capability("a")
        shard_since = self.client.state(self.shard).since
        assert since <= implied
        assert since >= self.last_since and implied >= self.last_implied
        for h in self.holds:
            assert since <= h.time and shard_since <= h.time
        assert shard_since <= since
        self.last_since, self.last_implied = since, implied


HoldsMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_holds_state_machine = HoldsMachine.TestCase

"""A model of read holds across processes: several controllers on one data directory.

A hypothesis state machine runs two writable controllers (`fence=False`: they
join the catalog epoch side by side, neither fences the other) and one
read-only controller over ONE data directory, sharing ONE fake clock (given to
`storage.open` and to every controller), so the hold readers' leases are under
the test's control. Rules: acquire holds on a random controller and
collection, downgrade and release them, change read policies, append (moving
uppers), compact, create base and dependent collections (`depends_on`), drop
leaves (dropping an input with a live dependent must raise), tick, restart
(close + reopen with the same role: close releases that process's holds) and
crash (the object is abandoned without `close()`: its leased holds bind until
their lease runs out, which `expire_crashed` makes happen).

Leases and heartbeats. Every controller has `hold_lease_ms=LEASE_MS` (10 min of
the fake clock). A controller's heartbeat thread beats every
`hold_lease_ms / 3` REAL seconds (200 s), so it never beats during a test
run: heartbeats happen only where the model calls `heartbeat_holds()`. The
fake clock moves only in `expire_crashed`, in steps of a third of the lease,
and every live controller heartbeats after each step; so a live controller's
hold readers never expire, while a crashed one's (last renewed at or before
the crash) are gone after four steps. A crashed controller's threads are
stopped (`_stop`), as a dead process's would be; nothing of its state is
released.

Invariants, from the shard states (`client.state`), after every step:
- a live hold binds: the shard's stored since and its wanted since (the min
  over the live handles) are `<= hold.time`, for every unreleased hold of a
  live controller and every hold of a crashed controller whose lease has not
  run out; a shard with such a hold is never a tombstone;
- a shard's since never moves back;
- a live dependent's input's wanted since is `<=` the dependent's;
- `read_at_hold` reads a snapshot at a live hold's time (below the upper) and
  compares it with the model's contents;
- once every hold on a dropped collection is gone (released, closed or
  expired), one `tick()` of a writable controller makes its shard a tombstone.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa
import pytest
from ctl_helpers import KV, Clock
from hypothesis import HealthCheck, settings
from hypothesis import strategies as hs
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import storage
from storage import state as st
from storage.controller import (
    CollectionDesc,
    StorageController,
    ValidFrom,
    lag_writes_by,
    step_back,
)
from storage.errors import InvalidInput
from storage.frontier import Frontier

LEASE_MS = 600_000  # the heartbeat thread would beat every 200 real seconds: never, here
SLOTS = ("w0", "w1", "ro")  # role names; "ro" is the read-only controller
MAX_COLLS = 6

POLICIES = hs.one_of(
    hs.integers(0, 200).map(ValidFrom),
    hs.just(step_back()),
    hs.tuples(hs.integers(0, 30), hs.integers(1, 30)).map(lambda x: lag_writes_by(*x)),
)


@dataclass
class Coll:
    name: str
    shard: str
    deps: tuple[str, ...]
    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (k, v, time)
    upper: int = 0
    dropped: bool = False


@dataclass
class Held:
    """One ReadHold in the model: who took it, on which shard."""

    slot: str
    gen: int  # the controller incarnation that took it
    coll: Coll
    hold: object
    crashed: bool = False  # its controller crashed; binds until expire_crashed


def _append(client: storage.Client, c: Coll, by: int) -> None:
    t = c.upper
    rows = pa.table(
        {"k": [f"k{t}"], "v": [t], "_time": pa.array([t], pa.int64()), "_diff": pa.array([1], pa.int64())}
    )
    client.open_writer(c.shard, writer_id="model", compact=False).compare_and_append(rows, t, t + by)
    c.rows.append((f"k{t}", t, t))
    c.upper = t + by


class HoldsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.clock = Clock()
        self.client = storage.open(self.dir, clock=self.clock, fsync=False)
        self.ctls: dict[str, StorageController | None] = {}
        self.gens: dict[str, int] = dict.fromkeys(SLOTS, 0)
        self.crashed: list[StorageController] = []
        for slot in SLOTS:
            self._open(slot)
        self.colls: dict[str, Coll] = {}
        self.held: list[Held] = []
        self.last_since: dict[str, Frontier] = {}
        self.n = 0
        self._create(self._writer(), "a", (), ValidFrom(0))
        self._create(self._writer(), "b", (), step_back())

    # ---------------------------------------------------------------- plumbing

    def _open(self, slot: str) -> None:
        self.ctls[slot] = StorageController.open(
            self.client, clock=self.clock, tick_interval_ms=None, compact=False,
            read_only=slot == "ro", fence=False, role=slot, hold_lease_ms=LEASE_MS,
        )
        self.gens[slot] += 1

    def teardown(self) -> None:
        for ctl in self.ctls.values():
            if ctl is not None:
                ctl.close()
        for ctl in self.crashed:
            ctl._mgmt.desired.close()  # its DuckDB temp dir; shard state is left alone
        self.client.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _live(self) -> list[str]:
        return [s for s in SLOTS if self.ctls[s] is not None]

    def _writers(self) -> list[str]:
        return [s for s in self._live() if s != "ro"]

    def _writer(self) -> StorageController:
        ctl = self.ctls[self._writers()[0]]
        assert ctl is not None
        return ctl

    def _pick(self, xs: list, i: int):
        return xs[i % len(xs)]

    def _live_colls(self) -> list[Coll]:
        return [c for c in self.colls.values() if not c.dropped]

    def _binding(self) -> list[Held]:
        """Holds that must still bind: unreleased ones of live controllers, and crashed ones."""
        return [h for h in self.held if h.crashed or not h.hold.released]

    def _create(self, ctl: StorageController, name: str, deps: tuple[str, ...], policy) -> None:
        ctl.create_collections([CollectionDesc(name, KV, read_policy=policy, depends_on=deps)])
        self.colls[name] = Coll(name, ctl.collection(name).shard_id, deps)

    def _dependents(self, name: str) -> list[Coll]:
        return [c for c in self._live_colls() if name in c.deps]

    # ---------------------------------------------------------------- rules

    @precondition(lambda self: self._live())
    @rule(slot=hs.integers(0, 2), which=hs.lists(hs.integers(0, 100), min_size=1, max_size=3))
    def acquire(self, slot, which):
        s = self._pick(self._live(), slot)
        live = self._live_colls()
        names = [self._pick(live, i).name for i in which]
        ctl = self.ctls[s]
        for h in ctl.acquire_read_holds(names):
            self.held.append(Held(s, self.gens[s], self.colls[h.name], h))

    @precondition(lambda self: any(not h.crashed and not h.hold.released for h in self.held))
    @rule(i=hs.integers(0, 100), by=hs.integers(0, 40))
    def downgrade(self, i, by):
        h = self._pick([h for h in self.held if not h.crashed and not h.hold.released], i)
        h.hold.downgrade(h.hold.time.time + by)

    @precondition(lambda self: any(not h.crashed and not h.hold.released for h in self.held))
    @rule(i=hs.integers(0, 100))
    def release(self, i):
        h = self._pick([h for h in self.held if not h.crashed and not h.hold.released], i)
        h.hold.release()
        self.held.remove(h)

    @precondition(lambda self: self._live())
    @rule(slot=hs.integers(0, 2), i=hs.integers(0, 100), p=POLICIES)
    def set_policy(self, slot, i, p):
        c = self._pick(self._live_colls(), i)
        self.ctls[self._pick(self._live(), slot)].set_read_policy({c.name: p})

    @rule(i=hs.integers(0, 100), by=hs.integers(1, 40))
    def append(self, i, by):
        _append(self.client, self._pick(self._live_colls(), i), by)

    @rule(i=hs.integers(0, 100))
    def compact(self, i):
        self.client.compact(self._pick(self._live_colls(), i).shard)

    @precondition(lambda self: self._writers() and len(self._live_colls()) < MAX_COLLS)
    @rule(slot=hs.integers(0, 1), which=hs.lists(hs.integers(0, 100), max_size=2, unique=True), p=POLICIES)
    def create(self, slot, which, p):
        live = self._live_colls()
        deps = tuple(sorted({self._pick(live, i).name for i in which}))
        self.n += 1
        self._create(self.ctls[self._pick(self._writers(), slot)], f"c{self.n}", deps, p)

    @precondition(lambda self: self._writers())
    @rule(slot=hs.integers(0, 1), i=hs.integers(0, 100))
    def drop(self, slot, i):
        ctl = self.ctls[self._pick(self._writers(), slot)]
        c = self._pick(self._live_colls(), i)
        if self._dependents(c.name):
            with pytest.raises(InvalidInput):
                ctl.drop_collections([c.name])
            return
        if len(self._live_colls()) == 1:
            return  # keep one to play with
        ctl.drop_collections([c.name])
        c.dropped = True

    @precondition(lambda self: self._live())
    @rule(slot=hs.integers(0, 2))
    def tick(self, slot):
        s = self._pick(self._live(), slot)
        self.ctls[s].tick()
        if s != "ro":
            self._check_finalized()

    @rule(slot=hs.sampled_from(SLOTS))
    def restart(self, slot):
        """Close (its holds are released) and reopen with the same role; or open a crashed slot anew."""
        ctl = self.ctls[slot]
        if ctl is not None:
            ctl.close()
            self.held = [h for h in self.held if h.crashed or h.slot != slot]
        self._open(slot)

    @precondition(lambda self: len(self._live()) > 1)
    @rule(slot=hs.sampled_from(SLOTS))
    def crash(self, slot):
        """Abandon the controller without close(): its leased hold readers stay until their lease ends."""
        ctl = self.ctls[slot]
        if ctl is None:
            return
        ctl._stop.set()  # the process is gone: its (idle) threads with it
        self.ctls[slot] = None
        self.crashed.append(ctl)
        for h in self.held:
            if h.slot == slot and not h.crashed:
                if h.hold.released:
                    continue
                h.crashed = True
        self.held = [h for h in self.held if h.crashed or not h.hold.released]

    @rule()
    def expire_crashed(self):
        """Move the clock past the lease in thirds, the live controllers heartbeating at each step."""
        for _ in range(4):
            self.clock.advance(LEASE_MS // 3)
            for s in self._live():
                self.ctls[s].heartbeat_holds()
        self.held = [h for h in self.held if not h.crashed]

    @precondition(lambda self: any(not h.crashed and not h.hold.released for h in self.held))
    @rule(i=hs.integers(0, 100))
    def read_at_hold(self, i):
        h = self._pick([h for h in self.held if not h.crashed and not h.hold.released], i)
        c, t = h.coll, h.hold.time.time
        if t is None or t >= c.upper:
            return
        with self.client.open_leased_reader(c.shard, heartbeat=False) as r:
            got = r.snapshot(t, timeout=5)
        want = sorted((k, v, 1) for k, v, time in c.rows if time <= t)
        assert sorted((d["k"], d["v"], d["_diff"]) for d in got.to_pylist()) == want, (c.name, t)

    # ---------------------------------------------------------------- invariants

    def _check_finalized(self) -> None:
        """Right after a writable controller's tick: every dropped shard nothing holds is a tombstone."""
        held = {h.coll.shard for h in self._binding()}
        for c in self.colls.values():
            if c.dropped and c.shard not in held:
                s = self.client.state(c.shard)
                assert s.is_tombstone, (c.name, "dropped, every hold gone, still", st.holders(s, self.clock()))

    @invariant()
    def holds_bind(self):
        now = self.clock()
        for h in self._binding():
            s = self.client.state(h.coll.shard)
            assert not s.is_tombstone, (h.coll.name, "finalized under a live hold", h.hold)
            assert s.since <= h.hold.time, (h.coll.name, s.since, h.hold, h.slot)
            assert st.wanted_since(s, now) <= h.hold.time, (h.coll.name, st.holders(s, now), h.hold, h.slot)

    @invariant()
    def since_monotone(self):
        for c in self.colls.values():
            s = self.client.state(c.shard)
            since = s.since
            last = self.last_since.get(c.shard, Frontier.MIN)
            assert since >= last, (c.name, last, since)
            self.last_since[c.shard] = since

    @invariant()
    def inputs_held_by_dependents(self):
        now = self.clock()
        for d in self._live_colls():
            dw = st.wanted_since(self.client.state(d.shard), now)
            for name in d.deps:
                inp = self.colls[name]
                assert not inp.dropped
                iw = st.wanted_since(self.client.state(inp.shard), now)
                assert iw <= dw, (f"input {name} since {iw} passed its dependent {d.name}'s {dw}")


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

TestHoldsModel = HoldsModel.TestCase
TestHoldsModel.settings = settings(max_examples=15, stateful_step_count=25, **_SETTINGS)


class HoldsModelSlow(HoldsModel):
    pass


TestHoldsModelSlow = pytest.mark.slow(HoldsModelSlow.TestCase)
TestHoldsModelSlow.settings = settings(max_examples=100, stateful_step_count=50, **_SETTINGS)

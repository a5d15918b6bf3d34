"""Model-based test of a shard's lifecycle: appends, compaction, gc, since, lease expiry, reopen.

The model is a plain list of updates plus the readers' sinces and lease
expiries under a fake clock. After every step that could change the data, every
snapshot at every valid `as_of` (`since <= as_of < upper`) must equal the
model's consolidation at that `as_of`, and reads before since must be refused.
(The core shard model, test_shard_model.py, covers the write/read API itself.)
"""

from __future__ import annotations

import shutil
import tempfile

import pyarrow as pa
import pytest
from hypothesis import settings
from hypothesis import strategies as hs
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

import storage
from storage import state as st

SCHEMA = pa.schema([("k", pa.string())])
LEASE = 1000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


class Lifecycle(RuleBasedStateMachine):
    readers = Bundle("readers")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lifecycle-")
        self.clock = FakeClock()
        self.client = storage.open(self.dir, fsync=False, clock=self.clock)
        self.shard = storage.ShardId.new()
        self.writer = self.client.open_writer(self.shard, schema=SCHEMA, compact=False)
        self.updates: list[tuple[str, int, int]] = []
        self.upper = 0
        self.since = 0
        # reader id -> [handle, since, lease expiry]; removed once the model says expired.
        self.model_readers: dict[str, list] = {}

    def teardown(self) -> None:
        self.client.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- model helpers ----
    def expected(self, as_of: int) -> list[tuple[str, int]]:
        acc: dict[str, int] = {}
        for k, t, d in self.updates:
            if t <= as_of:
                acc[k] = acc.get(k, 0) + d
        return sorted((k, d) for k, d in acc.items() if d)

    def live(self, rid: str) -> bool:
        return rid in self.model_readers and self.model_readers[rid][2] > self.clock.now

    def forget_expired(self) -> None:
        for rid in [r for r in self.model_readers if not self.live(r)]:
            del self.model_readers[rid]

    @staticmethod
    def got(t: pa.Table) -> list[tuple[str, int]]:
        return sorted((x["k"], x["_diff"]) for x in t.to_pylist())

    # ---- rules ----
    @rule(
        ups=hs.lists(hs.tuples(hs.sampled_from("abcd"), hs.integers(0, 3), hs.sampled_from([1, 1, -1, 2])), max_size=6),
        width=hs.integers(1, 4),
    )
    def append(self, ups: list[tuple[str, int, int]], width: int) -> None:
        rows = [(k, self.upper + min(dt, width - 1), d) for k, dt, d in ups]
        t = pa.table({
            "k": pa.array([r[0] for r in rows], pa.string()),
            "_time": pa.array([r[1] for r in rows], pa.int64()),
            "_diff": pa.array([r[2] for r in rows], pa.int64()),
        })
        self.writer.compare_and_append(t, self.upper, self.upper + width)
        self.updates += rows
        self.upper += width

    @rule(fanout=hs.sampled_from([2, 3, 6]))
    def compact(self, fanout: int) -> None:
        self.client.compact(self.shard, fanout=fanout)

    @rule()
    def gc(self) -> None:
        # grace 0 is safe here: nothing is in flight between steps.
        self.client.gc(self.shard, grace_ms=0)

    @rule(target=readers)
    def open_reader(self) -> str:
        self.forget_expired()
        r = self.client.open_leased_reader(self.shard, heartbeat=False, lease_ms=LEASE)
        assert r.since == self.client.state(self.shard).since
        self.model_readers[r.reader_id] = [r, r.since.time, self.clock.now + LEASE]
        return r.reader_id

    @rule(rid=readers, to=hs.integers(0, 40))
    def downgrade_since(self, rid: str, to: int) -> None:
        if rid not in self.model_readers:
            return
        h = self.model_readers[rid][0]
        if not self.live(rid):
            with pytest.raises(storage.LeaseExpired):
                h.downgrade_since(to)
            del self.model_readers[rid]
            return
        got = h.downgrade_since(to)
        m = self.model_readers[rid]
        m[1] = max(m[1], to)
        m[2] = self.clock.now + LEASE
        assert got.time == m[1]

    @rule(rid=readers)
    def heartbeat(self, rid: str) -> None:
        if rid not in self.model_readers:
            return
        h = self.model_readers[rid][0]
        if not self.live(rid):
            with pytest.raises(storage.LeaseExpired):
                h.heartbeat()
            del self.model_readers[rid]
            return
        h.heartbeat()
        self.model_readers[rid][2] = self.clock.now + LEASE

    @rule(rid=consumes(readers))
    def expire(self, rid: str) -> None:
        if rid in self.model_readers:
            self.model_readers.pop(rid)[0].expire()

    @rule(ms=hs.sampled_from([1, LEASE // 2, LEASE, 3 * LEASE]))
    def tick(self, ms: int) -> None:
        self.clock.now += ms

    @rule(rid=readers, data=hs.data())
    def reader_snapshot(self, rid: str, data: hs.DataObject) -> None:
        if rid not in self.model_readers or self.upper == 0:
            return
        h, since, _ = self.model_readers[rid]
        if not self.live(rid):
            with pytest.raises(storage.LeaseExpired):
                h.snapshot(self.upper - 1)
            del self.model_readers[rid]
            return
        if since > self.upper - 1:
            return
        # INVARIANT: a live reader's since is never overtaken, so any as_of >= it is exact.
        as_of = data.draw(hs.integers(since, self.upper - 1))
        assert self.got(h.snapshot(as_of, validate=False)) == self.expected(as_of)

    @rule()
    def reopen(self) -> None:
        """A new client over the same root (a restart); live readers re-attach by id."""
        self.forget_expired()
        self.client.close()
        self.client = storage.open(self.dir, fsync=False, clock=self.clock)
        self.writer = self.client.open_writer(self.shard, compact=False)
        for rid, m in self.model_readers.items():
            h = self.client.open_leased_reader(self.shard, reader_id=rid, heartbeat=False, lease_ms=LEASE)
            assert h.since.time == m[1]
            m[0] = h
            m[2] = self.clock.now + LEASE

    # ---- checks ----
    @invariant()
    def since_and_upper(self) -> None:
        s = self.client.state(self.shard)
        st.check_invariants(s)
        assert s.upper.time == self.upper
        assert s.since.time is not None and s.since.time >= self.since  # since never moves back
        self.since = s.since.time
        live = [m[1] for rid, m in self.model_readers.items() if self.live(rid)]
        if live:
            assert self.since <= min(live)

    @precondition(lambda self: self.upper > 0)
    @rule()
    def every_snapshot_matches(self) -> None:
        s = self.client.state(self.shard)
        since = s.since.time or 0
        with self.client.open_leased_reader(self.shard, heartbeat=False, lease_ms=LEASE) as r:
            for as_of in range(since, self.upper):
                assert self.got(r.snapshot(as_of, validate=False)) == self.expected(as_of), (as_of, since)
            if since > 0:
                with pytest.raises(storage.ReadBeforeSince):
                    r.snapshot(since - 1)
        assert self.client.verify(self.shard).ok
        live = {p.key for b in self.client.state(self.shard).batches for p in b.parts}
        on_disk = {m.key for m in self.client.blob.list(f"{self.shard}/")}
        assert live <= on_disk


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)

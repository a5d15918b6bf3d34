"""Model-based test: one shard against a plain-Python reference model (issue 2).

The model is a list of updates `(k, v, time, diff)`, an upper, a since, the
leased readers' sinces and each writer's committed idempotency tokens. Rules
drive two writers (CAS appends with right and wrong expected uppers, non-CAS
appends, empty batches, token retries), snapshots, listens, `downgrade_since`
and reopening the client; after every step the shard's state must satisfy
`check_invariants` and agree with the model's upper and since.

Small value domains make consolidation matter: diffs cancel to zero often.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as hs
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import storage
from storage import AlreadyCommitted, Appended, Frontier, Progress, ShardId, UpdateBatch
from storage.errors import InvalidBounds, NotYetReadable, ReadBeforeSince, UpperMismatch
from storage.state import check_invariants

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])
UPDATE_SCHEMA = storage.updates.update_schema(SCHEMA)
WRITERS = ("w1", "w2")
LEASE_MS = 10 * 60 * 1000  # never expires during a run; leases are not what this models

Update = tuple[str, int, int, int]  # (k, v, time, diff)

# (k, v, time offset, diff); times are placed inside the batch's [lower, upper).
row_specs = hs.lists(
    hs.tuples(hs.sampled_from("ab"), hs.integers(0, 1), hs.integers(0, 5), hs.sampled_from([-1, 1, 1, 2])),
    max_size=5,
)
writers = hs.sampled_from(WRITERS)


def place(specs: list[tuple[str, int, int, int]], lower: int, width: int) -> list[Update]:
    if width == 0:
        return []
    return [(k, v, lower + off % width, d) for k, v, off, d in specs]


def to_table(updates: list[Update]) -> pa.Table:
    return pa.table(
        {
            "k": pa.array([u[0] for u in updates], pa.string()),
            "v": pa.array([u[1] for u in updates], pa.int64()),
            "_time": pa.array([u[2] for u in updates], pa.int64()),
            "_diff": pa.array([u[3] for u in updates], pa.int64()),
        },
        schema=UPDATE_SCHEMA,
    )


def snap_counter(table: pa.Table) -> Counter[tuple[str, int]]:
    out: Counter[tuple[str, int]] = Counter()
    for r in table.to_pylist():
        key = (r["k"], r["v"])
        # Consolidated: each row once, never a zero diff.
        assert key not in out and r["_diff"] != 0, (key, r)
        out[key] = r["_diff"]
    return out


def nonzero(c: Counter[Any]) -> Counter[Any]:
    return Counter({k: d for k, d in c.items() if d != 0})


class Listening:
    """A listen in progress: started at `as_of`, consumed up to `frontier`."""

    def __init__(self, gen: Iterator[UpdateBatch | Progress], as_of: int, base: Counter[tuple[str, int]]):
        self.gen = gen
        self.as_of = as_of
        self.base = base  # snapshot(as_of), as read when the listen started
        self.frontier = as_of + 1
        self.started = False  # SUBTLE: listen is a generator; it checks since on the first next()
        self.got: Counter[tuple[str, int, int]] = Counter()


class ShardModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="shard-model-")
        self.shard = ShardId.new()
        # The model.
        self.updates: list[Update] = []
        self.upper = 0
        self.since = 0
        self.readers: dict[str, int] = {}  # live leased readers: id -> since
        self.tokens: dict[str, list[tuple[str, list[Update], int, int]]] = {w: [] for w in WRITERS}
        self.n_tokens = 0
        self.n_readers = 0
        self.listening: Listening | None = None
        # The system under test.
        self.client: storage.Client | None = None
        self._open(create=True)

    # ---- helpers ----
    def _open(self, create: bool = False) -> None:
        self.client = storage.open(self.root, fsync=False)
        self.w = {
            w: self.client.open_writer(self.shard, schema=SCHEMA if create else None, writer_id=w)
            for w in WRITERS
        }
        self.n_readers += 1
        rid = f"r{self.n_readers}"
        self.r = self.client.open_leased_reader(self.shard, reader_id=rid, lease_ms=LEASE_MS, heartbeat=False)
        self.readers[rid] = self.since  # a new reader starts at the shard's since
        assert self.r.since == self.since

    def _recompute_since(self) -> None:
        if self.readers:
            self.since = min(max(self.since, min(self.readers.values())), self.upper)

    def _model_snapshot(self, as_of: int) -> Counter[tuple[str, int]]:
        c: Counter[tuple[str, int]] = Counter()
        for k, v, t, d in self.updates:
            if t <= as_of:
                c[(k, v)] += d
        return nonzero(c)

    def _token(self) -> str:
        self.n_tokens += 1
        return f"tok{self.n_tokens}"

    def _commit(self, ups: list[Update], new_upper: int) -> None:
        self.updates.extend(ups)
        self.upper = new_upper
        self._recompute_since()

    def _close_client(self) -> None:
        assert self.client is not None
        # Let the background compactor finish before the files go away.
        assert self.client.wait_compaction(30)
        merges = self.client.compactor.totals.merges_applied
        event(f"background compaction merged: {'yes' if merges else 'no'}")
        self.client.close()

    def teardown(self) -> None:
        try:
            self._end_listen()
        finally:
            if self.client is not None:
                self._close_client()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- writes ----
    @initialize(width=hs.integers(1, 3), specs=row_specs)
    def first_append(self, width: int, specs: list[Any]) -> None:
        """Start every run with some data, so reads have something to read."""
        self.cas_append("w1", width, specs, use_token=False)

    @rule(writer=writers, width=hs.integers(0, 3), specs=row_specs, use_token=hs.booleans())
    def cas_append(self, writer: str, width: int, specs: list[Any], use_token: bool) -> None:
        lower, new_upper = self.upper, self.upper + width
        ups = place(specs, lower, width)
        token = self._token() if use_token else None
        out = self.w[writer].compare_and_append(to_table(ups), lower, new_upper, token=token)
        assert out == Appended(Frontier(new_upper))
        if width > 0:
            self._commit(ups, new_upper)
            if token is not None:
                self.tokens[writer].append((token, ups, lower, new_upper))

    @rule(writer=writers, width=hs.integers(1, 3), specs=row_specs)
    def cas_data_in_empty_range(self, writer: str, width: int, specs: list[Any]) -> None:
        ups = place(specs, self.upper, width)
        if not ups:
            return
        with pytest.raises(InvalidBounds):
            self.w[writer].compare_and_append(to_table(ups), self.upper, self.upper)

    @rule(
        writer=writers,
        delta=hs.integers(-3, 3).filter(bool),
        width=hs.integers(0, 3),
        specs=row_specs,
        use_token=hs.booleans(),
    )
    def cas_wrong_upper(self, writer: str, delta: int, width: int, specs: list[Any], use_token: bool) -> None:
        expected = self.upper + delta
        if expected < 0:
            return
        ups = place(specs, expected, width)
        token = self._token() if use_token else None
        with pytest.raises(UpperMismatch) as ei:
            self.w[writer].compare_and_append(to_table(ups), expected, expected + width, token=token)
        assert ei.value.expected == expected
        assert ei.value.current == self.upper  # nothing changed: the invariant checks the rest

    @rule(writer=writers, pick=hs.integers(0, 100), stale_upper=hs.booleans())
    def retry_token(self, writer: str, pick: int, stale_upper: bool) -> None:
        """Retry a committed append with its token: the last one is AlreadyCommitted, nothing doubles."""
        history = self.tokens[writer]
        if not history:
            return
        i = pick % len(history)
        token, ups, lower, new_upper = history[i]
        out_or_err: Any
        try:
            out_or_err = self.w[writer].compare_and_append(to_table(ups), lower, new_upper, token=token)
        except UpperMismatch as e:
            out_or_err = e
        if i == len(history) - 1:
            # Only a writer's last token is remembered (as in persist).
            assert out_or_err == AlreadyCommitted(token, Frontier(self.upper))
            event("retry: AlreadyCommitted")
        else:
            # An older token is forgotten; the upper has moved past its lower, so it cannot commit.
            assert isinstance(out_or_err, UpperMismatch), out_or_err
            assert out_or_err.current == self.upper

    @rule(writer=writers, lo_delta=hs.integers(-3, 2), width=hs.integers(0, 4), specs=row_specs)
    def append(self, writer: str, lo_delta: int, width: int, specs: list[Any]) -> None:
        """Non-CAS append of [lo, lo + width): truncated to the upper, a no-op if the upper is past it."""
        lo = max(self.upper + lo_delta, 0)
        up = lo + width
        ups = place(specs, lo, width)
        if up <= self.upper:
            out = self.w[writer].append(to_table(ups), lo, up)
            assert out == Appended(Frontier(self.upper))
        elif self.upper < lo:
            with pytest.raises(UpperMismatch) as ei:
                self.w[writer].append(to_table(ups), lo, up)
            assert (ei.value.expected, ei.value.current) == (lo, self.upper)
        else:
            out = self.w[writer].append(to_table(ups), lo, up)
            assert out == Appended(Frontier(up))
            kept = [u for u in ups if u[2] >= self.upper]
            event(f"append: truncated={lo < self.upper}, dropped updates={len(kept) < len(ups)}")
            self._commit(kept, up)

    # ---- reads ----
    @rule(data=hs.data())
    def snapshot(self, data: hs.DataObject) -> None:
        if self.since < self.upper and data.draw(hs.booleans(), label="readable"):
            as_of = data.draw(hs.integers(self.since, self.upper - 1), label="as_of")
        else:
            as_of = data.draw(hs.integers(0, self.upper + 1), label="as_of")
        if as_of < self.since:
            event("snapshot: ReadBeforeSince")
            with pytest.raises(ReadBeforeSince):
                self.r.snapshot(as_of, timeout=0)
        elif as_of >= self.upper:
            event("snapshot: NotYetReadable")
            with pytest.raises(NotYetReadable):
                self.r.snapshot(as_of, timeout=0)
        else:
            got = snap_counter(self.r.snapshot(as_of, timeout=0, validate=False))
            assert got == self._model_snapshot(as_of), as_of
            touched = {(k, v) for k, v, t, _ in self.updates if t <= as_of}
            event(f"snapshot: ok, rows cancelled to zero: {min(len(touched - set(got)), 2)}")

    @precondition(lambda self: self.since < self.upper)
    @rule(data=hs.data())
    def listen_start(self, data: hs.DataObject) -> None:
        as_of = data.draw(hs.integers(self.since, self.upper - 1), label="as_of")
        self._end_listen()
        base = snap_counter(self.r.snapshot(as_of, timeout=0, validate=False))
        assert base == self._model_snapshot(as_of)
        self.listening = Listening(self.r.listen(as_of), as_of, base)

    @precondition(lambda self: self.listening is not None)
    @rule()
    def listen_drain(self) -> None:
        self._drain()

    def _end_listen(self) -> None:
        """Drain the listen in progress (if any), then close it."""
        if self.listening is not None:
            self._drain()
            self.listening.gen.close()
            self.listening = None

    def _drain(self) -> None:
        """Consume the listen up to the current upper; snapshot(as_of) + listen == the contents now."""
        lst = self.listening
        assert lst is not None
        if lst.frontier == self.upper:
            return  # caught up; the next event would wait for a new append
        lst.started = True
        for ev in lst.gen:
            if isinstance(ev, UpdateBatch):
                assert ev.lower == lst.frontier, (ev.lower, lst.frontier)
                for r in ev.table.to_pylist():
                    t = r["_time"]
                    assert lst.as_of < t < self.upper and ev.lower.less_equal(t) and ev.upper is not None
                    assert not ev.upper.less_equal(t)
                    key = (r["k"], r["v"], t)
                    assert r["_diff"] != 0 and key not in lst.got, (key, r)  # consolidated, never repeated
                    lst.got[key] = r["_diff"]
            else:
                assert isinstance(ev, Progress)
                assert ev.frontier.time is not None and lst.frontier < ev.frontier.time <= self.upper
                lst.frontier = ev.frontier.time
                if lst.frontier == self.upper:
                    break
        # Exactly the model's updates in (as_of, upper), consolidated per (row, time).
        want: Counter[tuple[str, int, int]] = Counter()
        for k, v, t, d in self.updates:
            if lst.as_of < t < self.upper:
                want[(k, v, t)] += d
        assert lst.got == nonzero(want)
        event(f"listen: drained, {'some' if lst.got else 'no'} updates")
        total = Counter(lst.base)
        for (k, v, _t), d in lst.got.items():
            total[(k, v)] += d
        assert nonzero(total) == self._model_snapshot(self.upper - 1)

    # ---- since ----
    @rule(data=hs.data())
    def downgrade_since(self, data: hs.DataObject) -> None:
        target = data.draw(hs.integers(0, self.upper + 2), label="since")
        if self.listening is not None and self.listening.started:
            # A consumer holds its since at the listen's as_of while it listens: past it,
            # compaction may advance the times the listen has yet to deliver.
            target = min(target, self.listening.as_of)
        got = self.r.downgrade_since(target)
        rid = self.r.reader_id
        self.readers[rid] = max(self.readers[rid], target)
        assert got == self.readers[rid]
        assert self.r.since == got
        self._recompute_since()
        lst = self.listening
        if lst is not None and not lst.started and lst.as_of < self.since:
            # The listen's first next() would raise ReadBeforeSince now.
            with pytest.raises(ReadBeforeSince):
                next(lst.gen)
            self.listening = None

    # ---- lifecycle ----
    @rule()
    def compact(self) -> None:
        """Compaction on demand (besides the background compactor): contents at as_of >= since stay exact."""
        assert self.client is not None
        self.client.compact(self.shard)

    @rule(expire=hs.booleans())
    def reopen(self, expire: bool) -> None:
        """Close the client and open a new one on the same root; handles are re-created.

        With `expire=False` the old reader is abandoned, as by a crash: its lease
        still holds the since where it was.
        """
        self._end_listen()
        if expire:
            self.r.expire()
            del self.readers[self.r.reader_id]
            self._recompute_since()
        self._close_client()
        self._open()
        event(f"reopen: expire={expire}")

    # ---- invariants ----
    @invariant()
    def state_agrees(self) -> None:
        assert self.client is not None
        s = self.client.state(self.shard)
        check_invariants(s)
        assert s.upper == self.upper
        assert s.since == self.since
        assert set(s.leased_readers) == set(self.readers)
        for rid, since in self.readers.items():
            assert s.leased_readers[rid].since == since
        info = self.client.inspect(self.shard)
        # SUBTLE: the background compactor may replace batches between two fetches, so only
        # what compaction cannot change is compared across them.
        assert (info["upper"], info["since"]) == (self.upper, self.since)


ShardModel.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestShardModel = ShardModel.TestCase

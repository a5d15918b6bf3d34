"""Leased readers (expiry under an injected clock) and critical since handles (fencing)."""

from __future__ import annotations

import pyarrow as pa
import pytest

import storage
from storage.frontier import Frontier

SCHEMA = pa.schema([("k", pa.string())])
LEASE = 1000


class FakeClock:
    def __init__(self, now: int = 10_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def env(tmp_path):  # noqa: ANN001, ANN201
    clock = FakeClock()
    client = storage.open(tmp_path, fsync=False, clock=clock)
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    for t in range(0, 100, 10):
        w.compare_and_append(pa.table({"k": [f"k{t}"], "_time": [t], "_diff": [1]}), t, t + 10)
    yield client, clock, shard, w
    client.close()


def _reader(client: storage.Client, shard: str) -> storage.ReadHandle:
    return client.open_leased_reader(shard, heartbeat=False, lease_ms=LEASE)


# ---------------------------------------------------------------- leased readers


def test_expired_reader_no_longer_holds_since_back(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    slow, fast = _reader(client, shard), _reader(client, shard)
    assert fast.downgrade_since(50) == Frontier(50)
    assert client.state(shard).since == Frontier(0)  # `slow` holds it at 0
    clock.now += LEASE // 2
    fast.heartbeat()
    clock.now += LEASE // 2  # `slow` is now expired, `fast` is not
    # The next transition (any) drops the expired reader and recomputes since.
    fast.downgrade_since(60)
    s = client.state(shard)
    assert slow.reader_id not in s.leased_readers and s.since == Frontier(60)


@pytest.mark.parametrize(
    "call",
    ["snapshot", "listen", "subscribe", "downgrade_since", "heartbeat"],
)
def test_expired_reader_gets_lease_expired_on_next_call(env, call: str) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    r = _reader(client, shard)
    assert r.snapshot(15).num_rows == 2
    clock.now += LEASE  # lease_expires == now: expired
    calls = {
        "snapshot": lambda: r.snapshot(15),
        "listen": lambda: next(iter(r.listen(15, timeout=1))),
        "subscribe": lambda: next(iter(r.subscribe(15, timeout=1))),
        "downgrade_since": lambda: r.downgrade_since(20),
        "heartbeat": r.heartbeat,
    }
    with pytest.raises(storage.LeaseExpired, match=f"shard {shard}: leased reader {r.reader_id} has expired"):
        calls[call]()
    # And it stays expired, even once another transition removed it from the state.
    w.compare_and_append(pa.table({"k": ["x"], "_time": [100], "_diff": [1]}), 100, 110)
    assert r.reader_id not in client.state(shard).leased_readers
    with pytest.raises(storage.LeaseExpired):
        r.snapshot(15)
    r.expire()  # idempotent, no error


def test_listen_stops_when_lease_expires_midway(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    r = _reader(client, shard)
    it = r.listen(95, timeout=5)
    assert isinstance(next(it), storage.Progress)
    clock.now += LEASE
    w.compare_and_append(pa.table({"k": ["y"], "_time": [100], "_diff": [1]}), 100, 110)
    with pytest.raises(storage.LeaseExpired):
        next(it)


def test_heartbeat_keeps_a_reader_alive(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    r = _reader(client, shard)
    for _ in range(5):
        clock.now += LEASE - 1
        r.heartbeat()
    assert r.snapshot(99).num_rows == 10
    assert client.inspect(shard)["leased_readers"][r.reader_id]["expired"] is False


def test_downgrade_since_is_monotonic_and_capped_by_others(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    a, b = _reader(client, shard), _reader(client, shard)
    a.downgrade_since(40)
    assert a.downgrade_since(20) == Frontier(40)  # an earlier since is ignored
    assert client.state(shard).since == Frontier(0)
    b.downgrade_since(30)
    assert client.state(shard).since == Frontier(30)
    with pytest.raises(storage.ReadBeforeSince):
        a.snapshot(29)
    b.expire()
    a.downgrade_since(45)
    assert client.state(shard).since == Frontier(45)


def test_registering_after_expiry_starts_again_at_since(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    a = _reader(client, shard)
    a.downgrade_since(30)
    clock.now += LEASE
    b = client.open_leased_reader(shard, reader_id=a.reader_id, heartbeat=False, lease_ms=LEASE)
    assert b.since == client.state(shard).since


# ---------------------------------------------------------------- critical since handles


def test_critical_since_holds_and_downgrades(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    h = client.open_critical_since(shard, "controller", 1)
    assert (h.opaque, h.since) == (1, Frontier(0))
    r = _reader(client, shard)
    r.downgrade_since(70)
    assert client.state(shard).since == Frontier(0)  # the critical reader holds it
    assert h.compare_and_downgrade_since(1, (1, 40)) == Frontier(40)
    assert client.state(shard).since == Frontier(40)
    # Critical readers never expire: a long time later it still holds since.
    clock.now += 10**9
    r2 = _reader(client, shard)
    r2.downgrade_since(90)
    assert client.state(shard).since == Frontier(40)
    # Its since cannot pass the upper.
    h.compare_and_downgrade_since(1, (1, 10**6))
    s = client.state(shard)
    assert s.since == Frontier(90) and s.since <= s.upper


def test_opaque_mismatch_changes_nothing(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    h = client.open_critical_since(shard, "ctl", "a")
    before = client.state(shard)
    res = h.compare_and_downgrade_since("b", ("c", 50))
    assert isinstance(res, storage.OpaqueMismatch) and res.actual == "a"
    after = client.state(shard)
    assert after.seqno == before.seqno and after.critical_readers == before.critical_readers
    assert h.compare_and_downgrade_since("a", ("c", 50)) == Frontier(50)
    assert client.state(shard).critical_readers["ctl"].opaque == "c"


def test_lower_epoch_is_fenced(env) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    old = client.open_critical_since(shard, "ctl", 1)
    old.compare_and_downgrade_since(1, (1, 10))
    # A new controller (epoch 2) opens the same handle: it sees the stored opaque...
    new = client.open_critical_since(shard, "ctl", 2)
    assert new.opaque == 1 and new.since == Frontier(10)
    # ...its own epoch does not match yet: a mismatch with a *lower* actual is not fencing.
    res = new.compare_and_downgrade_since(2, (2, 20))
    assert isinstance(res, storage.OpaqueMismatch) and res.actual == 1
    # It takes over by CASing from the stored opaque.
    assert new.compare_and_downgrade_since(1, (2, 20)) == Frontier(20)
    # The old holder is fenced from now on, and changes nothing.
    seqno = client.state(shard).seqno
    with pytest.raises(storage.Fenced, match=f"shard {shard}: critical reader ctl was taken over by epoch 2"):
        old.compare_and_downgrade_since(1, (1, 30))
    assert client.state(shard).seqno == seqno
    assert client.state(shard).critical_readers["ctl"].since == Frontier(20)


def test_fencing_across_clients(env, tmp_path) -> None:  # noqa: ANN001
    client, clock, shard, w = env
    other = storage.open(client.root, fsync=False, clock=clock)
    a = client.open_critical_since(shard, "ctl", 5)
    b = other.open_critical_since(shard, "ctl", 6)
    assert b.compare_and_downgrade_since(5, (6, 30)) == Frontier(30)
    with pytest.raises(storage.Fenced):
        a.compare_and_downgrade_since(5, (5, 40))
    other.close()


def test_release_versions_unpins_what_the_reader_does_not_read(env) -> None:  # noqa: ANN001
    """A reader that only holds since (persist_sink's) must not pin its registration version for gc."""
    client, clock, shard, w = env
    r = _reader(client, shard)
    first = client.state(shard).leased_readers[r.reader_id].seqno
    w.compare_and_append(pa.table({"k": ["x"], "_time": [100], "_diff": [1]}), 100, 110)
    r.heartbeat()
    assert client.state(shard).leased_readers[r.reader_id].seqno == first  # a heartbeat keeps its pin
    r.release_versions()
    s = client.state(shard)
    assert s.leased_readers[r.reader_id].seqno > first
    assert s.leased_readers[r.reader_id].lease_expires_ms == clock.now + LEASE

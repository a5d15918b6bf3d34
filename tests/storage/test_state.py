"""Table tests of the pure shard transitions in `storage.state`: no consensus, no blob, no clock.

Every transition returns `(new state | None, result)`; None means "nothing to write".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pyarrow as pa
import pytest

from storage import state as st
from storage.errors import InvalidBounds, LeaseExpired, StateCorrupt, Tombstone
from storage.frontier import Frontier

SCHEMA = pa.schema([("k", pa.string())])
F = Frontier
PART = st.PartMeta("p/1", "0" * 64, 3, 100)


def batch(lo: int | None, hi: int | None, parts: tuple[st.PartMeta, ...] = (PART,)) -> st.BatchMeta:
    return st.BatchMeta(F(lo), F(hi), F.MIN, parts)


def shard(*bounds: tuple[int, int]) -> st.ShardState:
    """A shard with batches at `bounds`, appended in order by writer "w"."""
    s = st.initial("s1", SCHEMA)
    for lo, hi in bounds:
        s, _ = append(s, batch(lo, hi))
    return s


def append(s: st.ShardState, b: st.BatchMeta, **kw: Any) -> tuple[Any, Any]:
    args: dict[str, Any] = {"writer_id": "w", "token": None, "metadata": None, "lease_ms": 1000, "now_ms": 0}
    args.update(kw)
    new, res = st.compare_and_append(s, b, **args)
    if new is not None:
        st.check_invariants(new)
    return new, res


# ---- compare_and_append ----


@pytest.mark.parametrize(
    "lo, hi, expect",
    [
        (0, 5, st.Appended(F(5))),
        (1, 5, st.UpperMismatchResult(F(1), F(0))),
        (0, 0, st.Appended(F(0))),  # empty width: linearized at the read, nothing written
    ],
)
def test_append_outcomes_on_a_new_shard(lo: int, hi: int, expect: Any) -> None:
    s = shard()
    new, res = append(s, batch(lo, hi))
    assert res == expect
    assert (new is not None) == (isinstance(res, st.Appended) and lo < hi)
    if new is not None:
        assert new.upper == F(hi) and new.batches == (batch(lo, hi),)


def test_append_upper_before_lower_is_invalid() -> None:
    with pytest.raises(InvalidBounds):
        append(shard(), batch(3, 1))


def test_empty_batches_merge_so_idle_ticks_do_not_grow_the_state() -> None:
    s = shard((0, 1))
    s, _ = append(s, batch(1, 2, ()))
    s, _ = append(s, batch(2, 7, ()))
    assert [(b.lower, b.upper) for b in s.batches] == [(F(0), F(1)), (F(1), F(7))]
    assert s.upper == F(7)


def test_a_repeated_token_is_already_committed_and_changes_nothing() -> None:
    s, _ = append(shard(), batch(0, 2), token="t1")
    new, res = append(s, batch(0, 2), token="t1")
    assert new is None and res == st.AlreadyCommitted("t1", F(2))
    new, res = append(s, batch(2, 3), token="t2")
    assert res == st.Appended(F(3)) and new is not None and new.writers["w"].last_token == "t2"


@pytest.mark.parametrize(
    "committed, expected_offsets, outcome",
    [
        (None, {"a": None}, "appended"),
        ({"a": 4}, {"a": 4}, "appended"),
        ({"a": 4}, {"a": None}, "offsets"),
        ({"a": 4}, {"a": 3}, "offsets"),
        ({"a": 4}, {"b": None}, "appended"),
        ({"a": 4}, None, "appended"),
    ],
)
def test_expected_offsets_are_part_of_the_compare_and_set(
    committed: dict[str, Any] | None, expected_offsets: dict[str, Any] | None, outcome: str
) -> None:
    s = shard()
    if committed is not None:
        s, _ = append(s, batch(0, 1), offsets=committed)
    lo = s.upper.time
    assert lo is not None
    new, res = append(s, batch(lo, lo + 1), offsets={"a": 9}, expected_offsets=expected_offsets)
    if outcome == "appended":
        assert res == st.Appended(F(lo + 1)) and new is not None
        assert new.metadata[st.OFFSETS_KEY]["a"] == 9
    else:
        assert new is None and isinstance(res, st.OffsetsMismatchResult)
        assert res.expected == expected_offsets and res.current == {"a": 4}


def test_offsets_are_checked_before_the_upper() -> None:
    s, _ = append(shard(), batch(0, 1), offsets={"a": 1})
    new, res = append(s, batch(5, 6), expected_offsets={"a": 0})
    assert new is None and isinstance(res, st.OffsetsMismatchResult)


def test_offsets_merge_per_key_and_need_a_non_empty_width() -> None:
    s, _ = append(shard(), batch(0, 1), offsets={"a": 1, "b": 1})
    s, _ = append(s, batch(1, 2), offsets={"b": 2})
    assert s.metadata[st.OFFSETS_KEY] == {"a": 1, "b": 2}
    with pytest.raises(InvalidBounds):
        append(s, batch(2, 2), offsets={"a": 3})


# ---- leased readers ----


def test_leased_reader_registers_at_since_and_pins_the_seqno() -> None:
    s = shard((0, 5))
    new, r = st.register_leased_reader(s, "r", lease_ms=100, now_ms=10)
    assert new is not None and new.leased_readers["r"] == r
    assert r == st.LeasedReaderState(F.MIN, s.seqno, 110, 100, registered_ms=10)


@pytest.mark.parametrize(
    "start, to, expect",
    [
        (0, 3, 3),
        (3, 1, 3),  # a since never moves back
        (0, 5, 5),  # up to the upper
        (0, 9, 9),  # a reader may hold a since past the upper (nothing to compact there)
    ],
)
def test_downgrade_since(start: int, to: int, expect: int) -> None:
    s = shard((0, 5))
    s, _ = st.register_leased_reader(s, "r", lease_ms=100, now_ms=0)
    assert s is not None
    if start:
        s, _ = st.downgrade_since(s, "r", F(start), now_ms=0)
        assert s is not None
    new, res = st.downgrade_since(s, "r", F(to), now_ms=1)
    assert res == st.Downgraded(F(expect))
    assert new is not None and new.leased_readers["r"].since == F(expect)
    assert new.since == min(F(expect), new.upper)  # the only reader: the shard's since follows, capped at the upper
    st.check_invariants(new)


def test_since_is_the_minimum_over_readers() -> None:
    s = shard((0, 10))
    for rid in ("a", "b"):
        s, _ = st.register_leased_reader(s, rid, lease_ms=100, now_ms=0)
        assert s is not None
    s, _ = st.downgrade_since(s, "a", F(7), now_ms=0)
    assert s is not None and s.since == F.MIN
    s, _ = st.downgrade_since(s, "b", F(4), now_ms=0)
    assert s is not None and s.since == F(4)


def test_an_expired_lease_no_longer_holds_since_and_cannot_downgrade() -> None:
    s = shard((0, 10))
    s, _ = st.register_leased_reader(s, "slow", lease_ms=10, now_ms=0)
    s, _ = st.register_leased_reader(s, "r", lease_ms=1000, now_ms=0)
    assert s is not None
    s, _ = st.downgrade_since(s, "r", F(6), now_ms=50)  # "slow" expired at 10
    assert s is not None and "slow" not in s.leased_readers and s.since == F(6)
    with pytest.raises(LeaseExpired):
        st.downgrade_since(s, "slow", F(8), now_ms=50)


def test_heartbeat_extends_the_lease_and_moves_the_pin_forward_only() -> None:
    s, _ = st.register_leased_reader(shard((0, 1)), "r", lease_ms=100, now_ms=0)
    assert s is not None
    s = replace(s, seqno=3)  # the machine numbers the versions; here, three were written since
    new, r = st.heartbeat_leased_reader(s, "r", pin_seqno=2, now_ms=50)
    assert new is not None and r.lease_expires_ms == 150 and r.seqno == 2
    _, r2 = st.heartbeat_leased_reader(new, "r", pin_seqno=1, now_ms=60)
    assert r2.seqno == 2
    with pytest.raises(LeaseExpired):
        st.heartbeat_leased_reader(s, "r", pin_seqno=2, now_ms=500)


@pytest.mark.parametrize("registered", [True, False])
def test_expire_leased_reader(registered: bool) -> None:
    s = shard((0, 5))
    if registered:
        s, _ = st.register_leased_reader(s, "r", lease_ms=100, now_ms=0)
        assert s is not None
    new, was = st.expire_leased_reader(s, "r", now_ms=0)
    assert was is registered
    assert (new is None) is (not registered)
    if new is not None:
        assert "r" not in new.leased_readers


# ---- critical readers ----


def test_critical_reader_registers_once() -> None:
    s = shard((0, 5))
    new, r = st.register_critical_reader(s, "c", 1, now_ms=42)
    assert new is not None and r == st.CriticalReaderState(F.MIN, 1, registered_ms=42)
    again, r2 = st.register_critical_reader(new, "c", 2)
    assert again is None and r2 == r


@pytest.mark.parametrize(
    "expected, to, outcome",
    [
        (1, 3, st.Downgraded(F(3))),
        (2, 3, st.OpaqueMismatch(1)),
        (1, None, st.Downgraded(F.EMPTY)),
    ],
)
def test_compare_and_downgrade_since(expected: Any, to: int | None, outcome: Any) -> None:
    s = shard((0, 5))
    s, _ = st.register_critical_reader(s, "c", 1)
    assert s is not None
    new, res = st.compare_and_downgrade_since(s, "c", expected, 7, F(to), now_ms=0)
    assert res == outcome
    if isinstance(outcome, st.OpaqueMismatch):
        assert new is None
    else:
        assert new is not None and new.critical_readers["c"] == st.CriticalReaderState(outcome.since, 7, 0)
        assert new.since == min(outcome.since, new.upper)
        st.check_invariants(new)


def test_compare_and_downgrade_since_of_an_unknown_reader() -> None:
    with pytest.raises(LeaseExpired):
        st.compare_and_downgrade_since(shard(), "nobody", 1, 1, F(1), now_ms=0)


# ---- merge ----


def test_apply_merge_replaces_the_exact_run() -> None:
    s = shard((0, 1), (1, 2), (2, 3))
    out = st.BatchMeta(F(0), F(2), F(1), (PART,), consolidated=True)
    new, ok = st.apply_merge(s, s.batches[:2], out)
    assert ok and new is not None and new.batches == (out, s.batches[2])
    st.check_invariants(new)
    # the inputs are gone now (a concurrent merge won): nothing to write
    again, ok2 = st.apply_merge(new, s.batches[:2], out)
    assert again is None and not ok2


@pytest.mark.parametrize("inputs", [(), "missing"])
def test_apply_merge_without_its_inputs_changes_nothing(inputs: Any) -> None:
    s = shard((0, 1), (1, 2))
    run = () if inputs == () else (batch(5, 6),)
    assert st.apply_merge(s, run, batch(5, 6)) == (None, False)


def test_apply_merge_must_cover_its_inputs() -> None:
    s = shard((0, 1), (1, 2))
    with pytest.raises(InvalidBounds):
        st.apply_merge(s, s.batches, batch(0, 1))


# ---- finalize, tombstone ----


def test_finalization_steps_make_a_tombstone_and_are_idempotent() -> None:
    s = shard((0, 5))
    s, _ = st.register_critical_reader(s, "c", 1)
    assert s is not None
    with pytest.raises(InvalidBounds):
        st.finalize_since(s)
    s1, r = st.finalize_upper(s, writer_id="f", now_ms=0)
    assert r is None and s1 is not None and s1.upper.is_empty and not s1.is_tombstone
    assert st.finalize_upper(s1, writer_id="f", now_ms=0) == (None, None)
    # A live handle holds it: nothing changes, and the holders are named.
    assert st.finalize_since(s1) == (None, {"c": F.MIN})
    s1, _ = st.release_critical_reader(s1, "c", now_ms=0)
    assert s1 is not None and not s1.critical_readers
    # An expired leased reader does not count; a live one does.
    s1, _ = st.register_leased_reader(s1, "r", lease_ms=100, now_ms=0)
    assert s1 is not None
    assert st.finalize_since(s1, now_ms=50) == (None, {"r": F.MIN})
    s2, _ = st.finalize_since(s1, now_ms=100)
    assert s2 is not None and s2.is_tombstone and not s2.critical_readers and not s2.leased_readers
    assert st.finalize_since(s2) == (None, {})
    s3, _ = st.finalize_batches(s2)
    assert s3 is not None and s3.batches == ()
    assert st.finalize_batches(s3) == (None, None)
    st.check_invariants(s3)


@pytest.mark.parametrize(
    "op",
    [
        lambda s: append(s, batch(None, None)),
        lambda s: st.register_leased_reader(s, "r", lease_ms=1, now_ms=0),
        lambda s: st.register_critical_reader(s, "c", 1),
        lambda s: st.set_schema(s, pa.schema([("k", pa.string()), ("v", pa.int64())])),
    ],
)
def test_a_tombstone_takes_no_reads_or_writes(op: Any) -> None:
    s = shard((0, 5))
    s, _ = st.finalize_upper(s, writer_id="f", now_ms=0)
    assert s is not None
    s, _ = st.finalize_since(s)
    with pytest.raises(Tombstone):
        op(s)


def test_apply_merge_on_a_tombstone_is_lost() -> None:
    s = shard((0, 5))
    s, _ = st.finalize_upper(s, writer_id="f", now_ms=0)
    assert s is not None
    s, _ = st.finalize_since(s)
    assert s is not None
    assert st.apply_merge(s, s.batches, s.batches[0]) == (None, False)


def test_set_schema() -> None:
    s = shard((0, 1))
    assert st.set_schema(s, SCHEMA) == (None, None)
    wider = pa.schema([("k", pa.string()), ("v", pa.int64())])
    new, _ = st.set_schema(s, wider)
    assert new is not None and new.schema.equals(wider) and new.schema_changed


# ---- invariants ----


@pytest.mark.parametrize(
    "bad",
    [
        lambda s: st.ShardState(s.shard_id, 1, SCHEMA, upper=F(5), batches=(batch(1, 5),)),
        lambda s: st.ShardState(s.shard_id, 1, SCHEMA, upper=F(5), batches=(batch(0, 4),)),
        lambda s: st.ShardState(s.shard_id, 1, SCHEMA, since=F(6), upper=F(5), batches=(batch(0, 5),)),
        lambda s: st.ShardState(s.shard_id, 1, SCHEMA, upper=F(5), batches=(batch(0, 0), batch(0, 5))),
    ],
)
def test_check_invariants_raises_state_corrupt(bad: Any) -> None:
    with pytest.raises(StateCorrupt):
        st.check_invariants(bad(shard()))


def test_every_transition_returns_a_pair() -> None:
    s = shard((0, 5))
    s, _ = st.register_leased_reader(s, "r", lease_ms=100, now_ms=0)
    assert s is not None
    calls = [
        lambda: st.compare_and_append(s, batch(5, 6), writer_id="w", token=None, metadata=None, lease_ms=1, now_ms=0),
        lambda: st.register_leased_reader(s, "r2", lease_ms=1, now_ms=0),
        lambda: st.heartbeat_leased_reader(s, "r", pin_seqno=0, now_ms=0),
        lambda: st.downgrade_since(s, "r", F(1), now_ms=0),
        lambda: st.expire_leased_reader(s, "r", now_ms=0),
        lambda: st.register_critical_reader(s, "c", 1),
        lambda: st.apply_merge(s, s.batches, s.batches[0]),
        lambda: st.finalize_upper(s, writer_id="f", now_ms=0),
        lambda: st.finalize_batches(s),
        lambda: st.set_schema(s, SCHEMA),
    ]
    for call in calls:
        out = call()
        assert isinstance(out, tuple) and len(out) == 2
        assert out[0] is None or isinstance(out[0], st.ShardState)


def test_release_critical_reader_checks_the_opaque_when_asked() -> None:
    s = shard((0, 5))
    s, _ = st.register_critical_reader(s, "c", 3)
    assert s is not None
    assert st.release_critical_reader(s, "c", 2, check_opaque=True, now_ms=0) == (None, st.OpaqueMismatch(3))
    assert st.release_critical_reader(s, "nobody", now_ms=0) == (None, False)
    new, ok = st.release_critical_reader(s, "c", 3, check_opaque=True, now_ms=0)
    assert ok is True and new is not None and new.critical_readers == {}


def test_wanted_since_is_not_capped_at_the_upper() -> None:
    s = shard((0, 5))
    s, _ = st.register_critical_reader(s, "c", 1)
    assert s is not None
    s, _ = st.compare_and_downgrade_since(s, "c", 1, 1, F(9), now_ms=0)
    assert s is not None and s.since == F(5) and st.wanted_since(s, 0) == F(9)
    s, _ = st.register_leased_reader(s, "r", lease_ms=10, now_ms=0)
    assert s is not None and st.wanted_since(s, 5) == F(5)  # the reader registered at 5 holds it there
    assert st.wanted_since(s, 10) == F(9)  # ... until its lease ran out


def test_registration_times_survive_encoding() -> None:
    s = shard((0, 5))
    s, _ = st.register_critical_reader(s, "c", 1, now_ms=7)
    assert s is not None
    s, _ = st.register_leased_reader(s, "r", lease_ms=10, now_ms=8)
    assert s is not None
    back = st.ShardState.decode(s.encode(), "test")
    assert back.critical_readers["c"].registered_ms == 7 and back.leased_readers["r"].registered_ms == 8

"""Read capabilities of one collection, as one controller process sees them: pure math, no IO.

Where the holds live. A collection's since is its shard's since: the minimum
over every handle registered on the shard, by any process. The controller
keeps three kinds there (see `controller.py`, which does the IO):

- the **policy handle** (critical, id `controller`, opaque = the catalog
  epoch): the collection's implied capability, `policy.frontier(upper)`,
  moved by the writers of the current epoch;
- **dependency holds** (critical, id `dep:<dependent shard>`): a collection
  derived from others (`depends_on`, a flow's export, a view) holds each input
  at its own since; durable, released when the dependent is dropped;
- **process holds** (leased, id `hold:<role>:...`): this process's
  `ReadHold`s, read-only or writable; heartbeated, they expire when the
  process dies.

A `ReadState` is one collection in one process: its write frontier, its
implied capability (never moving back), the process' own holds (`local`), and
its since as last seen on the shard (never moving back). The functions below
only mutate it and say whether something the controller must push moved.

Example:
    >>> from storage.controller.policy import ValidFrom, step_back
    >>> a = ReadState("a", "s-a", step_back())
    >>> bring_up(a, Frontier(10), shard_since=Frontier.MIN)
    >>> a.implied
    Frontier(9)
    >>> advance_upper(a, Frontier(20)), a.implied
    (True, Frontier(19))
    >>> since_to_push(a.implied, handle_since=Frontier(9))
    Frontier(19)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InvariantViolated
from ..frontier import Frontier

# The reader ids live with the shard state (`storage.state.describe_holder` reads them back):
# POLICY_READER, the policy handle's (one per shard, shared by the epoch's writers);
# DEP_PREFIX + the dependent's shard id, a dependency hold's; HOLD_PREFIX, a process hold's
# (`hold:<role>:<pid>@<host>:<nonce>`).
from ..state import DEP_PREFIX as DEP_PREFIX
from ..state import HOLD_PREFIX as HOLD_PREFIX
from ..state import POLICY_READER as POLICY_READER
from .policy import MutableAntichain, ReadPolicy


def dep_reader_id(dependent_shard: str) -> str:
    return f"{DEP_PREFIX}{dependent_shard}"


@dataclass(eq=False)
class ReadState:
    """The read side of one collection (live or dropped-but-not-finalized) in this process."""

    name: str
    shard_id: str
    policy: ReadPolicy
    write_frontier: Frontier = Frontier.MIN
    implied: Frontier = Frontier.MIN
    since: Frontier = Frontier.MIN
    local: MutableAntichain = field(default_factory=MutableAntichain)  # this process's ReadHolds
    dropped: bool = False


class _HoldOwner(Protocol):
    def _downgrade_hold(self, h: ReadHold, t: Frontier) -> None: ...


class ReadHold:
    """A read capability at `time` on one collection: its since does not pass `time` while held.

    Backed by this process's leased reader on the collection's shard, so it
    binds every process (the lease is heartbeated; it ends with the process).
    Release it (or leave the `with` block) when done; `downgrade(t)` moves it
    forward. Releasing twice is a no-op. A hold outlives a drop: the shard is
    finalized only once every hold is released.

    Example:
        >>> with ctl.acquire_read_holds(["orders"])[0] as h:   # doctest: +SKIP
        ...     snapshot_at(h.time)
    """

    def __init__(self, owner: _HoldOwner, read: ReadState, time: Frontier):
        self._owner = owner
        self._read = read
        self._time = time
        self._released = False

    @property
    def name(self) -> str:
        return self._read.name

    @property
    def time(self) -> Frontier:
        return self._time

    @property
    def released(self) -> bool:
        return self._released

    def downgrade(self, t: Frontier | int | None) -> None:
        """Move the hold forward to `t` (an empty frontier releases it). Moving back raises InvalidInput."""
        self._owner._downgrade_hold(self, Frontier.of(t))

    def release(self) -> None:
        self._owner._downgrade_hold(self, Frontier.EMPTY)

    def __enter__(self) -> ReadHold:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else f"at {self._time}"
        return f"ReadHold({self.name!r}, {state})"


def policy_at(policy: ReadPolicy, upper: Frontier) -> Frontier:
    """The capability `policy` implies at write frontier `upper`, never past `upper - 1`.

    INVARIANT: the latest written time stays readable (a differential writer
    re-syncs from a snapshot at `upper - 1`), whichever process applies the
    policy. An empty capability (a drop) and a closed upper pass through.
    """
    f = policy.frontier(upper)
    if f.is_empty or upper.is_empty:
        return f
    assert upper.time is not None
    return min(f, Frontier(max(upper.time - 1, 0)))


def bring_up(
    rs: ReadState, upper: Frontier, *, shard_since: Frontier, input_sinces: Sequence[Frontier] = ()
) -> None:
    """A collection's first implied capability: its policy at `upper`, but never below the
    shard's since nor below any of its inputs' sinces (`input_sinces`).

    A dependent's initial since is advanced as far as its dependencies': its
    inputs are not readable below their sinces, so neither is it.
    """
    rs.write_frontier = upper
    rs.implied = max([policy_at(rs.policy, upper), shard_since, *input_sinces])


def advance_upper(rs: ReadState, upper: Frontier) -> bool:
    """The write frontier moved (it never moves back here); re-apply the policy. True if implied moved."""
    if upper > rs.write_frontier:
        rs.write_frontier = upper
    return apply_policy(rs)


def apply_policy(rs: ReadState) -> bool:
    """Recompute the implied capability from the policy; it only ever moves forward. True if it moved."""
    new = policy_at(rs.policy, rs.write_frontier)
    if new > rs.implied:  # INVARIANT: the implied capability never moves back
        rs.implied = new
        return True
    return False


def rebase(rs: ReadState, shard_since: Frontier) -> bool:
    """The policy handle is at `shard_since` (taken over from another writer): implied moves up to it.

    A read-only controller's implied capability never reached the shard; the
    handle it takes over may be further on, and a handle never moves back.
    An empty `shard_since` (a tombstone) changes nothing. True if implied moved.
    """
    if shard_since.is_empty or shard_since <= rs.implied:
        return False
    rs.implied = shard_since
    return True


def observe(rs: ReadState, wanted: Frontier) -> bool:
    """The shard's handles now ask for since `wanted`; since follows it forward. True if since moved."""
    if wanted > rs.since:
        rs.since = wanted
        return True
    return False


def acquire(rs: ReadState, at: Frontier) -> Frontier:
    """One more hold of this process, at `at` (the caller's reader already holds the shard there)."""
    # INVARIANT: a new hold is never below what this process's reader holds, nor below since.
    if at < rs.since:
        raise InvariantViolated(f"collection {rs.name!r}: a hold at {at} would be below since {rs.since}")
    rs.local.update(at, +1)
    return at


def move_hold(rs: ReadState, old: Frontier, new: Frontier) -> Frontier | None:
    """Move one of this process's holds from `old` to `new` (`new` empty: release it).

    Returns the new frontier of this process's holds if it moved (empty: none
    left, release the reader), else None.
    """
    before = rs.local.frontier()
    rs.local.update(old, -1)
    rs.local.update(new, +1)
    after = rs.local.frontier()
    return after if after != before else None


def since_to_push(since: Frontier, *, handle_since: Frontier) -> Frontier | None:
    """The since to send to a handle now at `handle_since`, or None if there is nothing to send.

    An empty since is never sent: such a handle is released instead.
    """
    if since.is_empty or since <= handle_since:
        return None
    return since

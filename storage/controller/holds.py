"""Read capabilities of one collection: pure capability math, no IO, no clock.

Builds on `policy.py` (the read policies and `MutableAntichain`). A
collection's `ReadState` holds its write frontier, its implied capability
(`policy.frontier(write_frontier)`, never moving back), its read capabilities
(a `MutableAntichain` of the implied capability, every `ReadHold` and the holds
of its dependents) and its since, their minimum. A derived collection holds
each of its inputs at its own since (`input_holds`).

Every transition here mutates `ReadState`s in memory and returns the states
whose since moved, inputs before dependents: the controller then pushes each
since to its shard's critical since handle (`since_to_push`) or finalizes a
dropped collection whose since became empty. A `ReadHold` is the handle of
one capability; the controller moves it (under its lock) with `move_hold`.
Example:

    >>> from storage.controller.policy import ValidFrom, step_back
    >>> a = ReadState("a", "s-a", step_back())
    >>> bring_up(a, Frontier(10), shard_since=Frontier.MIN)
    >>> a.implied, a.since
    (Frontier(9), Frontier(9))
    >>> [r.name for r in advance_upper(a, Frontier(20))], a.since
    (['a'], Frontier(19))
    >>> since_to_push(a.since, handle_since=Frontier(9))
    Frontier(19)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InvariantViolated
from ..frontier import Frontier
from .policy import MutableAntichain, ReadPolicy


@dataclass(eq=False)
class ReadState:
    """The read side of one collection (live or dropped-but-not-finalized)."""

    name: str
    shard_id: str
    policy: ReadPolicy
    write_frontier: Frontier = Frontier.MIN
    implied: Frontier = Frontier.MIN
    since: Frontier = Frontier.MIN
    caps: MutableAntichain = field(default_factory=MutableAntichain)
    input_holds: dict[str, Frontier] = field(default_factory=dict)  # input name -> the time held there
    # The shard's real since, once rebased onto it (`rebase`): since never is below it, even if a
    # capability taken while read-only is.
    floor: Frontier = Frontier.MIN
    inputs: dict[str, ReadState] = field(default_factory=dict)
    dropped: bool = False


class _HoldOwner(Protocol):
    def _downgrade_hold(self, h: ReadHold, t: Frontier) -> None: ...


class ReadHold:
    """A read capability at `time` on one collection: its since does not pass `time` while held.

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


def bring_up(
    rs: ReadState, upper: Frontier, *, shard_since: Frontier, input_sinces: Sequence[Frontier] = ()
) -> None:
    """A new collection's first capability: its policy at `upper`, but never below the shard's since
    nor below any of its inputs' sinces (`input_sinces`).

    A dependent's initial since is advanced as far as its dependencies': its
    inputs are not readable below their sinces, so neither is it. (Its input
    holds, `hold_input`, then sit at its own since.)
    """
    rs.write_frontier = upper
    rs.implied = max([rs.policy.frontier(upper), shard_since, *input_sinces])
    rs.caps.update(rs.implied, +1)
    rs.since = rs.caps.frontier()


def hold_input(rs: ReadState, inp: ReadState) -> None:
    """`rs` depends on `inp`: hold `inp` at `max(rs.since, inp.since)` (which does not move `inp`'s since)."""
    t = max(rs.since, inp.since)
    inp.caps.update(t, +1)
    rs.input_holds[inp.name] = t
    rs.inputs[inp.name] = inp


def acquire(rs: ReadState) -> Frontier:
    """One more read capability at the current since; returns its time."""
    rs.caps.update(rs.since, +1)
    return rs.since


def move_hold(rs: ReadState, old: Frontier, new: Frontier) -> list[ReadState]:
    """Move one capability from `old` to `new` (`new` empty: release it); see `settle`."""
    rs.caps.update(old, -1)
    rs.caps.update(new, +1)
    return settle(rs)


def advance_upper(rs: ReadState, upper: Frontier) -> list[ReadState]:
    """The write frontier moved (it never moves back here); re-apply the policy. See `settle`."""
    if upper > rs.write_frontier:
        rs.write_frontier = upper
    return apply_policy(rs)


def apply_policy(rs: ReadState) -> list[ReadState]:
    """Recompute the implied capability from the policy; it only ever moves forward. See `settle`."""
    new = rs.policy.frontier(rs.write_frontier)
    if new > rs.implied:  # INVARIANT: the implied capability never moves back
        rs.caps.update(rs.implied, -1)
        rs.caps.update(new, +1)
        rs.implied = new
    return settle(rs)


def rebase(rs: ReadState, shard_since: Frontier) -> list[ReadState]:
    """Rebase `rs`'s since onto its shard's real since `shard_since`: since becomes the max of the two.

    A read-only controller's capabilities never reached the shard, so another
    writer may have moved the shard's since past them; a capability taken at
    the old since would not be readable. The implied capability moves up to
    `shard_since` (never back), and `floor` keeps since at or beyond it
    whatever older capabilities remain (they still count in `caps`, so they
    release as usual). An empty `shard_since` (a tombstone) changes nothing.
    See `settle`.
    """
    if shard_since.is_empty or shard_since <= rs.since:
        return []
    rs.floor = max(rs.floor, shard_since)
    if shard_since > rs.implied:  # INVARIANT: the implied capability never moves back
        rs.caps.update(rs.implied, -1)
        rs.caps.update(shard_since, +1)
        rs.implied = shard_since
    return settle(rs)


def settle(rs: ReadState) -> list[ReadState]:
    """Recompute since from the capabilities (never below `floor`) and pass it on to the inputs' holds.

    Returns every state whose since moved, inputs before their dependents (the
    order their shards' sinces must be pushed in); empty if `rs.since` did not move.
    """
    new = max(rs.caps.frontier(), rs.floor)
    if new == rs.since:
        return []
    # INVARIANT: since only moves forward: every capability added is at or beyond it.
    if not new > rs.since:
        raise InvariantViolated(f"collection {rs.name!r}: since would move back from {rs.since} to {new}")
    rs.since = new
    moved: list[ReadState] = []
    for dep, held in list(rs.input_holds.items()):
        t = max(held, new)
        if t != held:
            rs.input_holds[dep] = t
            moved += move_hold(rs.inputs[dep], held, t)
    moved.append(rs)
    return moved


def since_to_push(since: Frontier, *, handle_since: Frontier) -> Frontier | None:
    """The since to send to a critical since handle now at `handle_since`, or None if there is nothing to send.

    An empty since is never sent: a dropped shard is finalized instead.
    """
    if since.is_empty or since <= handle_since:
        return None
    return since

"""Read policies and the multiset of read capabilities (`MutableAntichain`).

A collection's *implied capability* is `read_policy.frontier(write_frontier)`:
the earliest time the controller itself still wants to read at. Its *read
capabilities* are a multiset of times: the implied capability, every
`ReadHold`, and the read frontiers of the collections derived from it. The
collection's since (its read frontier) is the minimum of that multiset.

All of this is pure: no IO, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput, InvariantViolated
from ..frontier import Frontier

# The default policy: keep one second (1000 ms, the default time unit) of history
# readable, with since advancing in whole seconds. Materialize's default logical
# compaction window is the same.
DEFAULT_LAG = 1000
DEFAULT_GRANULARITY = 1000


class ReadPolicy:
    """How far behind its write frontier a collection stays readable.

    `frontier(upper)` maps a write frontier (the shard's upper) to the implied
    capability. Every policy here is pure; the controller makes sure that the
    implied capability never moves back, whatever the policy returns.
    """

    def frontier(self, upper: Frontier) -> Frontier:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_json(self) -> Any:
        """A JSON value for the catalog, or None if the policy cannot be stored."""
        return None


@dataclass(frozen=True)
class ValidFrom(ReadPolicy):
    """Readable from `since` on, whatever the upper. `ValidFrom(Frontier.EMPTY)` releases everything.

    Example:
        >>> ValidFrom(10).frontier(Frontier(500))
        Frontier(10)
    """

    since: Frontier | int | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", Frontier.of(self.since))

    def frontier(self, upper: Frontier) -> Frontier:
        return self.since  # type: ignore[return-value]

    def to_json(self) -> Any:
        return {"valid_from": self.since.to_json()}  # type: ignore[union-attr]


@dataclass(frozen=True)
class LagWriteFrontier(ReadPolicy):
    """The implied capability is `fn(upper)`, for any pure function `fn`.

    SUBTLE: an arbitrary Python function cannot be stored in the catalog. A
    collection with this policy keeps it in memory only; after a restart the
    collection has the policy it was created with (or the default).
    """

    fn: Callable[[Frontier], Frontier]

    def frontier(self, upper: Frontier) -> Frontier:
        return Frontier.of(self.fn(upper))


@dataclass(frozen=True)
class LagWritesBy(ReadPolicy):
    """`upper - lag`, rounded down to a multiple of `min(lag, granularity)`; see `lag_writes_by`."""

    lag: int
    granularity: int

    def __post_init__(self) -> None:
        for what, v in (("lag", self.lag), ("granularity", self.granularity)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidInput(f"lag_writes_by: {what} must be an int >= 0, got {v!r}")
        if self.granularity == 0 and self.lag != 0:
            raise InvalidInput("lag_writes_by: granularity must be > 0 when lag is > 0")

    def frontier(self, upper: Frontier) -> Frontier:
        if upper.is_empty:
            # As in Materialize: a closed collection does not advance its capability
            # (the minimum here; the controller keeps the previous, larger one).
            return Frontier.MIN
        t = upper.time or 0
        if self.lag == 0:
            return Frontier(t)
        t = max(t - self.lag, 0)
        g = min(self.lag, self.granularity)
        return Frontier(t - t % g)

    def to_json(self) -> Any:
        return {"lag_writes_by": [self.lag, self.granularity]}


def lag_writes_by(lag: int, granularity: int = DEFAULT_GRANULARITY) -> LagWritesBy:
    """Stay readable `lag` time units behind the upper, advancing in steps of `min(lag, granularity)`.

    An empty upper (a closed collection) leaves the capability where it is.

    Example:
        >>> lag_writes_by(1000, 1000).frontier(Frontier(12_345))
        Frontier(11000)
        >>> lag_writes_by(10, 1000).frontier(Frontier(12_345))
        Frontier(12330)
        >>> lag_writes_by(0, 1).frontier(Frontier(7))
        Frontier(7)
    """
    return LagWritesBy(lag, granularity)


@dataclass(frozen=True)
class StepBack(ReadPolicy):
    """`upper - 1`: the latest complete time stays readable (and nothing older)."""

    def frontier(self, upper: Frontier) -> Frontier:
        if upper.is_empty:
            return Frontier.MIN
        return Frontier(max((upper.time or 0) - 1, 0))

    def to_json(self) -> Any:
        return {"step_back": None}


def step_back() -> StepBack:
    """The policy `upper - 1`.

    Example:
        >>> step_back().frontier(Frontier(10))
        Frontier(9)
    """
    return StepBack()


@dataclass(frozen=True)
class Multiple(ReadPolicy):
    """The minimum over several policies: every one of them is honoured.

    Example:
        >>> Multiple([ValidFrom(5), step_back()]).frontier(Frontier(100))
        Frontier(5)
    """

    policies: tuple[ReadPolicy, ...]

    def __init__(self, policies: Iterable[ReadPolicy]):
        ps = tuple(coerce_policy(p) for p in policies)
        if not ps:
            raise InvalidInput("Multiple: needs at least one policy")
        object.__setattr__(self, "policies", ps)

    def frontier(self, upper: Frontier) -> Frontier:
        return min(p.frontier(upper) for p in self.policies)

    def to_json(self) -> Any:
        inner = [p.to_json() for p in self.policies]
        if any(x is None for x in inner):
            return None
        return {"multiple": inner}


DEFAULT_POLICY: ReadPolicy = LagWritesBy(DEFAULT_LAG, DEFAULT_GRANULARITY)


def coerce_policy(p: Any) -> ReadPolicy:
    """Accept a ReadPolicy, or the constructor `step_back` passed without calling it."""
    if p is step_back:
        return StepBack()
    if isinstance(p, ReadPolicy):
        return p
    raise InvalidInput(f"read policy must be a ReadPolicy (ValidFrom, lag_writes_by(...), ...), got {p!r}")


def policy_to_json(p: ReadPolicy | None) -> Any:
    return None if p is None else p.to_json()


def policy_from_json(d: Any) -> ReadPolicy | None:
    """Inverse of `ReadPolicy.to_json`; None (not stored) decodes to None (the default)."""
    if d is None:
        return None
    if not isinstance(d, Mapping) or len(d) != 1:
        raise InvalidInput(f"cannot decode read policy {d!r}")
    ((k, v),) = d.items()
    if k == "valid_from":
        return ValidFrom(v)
    if k == "lag_writes_by":
        return LagWritesBy(int(v[0]), int(v[1]))
    if k == "step_back":
        return StepBack()
    if k == "multiple":
        inner = [policy_from_json(x) for x in v]
        return Multiple([x for x in inner if x is not None])
    raise InvalidInput(f"cannot decode read policy {d!r}")


class MutableAntichain:
    """A multiset of times with counts; its frontier is the least time with a positive count.

    Totally ordered times make the antichain of minimal elements one time or
    empty. Holds at the empty frontier hold nothing and are not stored.

    Example:
        >>> a = MutableAntichain()
        >>> a.update(5, +1); a.update(3, +2); a.frontier()
        Frontier(3)
        >>> a.update(3, -2); a.frontier()
        Frontier(5)
        >>> a.update(5, -1); a.frontier()
        Frontier.EMPTY
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def update(self, t: Frontier | int | None, diff: int) -> None:
        f = Frontier.of(t)
        if f.is_empty or diff == 0:
            return
        assert f.time is not None
        n = self._counts.get(f.time, 0) + diff
        # INVARIANT: a count never goes negative: only what was added is removed.
        if n < 0:
            raise InvariantViolated(f"read capability at {f.time} released more often than acquired (count {n})")
        if n == 0:
            del self._counts[f.time]
        else:
            self._counts[f.time] = n

    def frontier(self) -> Frontier:
        return Frontier(min(self._counts)) if self._counts else Frontier.EMPTY

    def count(self, t: Frontier | int) -> int:
        f = Frontier.of(t)
        return 0 if f.time is None else self._counts.get(f.time, 0)

    def items(self) -> list[tuple[int, int]]:
        return sorted(self._counts.items())

    def is_empty(self) -> bool:
        return not self._counts

    def __repr__(self) -> str:
        return f"MutableAntichain({dict(self.items())})"

"""Frontiers over totally ordered int64 times.

Time is totally ordered, so an antichain has at most one element: a frontier is
either one time `t` or *empty*. The empty frontier is closed: no further times
will come. Empty compares greater than every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering
from typing import ClassVar

from .errors import InvalidInput

MAX_TIME = (1 << 63) - 1


@total_ordering
@dataclass(frozen=True, slots=True)
class Frontier:
    """A frontier: the least time `time` that may still come, or empty (`time is None`).

    Example:
        >>> f = Frontier(10)
        >>> f.less_equal(10), f.less_equal(9), Frontier.EMPTY.less_equal(10**9)
        (True, False, False)
        >>> Frontier(3) < Frontier.EMPTY, Frontier(3) == 3
        (True, True)
    """

    time: int | None

    EMPTY: ClassVar[Frontier]
    MIN: ClassVar[Frontier]

    def __post_init__(self) -> None:
        t = self.time
        if t is not None and (type(t) is not int or t < 0 or t > MAX_TIME):
            if isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TIME:
                object.__setattr__(self, "time", int(t))
                return
            raise InvalidInput(f"frontier time must be an int64 >= 0, got {t!r}")

    @classmethod
    def of(cls, value: Frontier | int | None) -> Frontier:
        """Coerce an int (a time), `None` (empty) or a Frontier into a Frontier."""
        if isinstance(value, Frontier):
            return value
        return cls(value)

    @property
    def is_empty(self) -> bool:
        return self.time is None

    def less_equal(self, t: int) -> bool:
        """True iff time `t` is not beyond this frontier (`self <= t`)."""
        return self.time is not None and self.time <= t

    def less_than(self, t: int) -> bool:
        return self.time is not None and self.time < t

    def to_json(self) -> int | None:
        return self.time

    @classmethod
    def from_json(cls, v: int | None) -> Frontier:
        return cls(v)

    def _key(self) -> tuple[int, int]:
        return (1, 0) if self.time is None else (0, self.time)

    def __lt__(self, other: object) -> bool:
        if isinstance(other, int) and not isinstance(other, bool):
            other = Frontier(other)
        if not isinstance(other, Frontier):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Frontier):
            return self.time == other.time
        if isinstance(other, int) and not isinstance(other, bool):
            return self.time == other
        if other is None:
            return self.time is None
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.time)

    def __repr__(self) -> str:
        return "Frontier.EMPTY" if self.time is None else f"Frontier({self.time})"

    def __str__(self) -> str:
        return "empty" if self.time is None else str(self.time)


Frontier.EMPTY = Frontier(None)
Frontier.MIN = Frontier(0)


def advance(t: int, since: Frontier) -> int:
    """`advance(t, since) = max(t, since)`; an empty since leaves `t` alone (nothing is readable)."""
    return t if since.time is None else max(t, since.time)

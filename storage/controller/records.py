"""The controller's per-collection records, below both the controller and its parts.

A `_Coll` is one collection (live or dropped-but-not-finalized) as the
controller keeps it: its catalog meta, its read side (`holds.ReadState`), its
write side (`WriteTask`), its counters (`Stats`) and its compaction record.
`controller.py` owns the records; `collection_mgmt.py` and `introspection.py`
read and update them. This module imports neither, so none of them forms an
import cycle: the appender a `WriteTask` holds is typed by the `Appender`
protocol, the members the controller's parts use of a `MonotonicAppender`.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from ..client import SinceHandle
from ..frontier import Frontier
from ..read import ReadHandle
from ..write import WriteHandle
from .catalog import CollectionMeta
from .holds import ReadState


class Appender(Protocol):
    """An append-only collection's appender (`collection_mgmt.MonotonicAppender`), as a `WriteTask` holds it."""

    last_flush: float  # time.monotonic() of the last commit
    commits: int

    @property
    def _coll(self) -> _Coll: ...

    def pending(self) -> int: ...

    def append(self, rows: Any, *, wait: bool = True) -> Any: ...

    def _take(self) -> list[tuple[pa.Table, Future[int]]]: ...

    def _fail(self, e: Exception, *, forever: bool) -> None: ...


@dataclass(eq=False)
class WriteTask:
    """The write side of one collection, as the collection manager runs it."""

    kind: str | None = None  # None, "append" or "differential"
    writer: WriteHandle | None = None
    appender: Appender | None = None
    persisted_upper: Frontier | None = None  # differential: the upper `persisted` is valid at


@dataclass(eq=False)
class Stats:
    """Updates staged (queued or desired, not yet written) and committed; `system.statistics` shows them."""

    staged: int = 0
    committed: int = 0


@dataclass(eq=False)
class _Compaction:
    """When this controller last asked to compact a collection's shard, and up to which since."""

    since: Frontier = Frontier.MIN
    at: float = 0.0  # time.monotonic()


@dataclass(eq=False)
class _Coll:
    """One collection (live or dropped-but-not-finalized): its records, one per concern."""

    meta: CollectionMeta
    read: ReadState  # holds.py
    handle: SinceHandle | None = None  # the policy handle, critical (writable controllers)
    reader: ReadHandle | None = None  # this process's leased reader backing its ReadHolds (any controller)
    deps: dict[str, SinceHandle] = field(default_factory=dict)  # input name -> its dependency hold (writable)
    write: WriteTask = field(default_factory=WriteTask)  # collection_mgmt.py
    stats: Stats = field(default_factory=Stats)  # collection_mgmt.py, shown by introspection
    compaction: _Compaction = field(default_factory=_Compaction)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def shard_id(self) -> str:
        return self.meta.shard_id

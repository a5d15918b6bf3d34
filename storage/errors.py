"""Errors raised by shardflow's storage layer.

Every error derives from `ShardflowError`. Each message names the object it
concerns (a shard, a collection, a part) and says what was expected and what
was found, in one line, so the CLI can print it as is.

Kinds, as in persist:
- *invalid usage* (`InvalidBounds`, `SchemaMismatch`, `InvalidInput`, ...) is a
  caller bug; retrying cannot help.
- a *lost race* (`UpperMismatch`) carries `.expected` and `.current`; the
  caller decides what to do. Handles raise it rather than return it, because an
  ignored lost race is lost data.
"""

from __future__ import annotations

from typing import Any


class ShardflowError(Exception):
    """Base class of every shardflow error."""


class InvalidInput(ShardflowError, ValueError):
    """Bad input from the caller: a malformed name, a negative time, bad options."""


class SchemaMismatch(ShardflowError, ValueError):
    """A batch's columns or types do not match the shard's schema."""


class InvalidBounds(ShardflowError, ValueError):
    """Append bounds are inconsistent, or an update time lies outside `[lower, upper)`."""


class UpperMismatch(ShardflowError):
    """compare_and_append lost a race: the shard's upper is not the expected one.

    Attributes:
        expected: the upper the caller expected.
        current: the shard's actual upper when the append was attempted.
    """

    def __init__(self, shard: str, expected: Any, current: Any):
        self.shard = shard
        self.expected = expected
        self.current = current
        super().__init__(f"shard {shard}: expected upper {expected}, found {current}")


class OffsetsMismatch(ShardflowError):
    """compare_and_append lost a race on source offsets: another writer committed past them.

    The offsets a writer expects are part of the compare-and-set (exactly-once
    ingestion): when the shard's committed offset of a source partition is not
    the one the writer read its input from, its batch may repeat what is
    already in, and nothing is written.

    Attributes:
        expected: partition key -> the offset the caller expected (None: none committed).
        current: partition key -> the offset committed in the shard, for the same keys.
    """

    def __init__(self, shard: str, expected: Any, current: Any, detail: str | None = None):
        self.shard = shard
        self.expected = expected
        self.current = current
        super().__init__(
            detail or f"shard {shard}: expected committed source offsets {expected}, found {current}"
        )


class ReadBeforeSince(ShardflowError):
    """A read asked for an `as_of` that compaction may already have advanced past."""


class NotYetReadable(ShardflowError, TimeoutError):
    """A read asked for an `as_of` at or past the upper, and it did not pass in time."""


class NegativeCount(ShardflowError):
    """A row's updates sum to a negative count at a readable time: the collection is invalid there.

    Every read of such a snapshot raises it (a query, however filtered, a snapshot,
    `ReadHandle.validate`), naming the row, its count and the time.
    """


class Tombstone(ShardflowError):
    """The shard was finalized: its since and upper are both empty."""


class CorruptPart(ShardflowError):
    """A part is missing, or its bytes do not match the recorded sha256."""


class DiffOverflow(ShardflowError, ArithmeticError):
    """The diffs of one row sum to a count outside int64: consolidation cannot represent it."""


class ShardNotFound(ShardflowError, KeyError):
    """No shard with this id was ever written."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class StateCorrupt(ShardflowError):
    """A consensus entry failed its checksum or invariants, or could not be decoded.

    Attributes:
        shard: the shard id when the entry is a shard's state (None for the catalog),
            so a caller that knows the collections can name the collection too.
    """

    def __init__(self, msg: str, shard: str | None = None):
        self.shard = shard
        super().__init__(msg)


class InvariantViolated(ShardflowError):
    """An internal invariant does not hold (a bug); raised instead of acting on a wrong state.

    Checked with real `if`s, never `assert`, so it also holds under `python -O`.
    """


class LeaseExpired(ShardflowError):
    """A leased reader or writer used its handle after its lease expired."""


class Fenced(ShardflowError):
    """A newer holder (a higher epoch or opaque) took over; this one must stop."""


class IdentifierMissing(ShardflowError, KeyError):
    """A collection id is not in the catalog."""

    def __str__(self) -> str:
        return str(self.args[0])


class IdentifierInvalid(ShardflowError):
    """A collection id was unregistered while work for it was queued."""


class SourceIdReused(ShardflowError):
    """A collection id is reused with a different description."""


class AlterError(ShardflowError):
    """A schema change that is not compatible (only nullable columns may be added)."""


class ReadOnly(ShardflowError):
    """A write was attempted through a read-only controller, or a read-only client
    (`storage.open(read_only=True)`), or SQLite refused one (a read-only file or directory)."""


class InvalidUppers(ShardflowError):
    """Writes to these collections could not be applied at the requested upper."""


class ConsensusUnavailable(ShardflowError):
    """Consensus stayed locked (SQLite) or unreachable (PostgreSQL) past the configured wait.

    Nothing was lost: an operation that raises this either did not happen, or
    happened and is recognised as such when it is retried. See
    `storage.consensus.TIMEOUT_ENV`.
    """


class OutOfSpace(ShardflowError):
    """A write failed because the disk is full (ENOSPC/EDQUOT, SQLite's "database or disk is full").

    Nothing half-written becomes visible; free space and rerun.
    """


class UpdateBeyondUpper(ShardflowError, ValueError):
    """An update's time is at or past the upper it is to be committed under."""


class CasRetriesExhausted(ShardflowError):
    """A compare-and-set lost the race more times in a row than its caller allows (`machine.cas_retry`)."""


__all__ = [name for name in dir() if name[0].isupper() and name != "Any"]

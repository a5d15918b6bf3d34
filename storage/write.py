"""The write path: batches of parts written to blob first, then one compare-and-set of the state.

As in persist, a `Batch` is an object: `WriteHandle.batch(updates, lower=,
upper=)` writes the parts (nothing references them yet) and
`WriteHandle.compare_and_append_batch(batches, ...)` appends them with one
compare-and-set. `compare_and_append_batches` appends batches to several
shards in one consensus transaction (atomic table writes).
`compare_and_append(updates, ...)` is the two steps in one call.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from . import state as st
from ._compute import pc
from .consensus import CasOp, VersionedData
from .errors import (
    InvalidBounds,
    InvalidInput,
    InvalidUppers,
    OffsetsMismatch,
    ShardNotFound,
    UpperMismatch,
)
from .frontier import Frontier
from .machine import Machine
from .parts import ShardEnv
from .read import tombstone_error
from .updates import DIFF, TIME, as_table, time_bounds, update_schema, validate_updates

WRITER_LEASE_MS = 15 * 60 * 1000
#: Lost compare-and-sets in a row after which a multi-shard append gives up.
MAX_CAS_ATTEMPTS = 100


@dataclass(frozen=True)
class Batch:
    """Updates at times `[lower, upper)` of one shard, written as parts but not yet appended.

    Make one with `WriteHandle.batch`; append it with
    `WriteHandle.compare_and_append_batch` (or `compare_and_append_batches`
    for several shards at once). Immutable and picklable: a batch written by
    one worker may be appended by another. A batch never appended leaves
    orphan parts, which gc deletes after its grace period.
    """

    shard_id: str
    lower: Frontier
    upper: Frontier
    parts: tuple[st.PartMeta, ...] = ()

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)


def check_bounds(shard_id: str, table: pa.Table, lower: Frontier, upper: Frontier) -> None:
    """Every update time must lie in `[lower, upper)`; data needs `lower < upper`."""
    if upper < lower:
        raise InvalidBounds(f"shard {shard_id}: new upper {upper} is before expected upper {lower}")
    b = time_bounds(table)
    if b is None:
        return
    if upper <= lower:
        raise InvalidBounds(f"shard {shard_id}: {table.num_rows} updates but the batch [{lower}, {upper}) is empty")
    tmin, tmax = b
    if not lower.less_equal(tmin):
        raise InvalidBounds(f"shard {shard_id}: update time {tmin} not in [{lower.time}, {_end(upper)})")
    if upper.less_equal(tmax):
        raise InvalidBounds(f"shard {shard_id}: update time {tmax} not in [{lower.time}, {_end(upper)})")


def _end(f: Frontier) -> str:
    return "inf" if f.is_empty else str(f.time)


def _json_offsets(shard_id: str, what: str, offs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`offs` as they read back from the state (tuples become lists), so comparisons are exact."""
    if offs is None:
        return None
    try:
        out = json.loads(json.dumps(dict(offs)))
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"shard {shard_id}: {what} must be a JSON object of partition key -> offset ({e})") from None
    if not all(isinstance(k, str) for k in offs):
        raise InvalidInput(f"shard {shard_id}: {what} keys must be str partition keys, got {list(offs)!r}")
    return out


def _check_token(shard_id: str, token: Any) -> None:
    if token is not None and not isinstance(token, str):
        raise InvalidInput(f"shard {shard_id}: idempotency token must be a str, got {type(token).__name__}")


def _check_batches(shard_id: str, batches: Sequence[Batch], lower: Frontier, upper: Frontier) -> None:
    """Every batch is of `shard_id` and inside `[lower, upper)`; data needs `lower < upper`."""
    if upper < lower:
        raise InvalidBounds(f"shard {shard_id}: new upper {upper} is before expected upper {lower}")
    for b in batches:
        if not isinstance(b, Batch):
            raise InvalidInput(f"shard {shard_id}: expected a Batch (from WriteHandle.batch), got {type(b).__name__}")
        if b.shard_id != shard_id:
            raise InvalidBounds(f"shard {shard_id}: a batch of shard {b.shard_id} cannot be appended here")
        if b.lower < lower or upper < b.upper:
            raise InvalidBounds(
                f"shard {shard_id}: batch [{b.lower.time}, {_end(b.upper)}) is not inside "
                f"[{lower.time}, {_end(upper)})"
            )
        if b.parts and upper <= lower:
            raise InvalidBounds(f"shard {shard_id}: {b.rows} updates but the batch [{lower}, {upper}) is empty")


def _offsets_check(shard_id: str, s: st.ShardState, expected: Mapping[str, Any] | None) -> None:
    if not expected:
        return
    committed = s.metadata.get(st.OFFSETS_KEY) or {}
    current = {k: committed.get(k) for k in expected}
    if current != dict(expected):
        raise OffsetsMismatch(shard_id, dict(expected), current)


class WriteHandle:
    """Appends to one shard. Get one from `Client.open_writer`.

    Example:
        >>> import pyarrow as pa, storage, tempfile
        >>> client = storage.open(tempfile.mkdtemp())
        >>> w = client.open_writer(storage.ShardId.new(), schema=pa.schema([("k", pa.string())]))
        >>> w.compare_and_append(pa.table({"k": ["a"], "_time": [3], "_diff": [1]}), 0, 10)
        Appended(upper=Frontier(10))
        >>> w.upper
        Frontier(10)
    """

    def __init__(
        self, client: ShardEnv, machine: Machine, schema: pa.Schema, writer_id: str, *, compact: bool = True
    ):
        self.client = client
        self.machine = machine
        self.shard_id = machine.shard_id
        self.schema = schema
        self.writer_id = writer_id
        self.compact = compact  # wake the client's background compactor after appends

    def __repr__(self) -> str:
        return f"WriteHandle(shard={self.shard_id}, writer={self.writer_id})"

    @property
    def upper(self) -> Frontier:
        """The shard's current upper, read fresh from consensus."""
        return self.machine.fetch().upper

    def _live_upper(self) -> Frontier:
        """The current upper; raises Tombstone if the shard was finalized.

        NB: a tombstone's upper is empty, which `append` would otherwise read as
        "already past `upper`" and silently report as a no-op.
        """
        s = self.machine.fetch()
        if s.is_tombstone:
            raise tombstone_error(self.shard_id)
        return s.upper

    def _validate(self, updates: Any) -> pa.Table:
        return validate_updates(updates, self.schema, f"shard {self.shard_id}")

    def _write(self, table: pa.Table, lower: Frontier, upper: Frontier) -> Batch:
        return Batch(self.shard_id, lower, upper, self.client.parts.write(self.shard_id, table) if table.num_rows else ())

    def batch(self, updates: Any, *, lower: Frontier | int, upper: Frontier | int | None) -> Batch:
        """Write `updates` as the parts of a batch `[lower, upper)`, without appending it.

        Append it with `compare_and_append_batch` (at any `[expected_upper,
        new_upper)` that contains `[lower, upper)`).

        Raises:
            SchemaMismatch, InvalidInput: as in `compare_and_append`.
            InvalidBounds: a time outside `[lower, upper)`, or `upper` before `lower`.
        """
        lo, up = Frontier.of(lower), Frontier.of(upper)
        table = self._validate(updates)
        check_bounds(self.shard_id, table, lo, up)
        return self._write(table, lo, up)

    def compare_and_append(
        self,
        updates: Any,
        expected_upper: Frontier | int | None,
        new_upper: Frontier | int | None,
        *,
        token: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        offsets: Mapping[str, Any] | None = None,
        expected_offsets: Mapping[str, Any] | None = None,
    ) -> st.Appended | st.AlreadyCommitted:
        """Append `updates` as the batch `[expected_upper, new_upper)` iff the upper is `expected_upper`.

        Order: validate the schema, check the bounds, write the parts (`batch`),
        CAS the state (`compare_and_append_batch`). Nothing becomes visible on
        any error. An empty batch only advances the upper;
        `new_upper=Frontier.EMPTY` (or None) closes the shard. `metadata` is
        committed in the same CAS as the data.

        Exactly-once ingestion: `offsets` (partition key -> source offset to resume
        after) are merged into the shard's committed offsets in the same CAS, and
        with `expected_offsets` the CAS also requires the committed offset of each
        of those keys to be exactly the given one (None: nothing committed yet).
        A writer that read its input from those offsets thereby never commits
        input that another writer already committed.

        Returns:
            `Appended(upper)`, or `AlreadyCommitted` when this writer already
            committed `token` (a retry after an indeterminate outcome).

        Raises:
            SchemaMismatch, InvalidInput: the updates do not fit the schema, a
                string is not valid UTF-8, or the batch's |diffs| sum past int64
                (the message names the column and the row).
            InvalidBounds: a time outside `[expected_upper, new_upper)`, or
                `new_upper` before `expected_upper`.
            UpperMismatch: the shard's upper is not `expected_upper`; `.current` says what it is.
            OffsetsMismatch: the committed offsets are not `expected_offsets`
                (checked first); `.current` holds the committed ones.
        """
        lower, upper = Frontier.of(expected_upper), Frontier.of(new_upper)
        offs = _json_offsets(self.shard_id, "offsets", offsets)
        expected = _json_offsets(self.shard_id, "expected_offsets", expected_offsets)
        table = self._validate(updates)
        check_bounds(self.shard_id, table, lower, upper)
        _check_token(self.shard_id, token)
        # Cheap early check: the upper only moves forward, so once it is past `lower`
        # this append can never succeed. Skipping the part writes leaves no orphans.
        cur = self.machine.fetch()
        if cur.is_tombstone:
            raise tombstone_error(self.shard_id)
        w = cur.writers.get(self.writer_id)
        if token is not None and w is not None and w.last_token == token:
            return st.AlreadyCommitted(token, cur.upper)
        _offsets_check(self.shard_id, cur, expected)
        if lower < cur.upper:
            raise UpperMismatch(self.shard_id, lower, cur.upper)
        return self._append([self._write(table, lower, upper)], lower, upper, token, metadata, offs, expected, cur)

    def compare_and_append_batch(
        self,
        batches: Sequence[Batch],
        *,
        expected_upper: Frontier | int | None,
        new_upper: Frontier | int | None,
        token: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        offsets: Mapping[str, Any] | None = None,
        expected_offsets: Mapping[str, Any] | None = None,
    ) -> st.Appended | st.AlreadyCommitted:
        """Append the parts of `batches` as one batch `[expected_upper, new_upper)` iff the upper is `expected_upper`.

        Each batch must be of this shard and lie inside `[expected_upper,
        new_upper)`. Outcomes, `token`, `metadata`, `offsets` and
        `expected_offsets` are as in `compare_and_append`. On `UpperMismatch`
        the batches stay unappended (append them again at the new upper, or
        leave their parts to gc).

        Raises:
            InvalidBounds: a batch outside `[expected_upper, new_upper)` or of another shard.
            UpperMismatch, OffsetsMismatch, Tombstone: as in `compare_and_append`.
        """
        lower, upper = Frontier.of(expected_upper), Frontier.of(new_upper)
        offs = _json_offsets(self.shard_id, "offsets", offsets)
        expected = _json_offsets(self.shard_id, "expected_offsets", expected_offsets)
        _check_token(self.shard_id, token)
        _check_batches(self.shard_id, batches, lower, upper)
        return self._append(batches, lower, upper, token, metadata, offs, expected)

    def _append(
        self,
        batches: Sequence[Batch],
        lower: Frontier,
        upper: Frontier,
        token: str | None,
        metadata: Mapping[str, Any] | None,
        offsets: dict[str, Any] | None,
        expected_offsets: dict[str, Any] | None,
        head: st.ShardState | None = None,
    ) -> st.Appended | st.AlreadyCommitted:
        batch = st.BatchMeta(lower, upper, Frontier.MIN, tuple(p for b in batches for p in b.parts))
        # `head`: the state the early check read; the first attempt uses it (one read of a
        # whole state version less per append; a stale one just loses its compare-and-set).
        _, result = self.machine.apply_from(
            head, st.compare_and_append, batch, writer_id=self.writer_id, token=token, metadata=metadata,
            lease_ms=WRITER_LEASE_MS, offsets=offsets, expected_offsets=expected_offsets,
        )
        if isinstance(result, st.OffsetsMismatchResult):
            raise OffsetsMismatch(self.shard_id, result.expected, result.current)
        if isinstance(result, st.UpperMismatchResult):
            # The parts are not referenced; gc removes them after its grace period.
            raise UpperMismatch(self.shard_id, result.expected, result.current)
        if self.compact and isinstance(result, st.Appended):
            # Cheap and coalescing: the compactor thread plans (plan_compaction) and merges.
            self.client.compactor.request(self.shard_id)
        return result

    def append(
        self,
        updates: Any,
        lower: Frontier | int,
        upper: Frontier | int | None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> st.Appended:
        """Non-CAS append of the batch `[lower, upper)`.

        If the shard's upper is already past `lower`, the batch is truncated to
        start at that upper (updates before it are dropped: those times are
        already known); if the upper is at or past `upper`, this is a no-op.
        An upper still before `lower` raises UpperMismatch: there would be a gap.
        """
        lo, up = Frontier.of(lower), Frontier.of(upper)
        table = self._validate(updates)
        check_bounds(self.shard_id, table, lo, up)
        while True:
            cur = self._live_upper()
            if up <= cur:
                return st.Appended(cur)
            if cur < lo:
                raise UpperMismatch(self.shard_id, lo, cur)
            part = table
            if lo < cur and table.num_rows:
                part = table.filter(pc.greater_equal(table.column(TIME), cur.time))
            try:
                out = self.compare_and_append(part, cur, up, metadata=metadata)
                return st.Appended(out.upper)  # no token, so never AlreadyCommitted
            except UpperMismatch:
                continue

    def monotonic_append(
        self,
        rows: Any,
        at_least: int = 0,
        *,
        metadata: Mapping[str, Any] | None = None,
        offsets: Mapping[str, Any] | None = None,
        expected_offsets: Mapping[str, Any] | None = None,
    ) -> int:
        """Blind write of `rows` at time `max(upper, at_least)`; returns that time.

        `rows` holds the schema's columns and optionally `_diff` (default +1).
        A lost race on the upper is retried at the new upper, but a lost race on
        `expected_offsets` is not: it raises `OffsetsMismatch` (see
        `compare_and_append`), since retrying would commit the same input twice.
        """
        t = as_table(rows, f"shard {self.shard_id}", self.schema)
        if TIME in t.schema.names:
            t = t.drop_columns([TIME])
        if DIFF not in t.schema.names:
            t = t.append_column(pa.field(DIFF, pa.int64(), nullable=False), pa.repeat(pa.scalar(1, pa.int64()), t.num_rows))
        while True:
            cur = self._live_upper()
            if cur.is_empty:
                raise InvalidBounds(f"shard {self.shard_id}: closed (empty upper); cannot append")
            ts = max(cur.time or 0, int(at_least))
            times = pa.repeat(pa.scalar(ts, pa.int64()), t.num_rows)
            diff = t.column(DIFF)
            upd = t.drop_columns([DIFF]).append_column(TIME, times).append_column(DIFF, diff)
            upd = upd.select(update_schema(self.schema).names) if set(update_schema(self.schema).names) == set(upd.schema.names) else upd
            try:
                self.compare_and_append(
                    upd, cur, ts + 1, metadata=metadata, offsets=offsets, expected_offsets=expected_offsets
                )
                return ts
            except UpperMismatch:
                continue


def compare_and_append_batches(
    env: ShardEnv,
    appends: Mapping[str, tuple[Sequence[Batch], Frontier | int | None, Frontier | int | None]],
    *,
    writer_id: str,
    at_upper: bool = False,
    schemas: Mapping[str, pa.Schema] | None = None,
    fence: Callable[[], CasOp | None] | None = None,
    clock: Callable[[], int] | None = None,
    compact: bool = True,
    max_attempts: int = MAX_CAS_ATTEMPTS,
) -> dict[str, Frontier]:
    """Append batches to several shards in ONE consensus transaction: all become visible, or none.

    `appends` maps shard id -> `(batches, expected_upper, new_upper)`; each
    shard's batches are appended as one batch `[expected_upper, new_upper)`
    (as `WriteHandle.compare_and_append_batch`, by writer `writer_id`).

    With `at_upper=True`, `expected_upper` is a bound, not an expectation: each
    shard's batch starts at its current upper, which must be at or before
    `expected_upper` (the table write: every table at `write_ts`). A shard
    without state is created with `schemas[shard]`. `fence()` runs before
    every attempt; a compare-and-set it returns joins the transaction (the
    controller's epoch check). A lost compare-and-set (another change to one of
    the keys) is retried with fresh heads; the parts are reused. Appended
    shards wake the compactor unless `compact=False`.

    Returns:
        shard id -> its new upper.

    Raises:
        UpperMismatch: a shard's upper is not `expected_upper` (with
            `at_upper`: is past it); nothing was written.
        InvalidBounds: a batch outside its `[expected_upper, new_upper)`.
        InvalidUppers: lost `max_attempts` compare-and-sets in a row.
        Tombstone: a shard was finalized.
    """
    bounds = {sid: (Frontier.of(lo), Frontier.of(up)) for sid, (_, lo, up) in appends.items()}
    for sid, (batches, _, _) in appends.items():
        _check_batches(sid, batches, *bounds[sid])
    parts = {sid: tuple(p for b in batches for p in b.parts) for sid, (batches, _, _) in appends.items()}
    if not bounds:
        return {}
    now = clock or env.clock
    attempt = 0
    while True:
        extra = fence() if fence is not None else None
        ops = []
        written: list[tuple[bytes, st.ShardState]] = []
        now_ms = now()
        for sid, (lower, upper) in bounds.items():
            m = env.machine(sid)
            try:
                s, exists = m.fetch(), True
            except ShardNotFound:
                if schemas is None or sid not in schemas:
                    raise
                s, exists = st.initial(sid, schemas[sid]), False
            if s.is_tombstone:
                raise tombstone_error(sid)
            at = s.upper if at_upper and s.upper <= lower else lower
            new, res = st.compare_and_append(
                s, st.BatchMeta(at, upper, Frontier.MIN, parts[sid]), writer_id=writer_id, token=None,
                metadata=None, lease_ms=WRITER_LEASE_MS, now_ms=now_ms,
            )
            if isinstance(res, st.UpperMismatchResult):
                raise UpperMismatch(sid, res.expected, res.current)
            if new is None:
                continue  # an empty-width append: nothing to write for this shard
            seqno = s.seqno + 1 if exists else 0
            data, decoded = replace(new, seqno=seqno).encode_decoded()
            st.check_invariants(decoded)
            written.append((data, decoded))
            ops.append(CasOp(m.key, s.seqno if exists else None, VersionedData(seqno, data)))
        if extra is not None and ops:
            ops.append(extra)
        if not ops or m.consensus.compare_and_set_many(ops):
            for data, decoded in written:
                st.remember(data, decoded)
            break
        attempt += 1
        if attempt >= max_attempts:
            raise InvalidUppers(f"append to {len(bounds)} shards: lost {attempt} races in a row; nothing was written")
        time.sleep(min(0.0005 * 2 ** min(attempt, 8), 0.05) * random.random())
    if compact:
        for sid in bounds:
            env.compactor.request(sid)
    return {sid: up for sid, (_, up) in bounds.items()}

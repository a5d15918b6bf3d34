"""The write path: parts to blob first, then one compare-and-set of the state."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import state as st
from .errors import InvalidBounds, InvalidInput, OffsetsMismatch, UpperMismatch
from .frontier import Frontier
from .updates import DIFF, TIME, time_bounds, update_schema, validate_updates

if TYPE_CHECKING:
    from .client import Client
    from .machine import Machine

PART_MAX_ROWS = 1 << 20
WRITER_LEASE_MS = 15 * 60 * 1000


def encode_part(table: pa.Table) -> bytes:
    """A part's bytes: Parquet with statistics, so reads can skip row groups by `_time`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", write_statistics=True)
    return sink.getvalue().to_pybytes()


def write_parts(client: Client, shard_id: str, table: pa.Table) -> tuple[st.PartMeta, ...]:
    """Write `table` as one or more parts (at most PART_MAX_ROWS rows each); return their metas."""
    metas = []
    for off in range(0, table.num_rows, PART_MAX_ROWS):
        chunk = table.slice(off, PART_MAX_ROWS)
        data = encode_part(chunk)
        key = f"{shard_id}/p{uuid.uuid4().hex}.parquet"
        client.blob.put(key, data)
        metas.append(st.PartMeta(key, hashlib.sha256(data).hexdigest(), chunk.num_rows, len(data)))
    return tuple(metas)


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
        self, client: Client, machine: Machine, schema: pa.Schema, writer_id: str, *, compact: bool = True
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
            from .read import tombstone_error

            raise tombstone_error(self.shard_id)
        return s.upper

    def _validate(self, updates: Any) -> pa.Table:
        return validate_updates(updates, self.schema, f"shard {self.shard_id}")

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

        Order: validate the schema, check the bounds, write the parts, CAS the state.
        Nothing becomes visible on any error. An empty batch only advances the upper;
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
        offsets = _json_offsets(self.shard_id, "offsets", offsets)
        expected_offsets = _json_offsets(self.shard_id, "expected_offsets", expected_offsets)
        table = self._validate(updates)
        check_bounds(self.shard_id, table, lower, upper)
        if token is not None and not isinstance(token, str):
            raise InvalidInput(f"shard {self.shard_id}: idempotency token must be a str, got {type(token).__name__}")
        # Cheap early check: the upper only moves forward, so once it is past `lower`
        # this append can never succeed. Skipping the part writes leaves no orphans.
        cur = self.machine.fetch()
        if cur.is_tombstone:
            st.compare_and_append(cur, st.BatchMeta(lower, upper, Frontier.MIN), writer_id=self.writer_id,
                                  token=None, metadata=None, lease_ms=0, now_ms=0)  # raises Tombstone
        w = cur.writers.get(self.writer_id)
        if token is not None and w is not None and w.last_token == token:
            return st.AlreadyCommitted(token, cur.upper)
        _offsets_check(self.shard_id, cur, expected_offsets)
        if lower < cur.upper:
            raise UpperMismatch(self.shard_id, lower, cur.upper)
        parts = write_parts(self.client, self.shard_id, table) if table.num_rows else ()
        batch = st.BatchMeta(lower, upper, Frontier.MIN, parts)

        _, result = self.machine.apply(
            st.compare_and_append, batch, writer_id=self.writer_id, token=token, metadata=metadata,
            lease_ms=WRITER_LEASE_MS, offsets=offsets, expected_offsets=expected_offsets,
        )
        if isinstance(result, st.OffsetsMismatchResult):
            raise OffsetsMismatch(self.shard_id, result.expected, result.current)
        if isinstance(result, st.UpperMismatchResult):
            # The parts we wrote are orphans now; gc removes them after its grace period.
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
        from .updates import as_table

        t = as_table(rows, f"shard {self.shard_id}")
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

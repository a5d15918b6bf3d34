"""Atomic appends to several shards: one consensus transaction over every shard key.

`append_tables` writes each table's parts to blob first (nothing references
them yet), then builds every shard's next state with the pure
`state.compare_and_append` and commits them all with one
`consensus.compare_and_set_many`: either every table's batch becomes visible,
or none does. A lost CAS (someone else changed one of the shards) re-reads the
heads and re-checks the uppers; the parts are reused.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from .. import state as st
from ..consensus import CasOp, VersionedData
from ..errors import InvalidBounds, InvalidUppers, InvariantViolated, UpdateBeyondUpper
from ..frontier import Frontier
from ..machine import shard_key
from ..read import tombstone_error
from ..updates import DIFF, TIME, as_table, update_schema, validate_updates
from ..write import WRITER_LEASE_MS, write_parts


@dataclass(frozen=True)
class TableWrite:
    name: str
    shard_id: str
    schema: pa.Schema
    rows: object  # Arrow input: row columns, optional `_diff` and `_time`


def table_updates(w: TableWrite, write_ts: int, advance_to: Frontier) -> pa.Table:
    """The rows of `w` as updates: `_time` defaults to `write_ts`, `_diff` to +1.

    Raises:
        UpdateBeyondUpper: an update at or past `advance_to`.
        InvalidBounds: an update before `write_ts`.
    """
    where = f"table {w.name!r}"
    t = as_table(w.rows, where)
    if DIFF not in t.schema.names:
        t = t.append_column(pa.field(DIFF, pa.int64(), nullable=False), pa.repeat(pa.scalar(1, pa.int64()), t.num_rows))
    if TIME not in t.schema.names:
        t = t.append_column(pa.field(TIME, pa.int64(), nullable=False), pa.repeat(pa.scalar(write_ts, pa.int64()), t.num_rows))
    t = validate_updates(t, w.schema, where)
    if t.num_rows:
        mm = pc.min_max(t.column(TIME))
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if advance_to.less_equal(hi):
            msg = f"{where}: update at time {hi} is at or past advance_to {advance_to}"
            raise UpdateBeyondUpper(msg)
        if lo < write_ts:
            raise InvalidBounds(f"{where}: update at time {lo} is before write_ts {write_ts}")
    return t.cast(update_schema(w.schema))


def append_tables(
    client: object,
    writes: list[TableWrite],
    write_ts: int,
    advance_to: Frontier,
    *,
    writer_id: str,
    now: Callable[[], int],
    check: Callable[[], CasOp | None] = lambda: None,
    max_attempts: int = 100,
) -> dict[str, Frontier]:
    """Append every `writes[i].rows` at `write_ts` and advance each shard's upper to `advance_to`.

    Each shard's upper must be at or before `write_ts`; its batch is
    `[upper, advance_to)`. `check()` runs before each commit attempt; the
    controller checks its epoch there and returns a compare-and-set of the
    catalog at the version it checked, which joins the same transaction: a
    take-over between the check and the commit makes the whole append fail
    (exact fencing, at the cost of one catalog version per append). Returns each
    table's new upper.

    Raises:
        InvalidUppers: a table's upper is already past `write_ts` (nothing is written).
        UpdateBeyondUpper: an update at or past `advance_to`.
    """
    if write_ts < 0:
        raise InvalidBounds(f"append_table: write_ts {write_ts} is negative")
    if not advance_to.is_empty and advance_to.less_than(write_ts):
        raise InvalidBounds(f"append_table: advance_to {advance_to} is before write_ts {write_ts}")
    ups = {w.name: table_updates(w, write_ts, advance_to) for w in writes}
    consensus = client.consensus  # type: ignore[attr-defined]
    parts: dict[str, tuple[st.PartMeta, ...] | None] = {w.name: None for w in writes}
    attempt = 0
    while True:
        fence = check()
        heads = {}
        for w in writes:
            h = consensus.head(shard_key(w.shard_id))
            s = st.initial(w.shard_id, w.schema) if h is None else st.ShardState.decode(
                h.data, f"shard {w.shard_id} seqno {h.seqno}", seqno=h.seqno, shard_id=w.shard_id
            )
            if h is not None and s.seqno != h.seqno:
                s = replace(s, seqno=h.seqno)
            if s.is_tombstone:
                raise tombstone_error(w.shard_id)
            heads[w.name] = (h, s)
        stale = {n: s.upper for n, (_, s) in heads.items() if not s.upper.less_equal(write_ts)}
        if stale:
            desc = ", ".join(f"{n!r} (upper {u})" for n, u in sorted(stale.items()))
            msg = f"append_table at write_ts {write_ts}: table upper(s) already past it: {desc}; nothing was written"
            raise InvalidUppers(msg)
        ops = []
        now_ms = now()
        for w in writes:
            h, s = heads[w.name]
            if parts[w.name] is None:
                t = ups[w.name]
                parts[w.name] = write_parts(client, w.shard_id, t) if t.num_rows else ()  # type: ignore[arg-type]
            batch = st.BatchMeta(s.upper, advance_to, Frontier.MIN, parts[w.name] or ())
            new, res = st.compare_and_append(
                s, batch, writer_id=writer_id, token=None, metadata=None, lease_ms=WRITER_LEASE_MS, now_ms=now_ms
            )
            if not isinstance(res, st.Appended):  # INVARIANT: lower == the upper just read
                raise InvariantViolated(f"table {w.name!r} (shard {w.shard_id}): append at its own upper returned {res}")
            if new is None:
                continue  # [upper, advance_to) is empty: nothing to write for this table
            if h is None:
                ops.append(CasOp(shard_key(w.shard_id), None, VersionedData(0, replace(new, seqno=0).encode())))
            else:
                new = replace(new, seqno=h.seqno + 1)
                ops.append(CasOp(shard_key(w.shard_id), h.seqno, VersionedData(new.seqno, new.encode())))
        if fence is not None and ops:
            ops.append(fence)
        if not ops or consensus.compare_and_set_many(ops):
            return {w.name: advance_to for w in writes}
        attempt += 1
        if attempt >= max_attempts:
            raise InvalidUppers(f"append_table at write_ts {write_ts}: lost {attempt} races in a row; nothing was written")
        time.sleep(min(0.0005 * 2 ** min(attempt, 8), 0.05) * random.random())

"""Atomic appends to several shards: one consensus transaction over every shard key.

`append_tables` writes each table's rows as a `Batch` (parts in blob, nothing
references them yet), then appends them all with
`storage.write.compare_and_append_batches`: either every table's batch becomes
visible, or none does. A lost CAS (someone else changed one of the shards)
re-reads the heads and re-checks the uppers there; the parts are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..consensus import CasOp
from ..errors import InvalidBounds, InvalidUppers, ShardNotFound, UpdateBeyondUpper, UpperMismatch
from ..frontier import Frontier
from ..parts import ShardEnv
from ..read import tombstone_error
from ..updates import DIFF, TIME, as_table, update_schema, validate_updates
from ..write import Batch, WriteHandle, compare_and_append_batches


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
    t = as_table(w.rows, where, w.schema)
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
    client: ShardEnv,
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
    batches: dict[str, Batch] = {}
    for w in writes:
        t = ups[w.name]
        batches[w.name] = _writer(client, w).batch(t, lower=write_ts, upper=advance_to) if t.num_rows else Batch(
            w.shard_id, Frontier(write_ts), advance_to
        )
    try:
        compare_and_append_batches(
            client,
            {w.shard_id: ([batches[w.name]], write_ts, advance_to) for w in writes},
            writer_id=writer_id, at_upper=True, schemas={w.shard_id: w.schema for w in writes},
            fence=check, clock=now, compact=False, max_attempts=max_attempts,
        )
    except UpperMismatch as e:
        stale = {w.name: client.machine(w.shard_id).fetch().upper for w in writes}
        stale = {n: u for n, u in stale.items() if not u.less_equal(write_ts)}
        desc = ", ".join(f"{n!r} (upper {u})" for n, u in sorted(stale.items())) or f"shard {e.shard} (upper {e.current})"
        msg = f"append_table at write_ts {write_ts}: table upper(s) already past it: {desc}; nothing was written"
        raise InvalidUppers(msg) from None
    except InvalidUppers as e:
        raise InvalidUppers(f"append_table at write_ts {write_ts}: {e}") from None
    return {w.name: advance_to for w in writes}


def _writer(client: ShardEnv, w: TableWrite) -> WriteHandle:
    """A handle to write `w`'s batch with; creates the table's shard if it has no state yet."""
    m = client.machine(w.shard_id)
    try:
        s = m.fetch()
    except ShardNotFound:
        return WriteHandle(client, m, w.schema, writer_id="tables", compact=False)
    if s.is_tombstone:
        raise tombstone_error(w.shard_id)
    schema = s.schema
    return WriteHandle(client, m, schema, writer_id="tables", compact=False)

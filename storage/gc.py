"""Garbage collection, finalization and integrity checks of a shard's parts.

- `gc(client, shard)` deletes the parts no live state version references, and
  orphaned parts (written by a lost compare-and-set or merge) once they are
  older than a grace period; then it truncates consensus below the oldest
  state version a live leased reader still pins.
- `finalize(client, shard)` closes the upper, then the since (the shard becomes
  a tombstone), forgets the batches and deletes every part.
- `verify(client, shard)` checks that the shard can be read back: every
  part exists, matches its sha256 and decodes, its strings are valid UTF-8,
  and no row's diffs sum past int64.

Which versions are live. A leased reader pins the oldest state version
(seqno) it may still be reading from (`LeasedReaderState.seqno`, moved forward
by its heartbeat). Every version from `pin = min(pinned seqnos of readers whose
lease is live)` (the head when there is none) up to the head is live. A part
referenced by a live version is never deleted; so a reader in the middle of a
snapshot, whose version is >= its pin, keeps every part it reads.

Orphans. A writer puts its parts *before* the CAS that references them, so a
part that no version references may be about to become referenced. Such a
part is only deleted once its blob mtime is older than `grace_ms` (wall clock:
mtimes are wall-clock times, whatever clock the client was opened with).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from . import connections
from . import state as st
from .errors import CorruptPart, ShardflowError, StateCorrupt
from .frontier import Frontier
from .machine import Machine
from .parts import ShardEnv, parts_source
from .read import snapshot_sql
from .updates import DIFF, INT64_MAX, first_bad_string, overflow_checked

# Writers put parts, then CAS; a merge of a big run takes a while. A part younger
# than this may still be on its way into the state, so gc leaves it alone.
DEFAULT_GRACE_MS = 15 * 60 * 1000
FINALIZER_ID = "finalize"
_SCAN_LIMIT = 500


@dataclass
class GcReport:
    """What one `gc` call did (or, with `dry_run=True`, would do)."""

    head_seqno: int = 0
    pinned_seqno: int = 0  # versions below this were truncated
    parts_deleted: int = 0  # referenced only by versions below the pin
    orphans_deleted: int = 0  # referenced by no retained version, older than the grace period
    orphans_kept: int = 0  # unreferenced but younger than the grace period
    bytes_deleted: int = 0
    versions_truncated: int = 0
    deleted: list[str] = field(default_factory=list, repr=False)


@dataclass
class VerifyReport:
    """Result of `verify`: each problem is a `CorruptPart` (a part missing, unreadable, not
    matching its sha256, or holding invalid UTF-8) or a `DiffOverflow` (a count past int64)."""

    shard_id: str
    tombstone: bool = False
    batches: int = 0
    parts_checked: int = 0
    bytes_checked: int = 0
    problems: list[ShardflowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _keys(s: st.ShardState) -> set[str]:
    return {p.key for b in s.batches for p in b.parts}


def _scan(m: Machine, from_seqno: int, to_seqno: int) -> Iterator[st.ShardState]:
    """Decode every stored version of the shard with `from_seqno <= seqno <= to_seqno`, oldest first.

    A generator: a shard with a long untruncated history is decoded `_SCAN_LIMIT`
    versions at a time, never held in memory all at once.
    """
    nxt = from_seqno
    while nxt <= to_seqno:
        rows = m.consensus.scan(m.key, nxt, _SCAN_LIMIT)
        if not rows:
            break
        for r in rows:
            if r.seqno > to_seqno:
                return
            yield st.ShardState.decode(r.data, f"shard {m.shard_id} seqno {r.seqno}", seqno=r.seqno, shard_id=m.shard_id)
        nxt = rows[-1].seqno + 1


def live_pin(s: st.ShardState, now_ms: int) -> int:
    """The oldest seqno a live leased reader may still read from (the head's seqno if none)."""
    pins = [r.seqno for r in s.leased_readers.values() if r.lease_expires_ms > now_ms]
    return min([s.seqno, *pins])


def gc(client: ShardEnv, shard: str, *, grace_ms: int = DEFAULT_GRACE_MS, dry_run: bool = False) -> GcReport:
    """Delete the shard's unreachable parts and truncate consensus below the live pin.

    Never deletes a part referenced by a state version at or after the oldest
    seqno pinned by a live leased reader. Works on a tombstone too (it then
    deletes whatever parts are left, subject to the grace period for orphans).

    Args:
        grace_ms: orphans (parts no retained version references) younger than
            this are kept: they may belong to an append or merge in flight.
            0 deletes every orphan; only safe when nothing writes the shard.
        dry_run: report what would be deleted and truncated, change nothing.

    Example:
        >>> import pyarrow as pa, storage, tempfile
        >>> client = storage.open(tempfile.mkdtemp())
        >>> shard = storage.ShardId.new()
        >>> w = client.open_writer(shard, schema=pa.schema([("k", pa.string())]), compact=False)
        >>> for t in range(6):
        ...     _ = w.compare_and_append(pa.table({"k": ["a"], "_time": [t], "_diff": [1]}), t, t + 1)
        >>> _ = client.compact(shard)
        >>> r = client.gc(shard)
        >>> r.parts_deleted, r.versions_truncated > 0
        (6, True)
    """
    m = client.machine(shard)
    head = m.fetch()
    now = client.clock()
    pin = live_pin(head, now)
    report = GcReport(head_seqno=head.seqno, pinned_seqno=pin)
    # SUBTLE: scan from the oldest stored version, not from the pin: a part that only
    # versions below the pin reference is garbage *now*, while one that no stored
    # version references at all may be an append in flight (grace period).
    live: set[str] = set()
    dead: set[str] = set()
    oldest: int | None = None
    for v in _scan(m, 0, head.seqno):
        if oldest is None:
            oldest = v.seqno
        (live if v.seqno >= pin else dead).update(_keys(v))
    live |= _keys(head)
    dead -= live
    wall_now = time.time()
    prefix = f"{m.shard_id}/"
    to_delete: list[tuple[str, int, bool]] = []
    for meta in client.blob.list(prefix):
        if meta.key in live:
            continue
        if meta.key in dead:
            to_delete.append((meta.key, meta.size, False))
        elif (wall_now - meta.mtime_s) * 1000 >= grace_ms:
            to_delete.append((meta.key, meta.size, True))
        else:
            report.orphans_kept += 1
    for key, size, orphan in to_delete:
        if not dry_run:
            client.blob.delete(key)
        report.deleted.append(key)
        report.bytes_deleted += size
        if orphan:
            report.orphans_deleted += 1
        else:
            report.parts_deleted += 1
    # Truncate only after the deletes: if we crash in between, the parts are still
    # found (as referenced-below-the-pin, or as orphans after the grace period).
    if oldest is None:
        oldest = pin
    if pin > oldest:
        report.versions_truncated = pin - oldest if dry_run else m.consensus.truncate(m.key, pin)
    return report


def finalize(client: ShardEnv, shard: str, *, force: bool = False) -> dict[str, Frontier]:
    """Finalize `shard`: close its upper, then its since; forget its batches; delete its parts.

    Afterwards the shard is a tombstone: every later read or write raises
    `Tombstone`. Each step is its own CAS and a no-op once done, so a crash
    anywhere is resumed by running `finalize` again; on a finalized shard it
    does nothing.

    Since is closed only once no live handle holds the shard: while a critical
    since handle or an unexpired leased reader of any process remains, the
    upper is closed (no more writes) but nothing else happens, and the holders
    are returned (reader id -> since); call again once they let go. `force`
    drops every hold (an operator's decision: the holders' next read fails).

    Returns:
        `{}` once the shard is a tombstone, else the handles still holding it.

    Raises:
        ShardNotFound: no shard with this id exists.
    """
    m = client.machine(shard)
    m.apply(st.finalize_upper, writer_id=FINALIZER_ID)
    _, held = m.apply(st.finalize_since, force=force)
    if held:
        return held
    s, _ = m.apply(st.finalize_batches)
    # INVARIANT: the head is a tombstone without batches, so no version from here on
    # references a part; every part under the shard's prefix is garbage.
    if not (s.is_tombstone and not s.batches):
        raise StateCorrupt(
            f"shard {m.shard_id} seqno {s.seqno}: finalization left since {s.since}, upper {s.upper} and "
            f"{len(s.batches)} batches, expected a tombstone without batches; no part was deleted"
        )
    for meta in list(client.blob.list(f"{m.shard_id}/")):
        client.blob.delete(meta.key)
    if s.seqno > 0:
        m.consensus.truncate(m.key, s.seqno)
    return {}


def verify(client: ShardEnv, shard: str) -> VerifyReport:
    """Check that the shard can be read back, and list every problem found.

    Per part: it exists and is a readable file, matches its size and sha256,
    decodes as Parquet, and holds only valid UTF-8 strings (parts written before
    the write path checked strings may not). Then, if every part passed, the
    whole shard is consolidated at its latest time, as a snapshot would be, so
    a count past int64 (diffs summed across batches) shows up too. Reads every
    byte (no cache). On a tombstone there is nothing to check and the report
    says `tombstone=True`. For `shardflow fsck`.

    Returns:
        A `VerifyReport`; each problem is a `CorruptPart` naming the shard, the
        batch `[lower, upper)` and the part key (and the column and row for a
        bad string), or a `DiffOverflow` naming the shard and the row.
    """
    m = client.machine(shard)
    s = m.fetch()
    report = VerifyReport(shard_id=m.shard_id, tombstone=s.is_tombstone, batches=len(s.batches))
    for b in s.batches:
        for p in b.parts:
            report.parts_checked += 1
            try:
                raw = client.blob.get(p.key)
            except OSError as e:  # e.g. a directory in place of the part
                why = e.strerror or str(e)
                report.problems.append(client.parts.corrupt(m.shard_id, b, p, f"unreadable ({why})"))
                continue
            report.bytes_checked += 0 if raw is None else len(raw)
            try:
                data = client.parts.check(m.shard_id, b, p, raw)
            except CorruptPart as e:
                report.problems.append(e)
                continue
            poison = _poisoned(data)
            if poison is not None:
                report.problems.append(client.parts.corrupt(m.shard_id, b, p, poison))
    if report.ok and not s.is_tombstone:
        _check_consolidates(client, s, report)
    return report


def _poisoned(data: bytes) -> str | None:
    """Why a part's (checksummed) bytes cannot be read as updates, or None."""
    try:
        t = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        return f"not readable as Parquet ({str(e).splitlines()[0]})"
    bad = first_bad_string(t)
    if bad is None:
        return None
    name, row = bad
    at = "an unused dictionary entry" if row < 0 else f"row {row}"
    return f"column {name!r} {at}: string is not valid UTF-8"


def _check_consolidates(client: ShardEnv, s: st.ShardState, report: VerifyReport) -> None:
    """Consolidate the whole shard at its latest time, as a snapshot would; record why it fails."""
    batches = [b for b in s.batches if b.parts]
    if not batches:
        return
    as_of = INT64_MAX if s.upper.is_empty else s.upper.time - 1  # type: ignore[operator]
    con = connections.cursor()
    try:
        src = parts_source(client, s, batches, con, "__parts")
        # min(_diff) makes DuckDB evaluate the checked sum of every row.
        with overflow_checked():
            con.sql(f"SELECT count(*), min({DIFF}) FROM ({snapshot_sql(s, src, as_of)})").fetchall()
    except ShardflowError as e:
        report.problems.append(e)
    except duckdb.Error as e:
        report.problems.append(CorruptPart(f"shard {s.shard_id}: not readable: {str(e).splitlines()[0]}"))
    finally:
        con.close()

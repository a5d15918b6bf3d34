"""Shard state and its pure transitions.

Every transition here is `(state, *inputs, now_ms=...) -> (new state | None, result)`:
no IO, no clock lookups (the caller passes `now_ms`; every transition takes it,
used or not, so `Machine.apply(transition, *inputs)` calls them all alike), no
randomness. `machine.py` applies them with compare-and-set against consensus and
retries on a lost CAS.
A transition returns `None` as the new state when nothing is to be written; a
lost race is returned as a value (`UpperMismatch`, `OpaqueMismatch`), and
invalid usage raises.

INVARIANTS (checked by `check_invariants` on every decode and before every write, and by
the tests after every step):
- batches are contiguous: `batches[0].lower == 0`, each `lower` equals the
  previous `upper`, and the last `upper` is the shard's upper;
- `since <= upper` (a tombstone has both empty);
- since = max(old since, min over live readers' sinces): it never moves back.

Encoding: every stored version is sealed (`seal`) in a JSON envelope
`{"sha256":"<hex of the body>","state":<body>}`; `unseal` checks the digest
over the exact stored bytes before anything is parsed, so a flipped byte
anywhere is `StateCorrupt`, never a state. Versions written before checksums
(a bare `{"v":1,...}` body) are still read, with the invariants checked; every
new version is written sealed.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import pyarrow as pa

from .errors import InvalidBounds, LeaseExpired, StateCorrupt, Tombstone
from .frontier import Frontier

STATE_VERSION = 1
#: The metadata key of the committed source offsets (partition key -> offset to resume after).
OFFSETS_KEY = "offsets"

_SEAL_HEAD = b'{"sha256":"'
_SEAL_MID = b'","state":'
_DIGEST_LEN = 64
_BODY_AT = len(_SEAL_HEAD) + _DIGEST_LEN + len(_SEAL_MID)
_LEGACY_HEAD = b'{"v":'


def seal(body: bytes) -> bytes:
    """Wrap an encoded JSON `body` in the checksummed envelope (see the module docstring)."""
    return b"".join((_SEAL_HEAD, hashlib.sha256(body).hexdigest().encode(), _SEAL_MID, body, b"}"))


def seal_pieces(pieces: tuple[bytes, ...]) -> bytes:
    """`seal(b"".join(pieces))` without joining the body first (one copy of a large state, not two)."""
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return b"".join((_SEAL_HEAD, h.hexdigest().encode(), _SEAL_MID, *pieces, b"}"))


def unseal(data: bytes, where: str, what: str, legacy_head: bytes = _LEGACY_HEAD) -> bytes:
    """The body of a sealed entry, its sha256 checked; a legacy (unsealed) body is returned as is.

    A legacy body is recognised by how it starts (`legacy_head`: how the bodies
    written before checksums began), so a damaged envelope is never taken for one.

    Raises:
        StateCorrupt: the digest does not match the body, or the bytes are neither
            a sealed envelope nor a legacy body. The message names `where`.
    """
    data = bytes(data)
    if data.startswith(_SEAL_HEAD):
        stored = data[len(_SEAL_HEAD) : len(_SEAL_HEAD) + _DIGEST_LEN]
        if data[_BODY_AT - len(_SEAL_MID) : _BODY_AT] != _SEAL_MID or not data.endswith(b"}"):
            raise StateCorrupt(f"{where}: cannot decode {what} (its checksum envelope is malformed)")
        body = data[_BODY_AT:-1]
        actual = hashlib.sha256(body).hexdigest().encode()
        if actual != stored:
            raise StateCorrupt(
                f"{where}: stored {what} fails its checksum (expected sha256 "
                f"{stored[:16].decode(errors='replace')}.., found {actual[:16].decode()}..); it was altered after it was written"
            )
        return body
    if data.startswith(legacy_head):
        return data  # written before checksums: the invariants are still checked
    raise StateCorrupt(f"{where}: cannot decode {what} (expected a checksummed JSON envelope, found {data[:20]!r})")


@dataclass(frozen=True)
class PartMeta:
    """A Parquet file in blob: its key, sha256, row count and size in bytes."""

    key: str
    sha256: str
    rows: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "rows": self.rows, "bytes": self.bytes}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PartMeta:
        return cls(d["key"], d["sha256"], int(d["rows"]), int(d["bytes"]))


@dataclass(frozen=True)
class BatchMeta:
    """Updates at times in `[lower, upper)`; times below `since` may have been advanced to it.

    `consolidated`: the parts hold at most one update per (row, time) and no zero
    diffs (compaction's output). Appended batches make no such promise.
    """

    lower: Frontier
    upper: Frontier
    since: Frontier
    parts: tuple[PartMeta, ...] = ()
    consolidated: bool = False

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def is_empty(self) -> bool:
        return not self.parts

    @cached_property
    def encoded(self) -> builtins.bytes:
        """`to_json()` as JSON bytes, computed once per batch: a state's encoding joins these."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "lower": self.lower.to_json(),
            "upper": self.upper.to_json(),
            "since": self.since.to_json(),
            "parts": [p.to_json() for p in self.parts],
        }
        if self.consolidated:  # only when set: older states decode unchanged
            d["consolidated"] = True
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BatchMeta:
        return cls(
            Frontier(d["lower"]),
            Frontier(d["upper"]),
            Frontier(d["since"]),
            tuple(PartMeta.from_json(p) for p in d["parts"]),
            bool(d.get("consolidated", False)),
        )


@dataclass(frozen=True)
class WriterState:
    lease_expires_ms: int
    last_token: str | None = None


@dataclass(frozen=True)
class LeasedReaderState:
    since: Frontier
    seqno: int  # the oldest state version this reader may still be reading
    lease_expires_ms: int
    lease_ms: int
    registered_ms: int | None = None  # when it was registered (None: before this was recorded)


@dataclass(frozen=True)
class CriticalReaderState:
    since: Frontier
    opaque: Any  # JSON scalar chosen by the holder, e.g. an epoch
    registered_ms: int | None = None  # when it was registered (None: before this was recorded)


@dataclass(frozen=True)
class ShardState:
    shard_id: str
    seqno: int
    schema: pa.Schema
    since: Frontier = Frontier.MIN
    upper: Frontier = Frontier.MIN
    batches: tuple[BatchMeta, ...] = ()
    writers: Mapping[str, WriterState] = field(default_factory=dict)
    leased_readers: Mapping[str, LeasedReaderState] = field(default_factory=dict)
    critical_readers: Mapping[str, CriticalReaderState] = field(default_factory=dict)
    # Source offsets and other small facts committed with the data (merged per key).
    metadata: Mapping[str, Any] = field(default_factory=dict)
    schema_changed: bool = False  # parts may predate the current schema (added columns)

    @property
    def is_tombstone(self) -> bool:
        return self.since.is_empty and self.upper.is_empty

    # ---- encoding ----
    def _head(self) -> dict[str, Any]:
        """Every field but the batches, as JSON values."""
        return {
            "v": STATE_VERSION,
            "shard_id": self.shard_id,
            "seqno": self.seqno,
            "schema": _schema_b64(self.schema),
            "since": self.since.to_json(),
            "upper": self.upper.to_json(),
            "writers": {k: [w.lease_expires_ms, w.last_token] for k, w in self.writers.items()},
            "leased_readers": {
                k: [r.since.to_json(), r.seqno, r.lease_expires_ms, r.lease_ms, r.registered_ms]
                for k, r in self.leased_readers.items()
            },
            "critical_readers": {
                k: [r.since.to_json(), r.opaque, r.registered_ms] for k, r in self.critical_readers.items()
            },
            "metadata": dict(self.metadata),
            "schema_changed": self.schema_changed,
        }

    def encode(self) -> bytes:
        return self.encode_decoded()[0]

    def encode_decoded(self) -> tuple[bytes, ShardState]:
        """The sealed encoding, and the state that decoding it gives (`decode(encoding)`).

        SUBTLE: the second is not always `self`: JSON turns metadata's tuples into
        lists and int keys into strings. It is built from the small head parsed back
        and this state's batches (which round-trip exactly), so it costs no parse of
        the batches; `remember` caches it for `decode`.

        Cost: the batches' JSON is cached per batch (`BatchMeta.encoded`), so an
        append re-encodes only its own batch; the rest is a join and the sha256.
        """
        fields = self._head()
        del fields["v"]  # in `_BATCHES_HEAD`
        head = json.dumps(fields, separators=(",", ":"))
        # The batches come first: the versions before and after an append or a merge
        # share a prefix, which `_parse_body` does not parse again.
        pieces = (_BATCHES_HEAD, b",".join([b.encoded for b in self.batches]), b"]," + head[1:].encode())
        decoded = _from_head(json.loads(head), self.batches, schema=self.schema)
        return seal_pieces(pieces), decoded

    @classmethod
    def decode(cls, data: bytes, where: str, *, seqno: int | None = None, shard_id: str | None = None) -> ShardState:
        """Decode a stored version: checksum, then fields, then `check_invariants`.

        `seqno`/`shard_id`, when given, are what consensus says this entry is; a body
        claiming another seqno or shard is corrupt too (e.g. a version copied over another).

        Bytes equal to those of the shard's last decoded (or written) version in this
        process are not decoded again: the state decoded then is returned (see
        `remember`). Equal bytes decode to an equal state, so this is never stale.

        Raises:
            StateCorrupt: naming `where` (the shard and seqno) and what is wrong.
        """
        data = bytes(data)
        hit = _recall(shard_id, data, seqno)
        if hit is not None:
            return hit
        try:
            state = cls._decode(data, where, seqno=seqno, shard_id=shard_id)
        except StateCorrupt as e:
            if e.shard is None:
                e.shard = shard_id
            raise
        remember(data, state)
        return state

    @classmethod
    def _decode(cls, data: bytes, where: str, *, seqno: int | None, shard_id: str | None) -> ShardState:
        body = unseal(data, where, "shard state")
        prev = _DECODED.get(shard_id) if shard_id is not None else None
        try:
            d, batches = _parse_body(body, prev[1] if prev is not None else None)
            if d.get("v") != STATE_VERSION:
                raise ValueError(f"unknown state version {d.get('v')!r}")
            state = _from_head(d, batches, schema=prev[1].schema if prev is not None else None)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the same to the caller
            raise StateCorrupt(f"{where}: cannot decode shard state ({type(e).__name__}: {e})") from None
        if shard_id is not None and state.shard_id != shard_id:
            raise StateCorrupt(f"{where}: stored state belongs to shard {state.shard_id}, expected shard {shard_id}")
        if seqno is not None and state.seqno != seqno:
            raise StateCorrupt(f"{where}: stored state says seqno {state.seqno}, expected {seqno}")
        check_invariants(state, where)
        return state


_BATCHES_HEAD = b'{"v":%d,"batches":[' % STATE_VERSION


def _parse_body(body: bytes, prev: ShardState | None) -> tuple[dict[str, Any], tuple[BatchMeta, ...]]:
    """The JSON fields of `body` and its batches, reusing the leading batches it shares with `prev`.

    Incremental: a body written by `encode` starts with its batches' JSON, each
    exactly `BatchMeta.encoded`. The batches of `prev` (the shard's previous
    version seen here) that the body starts with, in order, are taken as they
    are (a byte comparison each: a JSON object is self-delimiting, so equal
    bytes are the same batch); only the rest is parsed. Any other layout (a
    body written before this order, with the batches elsewhere) is parsed whole.
    """
    pos, reused = len(_BATCHES_HEAD), 0
    if prev is not None and body.startswith(_BATCHES_HEAD):
        for b in prev.batches:
            frag = b.encoded
            end = pos + len(frag)
            if not body.startswith(frag, pos):
                break
            nxt = body[end : end + 1]
            if nxt == b",":
                pos, reused = end + 1, reused + 1
            elif nxt == b"]":
                pos, reused = end, reused + 1
                break
            else:
                break
    if not reused:
        d = json.loads(body)
        return d, tuple(BatchMeta.from_json(b) for b in d["batches"])
    assert prev is not None  # INVARIANT: reused > 0 only with a previous version
    d = json.loads(_BATCHES_HEAD + body[pos:])
    return d, prev.batches[:reused] + tuple(BatchMeta.from_json(b) for b in d["batches"])


def _schema_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _from_head(d: Mapping[str, Any], batches: tuple[BatchMeta, ...], *, schema: pa.Schema | None) -> ShardState:
    """A state from its decoded JSON fields `d` (all but the batches) and its `batches`.

    `schema`: an already decoded schema to reuse when `d`'s is the same.
    """
    if schema is None or _schema_b64(schema) != d["schema"]:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(d["schema"])))
    return ShardState(
        shard_id=d["shard_id"],
        seqno=int(d["seqno"]),
        schema=schema,
        since=Frontier(d["since"]),
        upper=Frontier(d["upper"]),
        batches=batches,
        writers={k: WriterState(int(v[0]), v[1]) for k, v in d["writers"].items()},
        leased_readers={
            k: LeasedReaderState(Frontier(v[0]), int(v[1]), int(v[2]), int(v[3]), _opt_int(v, 4))
            for k, v in d["leased_readers"].items()
        },
        critical_readers={
            k: CriticalReaderState(Frontier(v[0]), v[1], _opt_int(v, 2)) for k, v in d["critical_readers"].items()
        },
        metadata=d.get("metadata", {}),
        schema_changed=bool(d.get("schema_changed", False)),
    )


# ---- the decoded-state cache ----
# shard id -> (the stored bytes of its newest version seen in this process, their decoded state).
# Keyed on the exact bytes, so it cannot serve a stale or a different version: any other
# bytes (another writer's version, an older one) miss and are decoded, checksum and all.
_DECODED: dict[str, tuple[bytes, ShardState]] = {}
_DECODED_LOCK = threading.Lock()
#: How many shards' newest states the cache keeps (the oldest entry goes first).
DECODED_CACHE_SHARDS = 256


def _recall(shard_id: str | None, data: bytes, seqno: int | None) -> ShardState | None:
    if shard_id is None:
        return None
    hit = _DECODED.get(shard_id)
    if hit is None or hit[0] != data or (seqno is not None and hit[1].seqno != seqno):
        return None
    return hit[1]


def remember(data: bytes, state: ShardState) -> None:
    """Cache `state` as the decoding of `data` (the sealed bytes stored for it).

    Only newer versions replace a shard's entry (gc's scans of old versions do
    not evict the head). The caller guarantees `decode(data) == state`:
    `ShardState.decode` itself, or `Machine.apply` with `encode_decoded`'s pair.
    """
    with _DECODED_LOCK:
        cur = _DECODED.get(state.shard_id)
        if cur is not None and cur[1].seqno > state.seqno:
            return
        _DECODED.pop(state.shard_id, None)
        _DECODED[state.shard_id] = (data, state)
        while len(_DECODED) > DECODED_CACHE_SHARDS:
            del _DECODED[next(iter(_DECODED))]


def _opt_int(v: list[Any], i: int) -> int | None:
    """`v[i]` as an int, or None when absent (a field added later) or null."""
    return int(v[i]) if len(v) > i and v[i] is not None else None


# ---- results (lost races are values) ----


@dataclass(frozen=True)
class Appended:
    upper: Frontier


@dataclass(frozen=True)
class AlreadyCommitted:
    token: str
    upper: Frontier


@dataclass(frozen=True)
class UpperMismatchResult:
    expected: Frontier
    current: Frontier


@dataclass(frozen=True)
class OffsetsMismatchResult:
    """The shard's committed offsets for the writer's partitions are not the expected ones."""

    expected: Mapping[str, Any]
    current: Mapping[str, Any]


@dataclass(frozen=True)
class OpaqueMismatch:
    actual: Any


@dataclass(frozen=True)
class Downgraded:
    since: Frontier


def initial(shard_id: str, schema: pa.Schema) -> ShardState:
    return ShardState(shard_id=shard_id, seqno=0, schema=schema)


def _tombstone_check(state: ShardState) -> None:
    if state.is_tombstone:
        raise Tombstone(f"shard {state.shard_id}: finalized (a tombstone); it takes no reads or writes")


def _expire_leases(state: ShardState, now_ms: int) -> ShardState:
    """Drop leased readers whose lease ran out, and recompute since."""
    live = {k: r for k, r in state.leased_readers.items() if r.lease_expires_ms > now_ms}
    if len(live) != len(state.leased_readers):
        state = replace(state, leased_readers=live)
    return _recompute_since(state)


def expire_leases(state: ShardState, *, now_ms: int) -> tuple[ShardState | None, int]:
    """Drop the leased readers whose lease ran out (a crashed process's holds) and recompute since.

    Returns how many were dropped; `None` as the new state when none was.
    """
    if state.is_tombstone:
        return None, 0
    new = _expire_leases(state, now_ms)
    gone = len(state.leased_readers) - len(new.leased_readers)
    return (new if gone else None), gone


def _recompute_since(state: ShardState) -> ShardState:
    """since = max(since, min over readers' sinces). With no readers, since stays put."""
    sinces = [r.since for r in state.leased_readers.values()] + [r.since for r in state.critical_readers.values()]
    if not sinces:
        return state
    new = max(state.since, min(sinces))
    # INVARIANT: since never passes upper (a reader may downgrade to empty only once upper is empty).
    new = min(new, state.upper) if not state.upper.is_empty else new
    return state if new == state.since else replace(state, since=new)


def compare_and_append(
    state: ShardState,
    batch: BatchMeta,
    *,
    writer_id: str,
    token: str | None,
    metadata: Mapping[str, Any] | None,
    lease_ms: int,
    now_ms: int,
    offsets: Mapping[str, Any] | None = None,
    expected_offsets: Mapping[str, Any] | None = None,
) -> tuple[ShardState | None, Appended | AlreadyCommitted | UpperMismatchResult | OffsetsMismatchResult]:
    """Append `batch` iff `batch.lower == state.upper`; otherwise `UpperMismatchResult`.

    A repeated idempotency `token` of this writer returns `AlreadyCommitted` and
    changes nothing. An empty batch only advances the upper (and is merged into a
    preceding empty batch, so idle ticks do not grow the state).

    Source offsets are part of the compare-and-set: with `expected_offsets`
    (partition key -> offset, None for "none committed") the append happens only
    if the shard's committed offset of every such key is exactly that; otherwise
    `OffsetsMismatchResult` (checked before the upper: a writer whose input is
    already in must not retry at a new upper). `offsets` are merged per key into
    the committed offsets (`metadata[OFFSETS_KEY]`) in the same CAS.
    """
    _tombstone_check(state)
    if batch.upper < batch.lower:
        raise InvalidBounds(f"shard {state.shard_id}: upper {batch.upper} is before lower {batch.lower}")
    w = state.writers.get(writer_id)
    if token is not None and w is not None and w.last_token == token:
        return None, AlreadyCommitted(token, state.upper)
    if expected_offsets:
        committed = state.metadata.get(OFFSETS_KEY) or {}
        current = {k: committed.get(k) for k in expected_offsets}
        if current != dict(expected_offsets):
            return None, OffsetsMismatchResult(dict(expected_offsets), current)
    if state.upper != batch.lower:
        return None, UpperMismatchResult(batch.lower, state.upper)
    if batch.upper == batch.lower and offsets:
        raise InvalidBounds(f"shard {state.shard_id}: source offsets need a batch with lower < upper, got [{batch.lower}, {batch.upper})")
    if batch.upper == batch.lower:
        # SUBTLE: an empty-width append changes nothing, but it has been checked against
        # the head just read, so it is linearized at that read; no write is needed.
        return None, Appended(state.upper)
    batches = list(state.batches)
    if batch.is_empty and batches and batches[-1].is_empty:
        batches[-1] = replace(batches[-1], upper=batch.upper)
    else:
        batches.append(batch)
    writers = dict(state.writers)
    writers[writer_id] = WriterState(now_ms + lease_ms, token if token is not None else (w.last_token if w else None))
    md = dict(state.metadata)
    if metadata:
        md.update(metadata)
    if offsets:
        md[OFFSETS_KEY] = {**(md.get(OFFSETS_KEY) or {}), **offsets}
    new = replace(state, batches=tuple(batches), upper=batch.upper, writers=writers, metadata=md)
    new = _expire_leases(new, now_ms)
    return new, Appended(batch.upper)


def register_leased_reader(
    state: ShardState, reader_id: str, *, lease_ms: int, now_ms: int
) -> tuple[ShardState | None, LeasedReaderState]:
    """Register a reader holding since at the shard's current since, pinning this state version."""
    _tombstone_check(state)
    state = _expire_leases(state, now_ms)
    existing = state.leased_readers.get(reader_id)
    r = LeasedReaderState(
        since=existing.since if existing else state.since,
        seqno=state.seqno,
        lease_expires_ms=now_ms + lease_ms,
        lease_ms=lease_ms,
        registered_ms=existing.registered_ms if existing else now_ms,
    )
    readers = dict(state.leased_readers)
    readers[reader_id] = r
    return replace(state, leased_readers=readers), r


def _live_reader(state: ShardState, reader_id: str, now_ms: int) -> LeasedReaderState:
    r = state.leased_readers.get(reader_id)
    if r is None or r.lease_expires_ms <= now_ms:
        raise LeaseExpired(
            f"shard {state.shard_id}: leased reader {reader_id} has expired; open a new reader"
        )
    return r


def heartbeat_leased_reader(
    state: ShardState, reader_id: str, *, pin_seqno: int, now_ms: int
) -> tuple[ShardState | None, LeasedReaderState]:
    """Extend the lease; move the pinned seqno forward to `pin_seqno` (never back)."""
    _tombstone_check(state)
    r = _live_reader(state, reader_id, now_ms)
    r = replace(r, lease_expires_ms=now_ms + r.lease_ms, seqno=max(r.seqno, min(pin_seqno, state.seqno)))
    readers = dict(state.leased_readers)
    readers[reader_id] = r
    return _expire_leases(replace(state, leased_readers=readers), now_ms), r


def downgrade_since(
    state: ShardState, reader_id: str, new_since: Frontier, *, now_ms: int
) -> tuple[ShardState | None, Downgraded]:
    """Move a leased reader's since forward (a since only moves forward; an earlier value is ignored)."""
    _tombstone_check(state)
    r = _live_reader(state, reader_id, now_ms)
    since = max(r.since, new_since)
    if not state.upper.is_empty:
        # A reader cannot hold since past the upper: there is nothing there to compact.
        since = min(since, state.upper) if since.is_empty else since
    r = replace(r, since=since, lease_expires_ms=now_ms + r.lease_ms)
    readers = dict(state.leased_readers)
    readers[reader_id] = r
    return _expire_leases(replace(state, leased_readers=readers), now_ms), Downgraded(since)


def expire_leased_reader(state: ShardState, reader_id: str, *, now_ms: int) -> tuple[ShardState | None, bool]:
    """Drop a leased reader; the result says whether it was registered."""
    if reader_id not in state.leased_readers:
        return None, False
    readers = dict(state.leased_readers)
    del readers[reader_id]
    return _expire_leases(replace(state, leased_readers=readers), now_ms), True


def register_critical_reader(
    state: ShardState, reader_id: str, opaque: Any, *, now_ms: int = 0
) -> tuple[ShardState | None, CriticalReaderState]:
    """Register a critical reader at the current since; an existing one is returned unchanged."""
    _tombstone_check(state)
    existing = state.critical_readers.get(reader_id)
    if existing is not None:
        return None, existing
    r = CriticalReaderState(state.since, opaque, now_ms)
    readers = dict(state.critical_readers)
    readers[reader_id] = r
    return replace(state, critical_readers=readers), r


def release_critical_reader(
    state: ShardState, reader_id: str, expected_opaque: Any = None, *, check_opaque: bool = False, now_ms: int
) -> tuple[ShardState | None, bool | OpaqueMismatch]:
    """Remove a critical reader (its hold on since goes with it); False if it was not registered.

    With `check_opaque`, only when its opaque is `expected_opaque` (else `OpaqueMismatch`).
    Since is recomputed from the readers left; with none left it stays put.
    """
    r = state.critical_readers.get(reader_id)
    if r is None:
        return None, False
    if check_opaque and r.opaque != expected_opaque:
        return None, OpaqueMismatch(r.opaque)
    readers = dict(state.critical_readers)
    del readers[reader_id]
    return _expire_leases(replace(state, critical_readers=readers), now_ms), True


def holders(state: ShardState, now_ms: int) -> dict[str, Frontier]:
    """Every live handle holding the shard's since: reader id -> its since (leased ones unexpired)."""
    out = {k: r.since for k, r in state.critical_readers.items()}
    out.update({k: r.since for k, r in state.leased_readers.items() if r.lease_expires_ms > now_ms})
    return out


#: The reader ids of the holds a storage controller keeps (see `storage.controller.holds`):
#: the collection's read-policy handle (critical, one per shard),
POLICY_READER = "controller"
#: a dependent collection's durable hold on its input (critical): `dep:<the dependent's shard id>`,
DEP_PREFIX = "dep:"
#: a controller process's read holds (leased): `hold:<role>:<pid>@<host>:<nonce>`.
HOLD_PREFIX = "hold:"


def describe_holder(reader_id: str) -> dict[str, Any]:
    """What a reader id says about its holder: `kind` and, by kind, more.

    `policy` (the `controller` handle), `dependency` (`dependent_shard`),
    `process` (`role`, `pid`, `host`; None each when the id does not parse), or
    `reader` (any other id: a sink's sync-point hold, a source, a query).

    Example:
        >>> describe_holder("dep:s123")
        {'kind': 'dependency', 'dependent_shard': 's123'}
        >>> describe_holder("hold:job:x:42@box:a1b2c3")
        {'kind': 'process', 'role': 'job:x', 'pid': 42, 'host': 'box'}
    """
    if reader_id == POLICY_READER:
        return {"kind": "policy"}
    if reader_id.startswith(DEP_PREFIX):
        return {"kind": "dependency", "dependent_shard": reader_id[len(DEP_PREFIX) :]}
    if reader_id.startswith(HOLD_PREFIX):
        # SUBTLE: the role may itself contain ':' and '@'; the host, pid and nonce do not.
        out: dict[str, Any] = {"kind": "process", "role": None, "pid": None, "host": None}
        head, _, _nonce = reader_id[len(HOLD_PREFIX) :].rpartition(":")
        who, at, host = head.rpartition("@")
        role, colon, pid = who.rpartition(":")
        if at and colon and role and pid.isdigit() and host:
            out.update(role=role, pid=int(pid), host=host)
        return out
    return {"kind": "reader"}


def hold_entries(state: ShardState, now_ms: int) -> list[dict[str, Any]]:
    """One JSON-friendly entry per handle on the shard, critical and leased (expired ones flagged).

    Each: `holder` (the reader id), `kind` and its details (`describe_holder`),
    `durable` (critical), `since` (an int, None for the empty frontier),
    `registered_ms` (None when not recorded), `expired` (a leased reader whose
    lease ran out: it holds nothing, the next transition drops it). Policy first,
    then dependencies, processes, other readers; by id within each.
    """
    out: list[dict[str, Any]] = []
    for k, c in state.critical_readers.items():
        out.append({"holder": k, **describe_holder(k), "durable": True, "since": c.since.time,
                    "registered_ms": c.registered_ms, "expired": False})
    for k, r in state.leased_readers.items():
        out.append({"holder": k, **describe_holder(k), "durable": False, "since": r.since.time,
                    "registered_ms": r.registered_ms, "expired": r.lease_expires_ms <= now_ms})
    order = {"policy": 0, "dependency": 1, "process": 2, "reader": 3}
    return sorted(out, key=lambda h: (order[h["kind"]], h["holder"]))


def wanted_since(state: ShardState, now_ms: int) -> Frontier:
    """The since the shard's live handles ask for: `max(since, min over them)`, not capped at the upper.

    The stored since never passes the upper (nothing there to compact); a new
    dependent may already be held further, at its inputs' sinces.
    """
    hs = list(holders(state, now_ms).values())
    return max(state.since, min(hs)) if hs else state.since


def compare_and_downgrade_since(
    state: ShardState, reader_id: str, expected_opaque: Any, new_opaque: Any, new_since: Frontier, *, now_ms: int
) -> tuple[ShardState | None, Downgraded | OpaqueMismatch]:
    """The fencing primitive: downgrade iff the stored opaque equals `expected_opaque`."""
    _tombstone_check(state)
    r = state.critical_readers.get(reader_id)
    if r is None:
        raise LeaseExpired(f"shard {state.shard_id}: critical reader {reader_id} is not registered")
    if r.opaque != expected_opaque:
        return None, OpaqueMismatch(r.opaque)
    since = max(r.since, new_since)
    readers = dict(state.critical_readers)
    readers[reader_id] = CriticalReaderState(since, new_opaque, r.registered_ms)
    new = _expire_leases(replace(state, critical_readers=readers), now_ms)
    return new, Downgraded(since)


def apply_merge(
    state: ShardState, inputs: tuple[BatchMeta, ...], output: BatchMeta, *, now_ms: int = 0
) -> tuple[ShardState | None, bool]:
    """Replace the run of batches `inputs` by `output` iff that exact run is still in the state.

    Returns (None, False) when the inputs are gone (a concurrent compaction or a
    finalization replaced them): the caller leaves its output parts for gc.
    """
    if state.is_tombstone or not inputs:
        return None, False
    n = len(inputs)
    for i in range(len(state.batches) - n + 1):
        if state.batches[i : i + n] == inputs:
            if output.lower != inputs[0].lower or output.upper != inputs[-1].upper:
                raise InvalidBounds(
                    f"shard {state.shard_id}: merged batch [{output.lower}, {output.upper}) does not "
                    f"cover its inputs [{inputs[0].lower}, {inputs[-1].upper})"
                )
            batches = state.batches[:i] + (output,) + state.batches[i + n :]
            return replace(state, batches=batches), True
    return None, False


def finalize_upper(state: ShardState, *, writer_id: str, now_ms: int) -> tuple[ShardState | None, None]:
    """Step 1 of finalization: close the upper (an empty batch up to the empty frontier)."""
    if state.upper.is_empty:
        return None, None
    batch = BatchMeta(state.upper, Frontier.EMPTY, Frontier.MIN)
    new, _ = compare_and_append(
        state, batch, writer_id=writer_id, token=None, metadata=None, lease_ms=0, now_ms=now_ms
    )
    return new, None


def finalize_since(
    state: ShardState, *, force: bool = False, now_ms: int = 0
) -> tuple[ShardState | None, dict[str, Frontier]]:
    """Step 2: since to empty; the shard becomes a tombstone. Only once no live handle holds it.

    Returns the live handles still holding it (reader id -> since; expired leases do
    not count) and changes nothing while there are any, unless `force` (an operator's
    explicit drop of every hold). Returns `{}` once finalized.
    """
    if not state.upper.is_empty:
        raise InvalidBounds(f"shard {state.shard_id}: cannot finalize since before the upper is closed")
    if state.is_tombstone:
        return None, {}
    held = holders(state, now_ms)
    if held and not force:
        return None, held
    return replace(state, since=Frontier.EMPTY, leased_readers={}, critical_readers={}, writers={}), {}


def finalize_batches(state: ShardState, *, now_ms: int = 0) -> tuple[ShardState | None, None]:
    """Step 3: forget every batch; gc then deletes the parts."""
    if not state.batches:
        return None, None
    return replace(state, batches=()), None


def set_schema(state: ShardState, schema: pa.Schema, *, now_ms: int = 0) -> tuple[ShardState | None, None]:
    """Evolve the schema (the controller checks compatibility); older parts lack the new columns."""
    _tombstone_check(state)
    if state.schema.equals(schema, check_metadata=True):
        return None, None
    return replace(state, schema=schema, schema_changed=True), None


def check_invariants(state: ShardState, where: str | None = None) -> None:
    """Raise `StateCorrupt` if a structural invariant is broken (on every decode, in tests and fsck).

    Real checks, not `assert`: they hold under `python -O` too. Cost: one pass over the batches.
    """
    w = where or f"shard {state.shard_id} seqno {state.seqno}"

    def f(x: Frontier) -> str:
        return "the empty frontier" if x.is_empty else str(x.time)

    def bad(msg: str) -> StateCorrupt:
        return StateCorrupt(f"{w}: invalid shard state: {msg}", shard=state.shard_id)

    if state.is_tombstone:
        if state.batches and not state.batches[-1].upper.is_empty:
            raise bad(f"a tombstone whose last batch ends at {f(state.batches[-1].upper)}, expected the empty frontier")
        return
    # INVARIANT: since <= upper, unless the shard is a tombstone.
    if not state.since <= state.upper:
        raise bad(f"since {f(state.since)} is beyond upper {f(state.upper)}")
    if _contiguous(state.batches, state.upper.time):
        return
    expect = Frontier.MIN
    for i, b in enumerate(state.batches):
        # INVARIANT: batches are contiguous from 0 to the upper.
        if b.lower != expect:
            raise bad(f"batch {i} starts at {f(b.lower)}, expected {f(expect)} (the previous batch's upper)")
        if not b.lower < b.upper:
            raise bad(f"batch {i} is [{f(b.lower)}, {f(b.upper)}), expected lower < upper")
        expect = b.upper
    if expect != state.upper:
        raise bad(f"upper is {f(state.upper)}, but its batches end at {f(expect)}")


def _contiguous(batches: tuple[BatchMeta, ...], upper: int | None) -> bool:
    """The batch invariants on plain times, fast (they run on every decode): contiguous from
    0, each `lower < upper`, ending at `upper`. False sends `check_invariants` to its slow
    walk, which names what is wrong."""
    expect: int | None = Frontier.MIN.time
    for b in batches:
        lo, hi = b.lower.time, b.upper.time
        if lo is None or lo != expect or (hi is not None and hi <= lo):
            return False
        expect = hi
    return expect == upper

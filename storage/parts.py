"""The part store: the one place that writes, verifies and reads part files.

A *part* is one Parquet file in blob, named by a fresh key and described in
the shard's state by its `PartMeta` (key, sha256, rows, bytes). Parts are
write-once, so a reader that holds a `PartMeta` can check the bytes it gets.

`PartStore` (one per client, `client.parts`) does every part IO:

- `write(shard, table)`: encode (Parquet with statistics) and put, at most
  `PART_MAX_ROWS` rows per part; large tables are encoded by several threads
  (Parquet releases the GIL).
- `verify(shard, batch, part)`: the sha256 of a local part, remembered per
  file identity; returns the path DuckDB can read.
- `read(shard, batch, part)`: fetch, verify and decode one part.
- `check(shard, batch, part, data)`: the size and sha256 of fetched bytes.
- `source(state, batches, con, name)`: a DuckDB FROM-clause over the parts of
  some batches (`PartsSource`).
- `touch(parts)`: keep written-but-unreferenced local parts young for gc.

A missing or damaged part is `CorruptPart` naming the shard, the batch
`[lower, upper)` and the key; a read never returns a silently wrong answer.

It also defines `ShardEnv`, what the handles and the lifecycle (read, write,
compact, gc) need from a client, so that none of them imports `client`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from . import state as st
from ._compute import pc
from .blob import Blob
from .errors import CorruptPart
from .frontier import Frontier
from .machine import Machine
from .updates import DIFF, qident, update_schema

#: Rows per part at most (a module global: tests lower it to get many parts).
PART_MAX_ROWS = 1 << 20
#: Threads that encode the parts of one large table.
WRITE_THREADS = 4
#: Remembered sha256 checks at most (then the cache starts over).
VERIFIED_MAX = 100_000

DiffRange = tuple[int, int]  # (min, max) of `_diff` over some parts


class ShardEnv(Protocol):
    """What handles, compaction and gc need from a client (`storage.Client` is one)."""

    blob: Blob
    parts: PartStore
    clock: Callable[[], int]

    def machine(self, shard: str) -> Machine: ...

    @property
    def compactor(self) -> Any: ...


class PartsOf(Protocol):
    """Parts with the bounds `[lower, upper)` of their batch: a state's `BatchMeta`, or a `Batch` not yet appended."""

    @property
    def lower(self) -> Frontier: ...
    @property
    def upper(self) -> Frontier: ...
    @property
    def parts(self) -> tuple[st.PartMeta, ...]: ...


def encode_part(table: pa.Table) -> bytes:
    """A part's bytes: Parquet with statistics, so reads can skip row groups by `_time`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", write_statistics=True)
    return sink.getvalue().to_pybytes()


def _end(f: Frontier) -> str:
    return "inf" if f.is_empty else str(f.time)


@dataclass(frozen=True)
class PartsSource:
    """FROM-clauses over a state's parts, with what their Parquet statistics say of `_diff`.

    `src` reads every part. `diffs` is (min, max) `_diff` over them, None if
    unknown or there are no parts. `neg`/`pos` read only the parts whose min
    `_diff` is negative / not negative (None when not split: remote parts, or
    statistics missing); `find_negative` uses them to sum fewer updates.
    """

    src: str
    diffs: DiffRange | None = None
    neg: str | None = None
    pos: str | None = None


class PartStore:
    """Writes, verifies and reads the part files under one blob (see the module docstring).

    Thread-safe. The cache of successful sha256 checks is per store.
    """

    def __init__(self, blob: Blob):
        self.blob = blob
        self._verified: dict[tuple[str, int, int, int], None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PartStore({self.blob!r})"

    # ---- write ----
    def _put(self, shard: str, table: pa.Table) -> st.PartMeta:
        data = encode_part(table)
        key = f"{shard}/p{uuid.uuid4().hex}.parquet"
        self.blob.put(key, data)
        return st.PartMeta(key, hashlib.sha256(data).hexdigest(), table.num_rows, len(data))

    def write(self, shard: str, table: pa.Table) -> tuple[st.PartMeta, ...]:
        """Write `table` as parts of at most `PART_MAX_ROWS` rows; return their metas (none for no rows).

        Nothing references the parts yet: until a state does, gc sees orphans
        (deleted after its grace period).
        """
        n = PART_MAX_ROWS
        chunks = [table.slice(o, n) for o in range(0, table.num_rows, n)]
        if len(chunks) <= 1:
            return tuple(self._put(shard, c) for c in chunks)
        with ThreadPoolExecutor(min(WRITE_THREADS, len(chunks))) as ex:
            return tuple(ex.map(lambda c: self._put(shard, c), chunks))

    def touch(self, parts: Iterable[st.PartMeta]) -> None:
        """Refresh the mtime of local parts not yet referenced, so gc does not take them for old orphans.

        Remote blobs (no local path) are not refreshed.
        """
        for p in parts:
            path = self.blob.local_path(p.key)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path)

    # ---- verify and read ----
    def corrupt(self, shard: str, batch: PartsOf, part: st.PartMeta, what: str) -> CorruptPart:
        """The error for `part` of `batch` in `shard`: `what` is wrong with it."""
        return CorruptPart(f"shard {shard}: batch [{batch.lower.time}, {_end(batch.upper)}) part {part.key}: {what}")

    def check(self, shard: str, batch: PartsOf, part: st.PartMeta, data: bytes | None) -> bytes:
        """`data` (a part's fetched bytes) if it is the part: present, its size, its sha256.

        Raises:
            CorruptPart: missing, or the size or sha256 does not match.
        """
        if data is None:
            raise self.corrupt(shard, batch, part, "missing")
        if len(data) != part.bytes:
            raise self.corrupt(shard, batch, part, f"size {len(data)} bytes, expected {part.bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != part.sha256:
            raise self.corrupt(shard, batch, part, f"sha256 {digest[:12]}.. does not match {part.sha256[:12]}..")
        return data

    def verify(self, shard: str, batch: PartsOf, part: st.PartMeta) -> str | None:
        """Check a local part's sha256; return its path (None for remote blobs: `read` checks those).

        SUBTLE: parts are write-once, so a successful check is remembered per
        (key, size, mtime, inode); rewriting or replacing the file changes that
        identity and forces a fresh check.

        Raises:
            CorruptPart: missing, or the size or sha256 does not match.
        """
        path = self.blob.local_path(part.key)
        if path is None:
            return None
        try:
            stt = os.stat(path)
        except FileNotFoundError:
            raise self.corrupt(shard, batch, part, "missing") from None
        ident = (part.key, stt.st_size, stt.st_mtime_ns, stt.st_ino)
        with self._lock:
            if ident in self._verified:
                return path
        if stt.st_size != part.bytes:
            raise self.corrupt(shard, batch, part, f"size {stt.st_size} bytes, expected {part.bytes}")
        with builtins.open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != part.sha256:
            raise self.corrupt(shard, batch, part, f"sha256 {digest[:12]}.. does not match {part.sha256[:12]}..")
        with self._lock:
            if len(self._verified) > VERIFIED_MAX:
                self._verified.clear()
            self._verified[ident] = None
        return path

    def read(self, shard: str, batch: PartsOf, part: st.PartMeta) -> pa.Table:
        """Fetch, verify and decode one part.

        Raises:
            CorruptPart: missing, or the size or sha256 does not match.
        """
        data = self.check(shard, batch, part, self.blob.get(part.key))
        return pq.read_table(io.BytesIO(data))

    def forget(self, keys: Iterable[str] | None = None) -> None:
        """Drop the remembered checks of `keys` (deleted parts), or of every part (None: a cold start)."""
        gone = None if keys is None else set(keys)
        with self._lock:
            self._verified = {} if gone is None else {k: None for k in self._verified if k[0] not in gone}

    # ---- DuckDB ----
    def source(
        self, s: st.ShardState, batches: Sequence[PartsOf], con: duckdb.DuckDBPyConnection, name: str, *,
        diffs: bool = False, by_path: bool = True,
    ) -> PartsSource:
        """Verify the parts of `batches` (of state `s`'s shard) and return DuckDB FROM-clauses over them.

        The batches need not be in `s`: a writer's `Batch`es not yet appended work too.

        Local parts are read by DuckDB straight from their files; parts on a
        remote blob are fetched, verified and registered as one Arrow table
        under `name`. An empty list yields an empty relation with the shard's
        update schema. With `by_path=False`, local parts are registered as Arrow
        datasets (`name`, `name_neg`, `name_pos`) instead, which DuckDB scans without
        opening a file itself: a connection whose file access is confined away from
        the store (`storage.query.connect(confine=True)`) can still read them. With
        `diffs`, also what the parts' statistics say of
        `_diff` (see `PartsSource`): local parts answer from their Parquet
        footers (no data is read), remote parts from the fetched table.

        Raises:
            CorruptPart: a part is missing or does not match its sha256.
        """
        parts = [(b, p) for b in batches for p in b.parts]
        schema = update_schema(s.schema)
        if not parts:
            con.register(name, schema.empty_table())
            return PartsSource(qident(name))
        paths = []
        tables = []
        for b, p in parts:
            path = self.verify(s.shard_id, b, p)
            if path is not None:
                paths.append(path)
            else:
                tables.append(self.read(s.shard_id, b, p))
        if tables:
            for path in paths:
                tables.append(pq.read_table(path))
            t = pa.concat_tables([_conform(x, schema) for x in tables])
            con.register(name, t)
            rng: DiffRange | None = None
            if diffs and t.num_rows:
                mm = pc.min_max(t.column(DIFF))
                rng = (mm["min"].as_py(), mm["max"].as_py())
            return PartsSource(qident(name), rng)
        def src(ps: list[str], suffix: str = "") -> str:
            if by_path:
                return _read_parquet(con, s, schema, ps)
            import pyarrow.dataset as pads  # only a confined query needs it (startup: see _compute)

            con.register(name + suffix, pads.dataset(ps, schema=schema, format="parquet"))
            return qident(name + suffix)

        if not diffs:
            return PartsSource(src(paths))
        ranges = [_footer_diff_range(x) for x in paths]
        known = [r for r in ranges if r is not None]
        if len(known) < len(ranges) or not known:
            return PartsSource(src(paths))
        neg = [x for x, r in zip(paths, known, strict=True) if r[0] < 0]
        pos = [x for x, r in zip(paths, known, strict=True) if r[0] >= 0]
        return PartsSource(
            src(paths),
            (min(r[0] for r in known), max(r[1] for r in known)),
            src(neg, "_neg") if neg else None,
            src(pos, "_pos") if pos else None,
        )


def parts_source(env: ShardEnv, s: st.ShardState, batches: list[st.BatchMeta], con: duckdb.DuckDBPyConnection, name: str) -> str:
    """`env.parts.source(...)`'s FROM-clause over every part of `batches`."""
    return env.parts.source(s, batches, con, name).src


def parts_source_with_diffs(
    env: ShardEnv, s: st.ShardState, batches: list[st.BatchMeta], con: duckdb.DuckDBPyConnection, name: str
) -> PartsSource:
    """`parts_source`, plus what the parts' statistics say of `_diff` (see `PartsSource`).

    A min `>= 0` proves no count can be negative, so the snapshot needs no check.
    """
    return env.parts.source(s, batches, con, name, diffs=True)


def _read_parquet(con: duckdb.DuckDBPyConnection, s: st.ShardState, schema: pa.Schema, paths: list[str]) -> str:
    lst = "[" + ", ".join("'" + x.replace("'", "''") + "'" for x in paths) + "]"
    if s.schema_changed:
        # Older parts lack added (nullable) columns; union_by_name fills them with NULL.
        cols = ", ".join(f"CAST({qident(f.name)} AS {_duck_type(con, f.type)}) AS {qident(f.name)}" for f in schema)
        return f"(SELECT {cols} FROM read_parquet({lst}, union_by_name=true))"
    return f"read_parquet({lst})"


def _footer_diff_range(path: str) -> DiffRange | None:
    """(min, max) `_diff` from the Parquet statistics of one part; None if a row group lacks them."""
    lo: int | None = None
    hi: int | None = None
    md = pq.read_metadata(path)
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows == 0:
            continue
        col = next((rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == DIFF), None)
        st_ = col.statistics if col is not None else None
        if st_ is None or not st_.has_min_max:
            return None
        lo = st_.min if lo is None else min(lo, st_.min)
        hi = st_.max if hi is None else max(hi, st_.max)
    return None if lo is None or hi is None else (int(lo), int(hi))


def _duck_type(con: duckdb.DuckDBPyConnection, t: pa.DataType) -> str:
    rel = con.from_arrow(pa.table({"x": pa.array([], type=t)}))
    return str(rel.types[0])


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        if f.name in t.schema.names:
            cols.append(t.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)

"""Consensus: a linearizable log of versioned values per key.

Both implementations run the same SQL (only the placeholder differs): a table
of `(shard, sequence_number, data)` rows, one per version, where a
compare-and-set is an INSERT of `expected + 1` that only happens while the
latest row is `expected`. The primary key makes two racing inserts of the same
successor impossible, so exactly one wins, even across processes and machines.

`compare_and_set_many` runs several such inserts in one transaction: all of
them or none. It is what makes an append to several shards (tables) atomic.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import InvalidInput


@dataclass(frozen=True)
class VersionedData:
    seqno: int
    data: bytes


@dataclass(frozen=True)
class CasOp:
    """One compare-and-set: `key` moves from `expected` (None: absent) to `new`."""

    key: str
    expected: int | None
    new: VersionedData


class Consensus(Protocol):
    def head(self, key: str) -> VersionedData | None: ...
    def compare_and_set(self, key: str, expected: int | None, new: VersionedData) -> bool: ...
    def compare_and_set_many(self, ops: Sequence[CasOp]) -> bool: ...
    def scan(self, key: str, from_seqno: int, limit: int = 1000) -> list[VersionedData]: ...
    def truncate(self, key: str, seqno: int) -> int: ...
    def list_keys(self, prefix: str = "") -> list[str]: ...
    def close(self) -> None: ...


# The SQL both backends share; `{p}` is the placeholder ('?' or '%s').
_HEAD = "SELECT sequence_number, data FROM consensus WHERE shard = {p} ORDER BY sequence_number DESC LIMIT 1"
_INSERT_IF_HEAD = (
    "INSERT INTO consensus (shard, sequence_number, data) SELECT {p}, {p}, {p} "
    "WHERE (SELECT sequence_number FROM consensus WHERE shard = {p} "
    "ORDER BY sequence_number DESC LIMIT 1) = {p}"
)
_INSERT_IF_ABSENT = (
    "INSERT INTO consensus (shard, sequence_number, data) SELECT {p}, {p}, {p} "
    "WHERE NOT EXISTS (SELECT 1 FROM consensus WHERE shard = {p})"
)
_SCAN = (
    "SELECT sequence_number, data FROM consensus WHERE shard = {p} AND sequence_number >= {p} "
    "ORDER BY sequence_number ASC LIMIT {p}"
)
_TRUNCATE = (
    "DELETE FROM consensus WHERE shard = {p} AND sequence_number < {p} "
    "AND EXISTS (SELECT 1 FROM consensus WHERE shard = {p} AND sequence_number >= {p})"
)
_KEYS = "SELECT DISTINCT shard FROM consensus WHERE shard LIKE {p} ESCAPE '\\' ORDER BY shard"
_CREATE = (
    "CREATE TABLE IF NOT EXISTS consensus (shard TEXT NOT NULL, sequence_number BIGINT NOT NULL, "
    "data {blob} NOT NULL, PRIMARY KEY (shard, sequence_number))"
)


def _check(key: str, expected: int | None, new: VersionedData) -> None:
    want = 0 if expected is None else expected + 1
    if new.seqno != want:
        raise InvalidInput(f"consensus key {key!r}: new seqno must be {want}, got {new.seqno}")


def _cas_sql(p: str, op: CasOp) -> tuple[str, tuple[Any, ...]]:
    if op.expected is None:
        return _INSERT_IF_ABSENT.format(p=p), (op.key, op.new.seqno, op.new.data, op.key)
    return _INSERT_IF_HEAD.format(p=p), (op.key, op.new.seqno, op.new.data, op.key, op.expected)


class _SqlConsensus:
    """What both backends share: the same SQL for reads, one connection per thread and process.

    Subclasses provide `_con()`, `compare_and_set_many` and `truncate` (their
    transaction handling differs; their SQL does not).
    """

    P = "?"
    _local: threading.local

    def _con(self) -> Any:
        raise NotImplementedError

    def compare_and_set_many(self, ops: Sequence[CasOp]) -> bool:
        raise NotImplementedError

    def head(self, key: str) -> VersionedData | None:
        row = self._con().execute(_HEAD.format(p=self.P), (key,)).fetchone()
        return None if row is None else VersionedData(int(row[0]), bytes(row[1]))

    def compare_and_set(self, key: str, expected: int | None, new: VersionedData) -> bool:
        return self.compare_and_set_many([CasOp(key, expected, new)])

    def scan(self, key: str, from_seqno: int, limit: int = 1000) -> list[VersionedData]:
        rows = self._con().execute(_SCAN.format(p=self.P), (key, from_seqno, limit)).fetchall()
        return [VersionedData(int(s), bytes(d)) for s, d in rows]

    def list_keys(self, prefix: str = "") -> list[str]:
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return [r[0] for r in self._con().execute(_KEYS.format(p=self.P), (like,)).fetchall()]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


class SqliteConsensus(_SqlConsensus):
    """Consensus in one SQLite file; safe across threads and processes (WAL, BEGIN IMMEDIATE)."""

    P = "?"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self._local = threading.local()
        con = self._con()
        con.execute(_CREATE.format(blob="BLOB"))

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed CAS survives power loss, not only a process crash.
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
            self._local.pid = os.getpid()
        return con

    def _write(self, fn: Any) -> Any:
        con = self._con()
        for attempt in range(200):
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if "locked" in str(e) or "busy" in str(e):
                    time.sleep(min(0.001 * 2**attempt, 0.05))
                    continue
                raise
            try:
                out = fn(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            if out is False:
                con.execute("ROLLBACK")
            else:
                con.execute("COMMIT")
            return out
        raise TimeoutError(f"sqlite consensus {self.path}: database stayed locked")

    def compare_and_set_many(self, ops: Sequence[CasOp]) -> bool:
        for op in ops:
            _check(op.key, op.expected, op.new)

        def run(con: sqlite3.Connection) -> bool:
            for op in ops:
                sql, args = _cas_sql(self.P, op)
                try:
                    cur = con.execute(sql, args)
                except sqlite3.IntegrityError:
                    return False
                if cur.rowcount != 1:
                    return False
            return True

        return bool(self._write(run))

    def truncate(self, key: str, seqno: int) -> int:
        """Delete versions below `seqno`, but only if a version at or above it exists."""
        return int(self._write(lambda con: con.execute(_TRUNCATE.format(p=self.P), (key, seqno, key, seqno)).rowcount))

    def reclaim(self) -> int:
        """Give the pages of truncated versions back to the file system; returns the pages freed.

        Truncation only moves pages to SQLite's free list (the file keeps its size).
        With `auto_vacuum=INCREMENTAL`, `PRAGMA incremental_vacuum` cuts them off
        the end of the file. SUBTLE: a file created without that mode only gets it
        from a VACUUM, so the first call converts it once: VACUUM is one write
        transaction (other processes wait on the lock like for any write, and
        readers keep their WAL snapshot), and it costs what is *live*, which
        after truncation is little, not the file's size.
        """
        con = self._con()
        if int(con.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
            con.execute("PRAGMA auto_vacuum=INCREMENTAL")
            con.execute("VACUUM")
            free = 0
        else:
            free = int(con.execute("PRAGMA freelist_count").fetchone()[0])
            if free:
                # NB: not execute(): the pragma frees one page per step, and the sqlite3
                # module steps a pragma that returns no rows once; executescript runs it out.
                con.executescript("PRAGMA incremental_vacuum;")
        # The WAL file keeps its largest size, and under steady writes grows by steps.
        # Truncate it when that can be done at once: a TRUNCATE checkpoint holds the
        # write lock while it waits for readers, so wait briefly, and on busy try next time.
        busy = int(con.execute("PRAGMA busy_timeout").fetchone()[0])
        con.execute("PRAGMA busy_timeout=200")
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            con.execute(f"PRAGMA busy_timeout={busy}")
        return free


class PostgresConsensus(_SqlConsensus):
    """Consensus on PostgreSQL, for several processes or machines. Same SQL as SQLite.

    Each thread gets its own connection. A compare-and-set that collides with a
    concurrent insert of the same successor fails on the primary key and
    returns False, exactly like losing the race outright.
    """

    P = "%s"

    def __init__(self, dsn: str):
        import psycopg

        self._psycopg = psycopg
        self.dsn = dsn
        self._local = threading.local()
        with self._con().transaction():
            self._con().execute(_CREATE.format(blob="BYTEA"))

    def _con(self) -> Any:
        con = getattr(self._local, "con", None)
        if con is None or con.closed or getattr(self._local, "pid", None) != os.getpid():
            con = self._psycopg.connect(self.dsn, autocommit=True)
            self._local.con = con
            self._local.pid = os.getpid()
        return con

    def compare_and_set_many(self, ops: Sequence[CasOp]) -> bool:
        for op in ops:
            _check(op.key, op.expected, op.new)
        con = self._con()
        errors = self._psycopg.errors

        class _Lost(Exception):
            pass

        try:
            with con.transaction():
                for op in ops:
                    sql, args = _cas_sql(self.P, op)
                    cur = con.execute(sql, args)
                    if cur.rowcount != 1:
                        raise _Lost
        except (_Lost, errors.UniqueViolation, errors.SerializationFailure):
            return False
        return True

    def truncate(self, key: str, seqno: int) -> int:
        cur = self._con().execute(_TRUNCATE.format(p=self.P), (key, seqno, key, seqno))
        return int(cur.rowcount)


def open_consensus(url: str | None, default_path: str) -> Consensus:
    """`None` or `sqlite:///path` -> SqliteConsensus; `postgresql://...` -> PostgresConsensus."""
    if url is None:
        return SqliteConsensus(default_path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresConsensus(url)
    if url.startswith("sqlite://"):
        return SqliteConsensus(url[len("sqlite://") :])
    raise InvalidInput(f"consensus {url!r}: expected postgresql://... or sqlite:///path")

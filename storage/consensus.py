"""Consensus: a linearizable log of versioned values per key.

Both implementations run the same SQL (only the placeholder differs): a table
of `(shard, sequence_number, data)` rows, one per version, where a
compare-and-set is an INSERT of `expected + 1` that only happens while the
latest row is `expected`. The primary key makes two racing inserts of the same
successor impossible, so exactly one wins, even across processes and machines.

`compare_and_set_many` runs several such inserts in one transaction: all of
them or none. It is what makes an append to several shards (tables) atomic.

Waits are bounded (`TIMEOUT_ENV`, or the `timeout=` argument): a SQLite file
locked by another process, or a PostgreSQL server that stays unreachable, ends
in one `ConsensusUnavailable` line naming the file or database, never a silent
hang. PostgreSQL errors that a restart or a dropped connection cause are
retried on a fresh connection; a compare-and-set whose COMMIT outcome was lost
with the connection is resolved by reading its row back, so a retried CAS that
did commit is reported as committed, never applied twice nor reported as lost.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ConsensusUnavailable, InvalidInput, OutOfSpace, ReadOnly, StateCorrupt

#: Seconds a consensus operation may wait: for SQLite, on a file another process
#: holds locked; for PostgreSQL, reconnecting and retrying across a server restart.
TIMEOUT_ENV = "SHARDFLOW_CONSENSUS_TIMEOUT"
SQLITE_TIMEOUT_S = 10.0
POSTGRES_TIMEOUT_S = 30.0
#: libpq `connect_timeout` (seconds) unless the DSN sets one.
POSTGRES_CONNECT_TIMEOUT_S = 5


def _timeout(given: float | None, default: float) -> float:
    if given is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None or raw.strip() == "":
            return default
        try:
            given = float(raw)
        except ValueError:
            raise InvalidInput(f"${TIMEOUT_ENV}: expected seconds (a number), got {raw!r}") from None
    if not given > 0:
        raise InvalidInput(f"consensus timeout: expected seconds > 0, got {given!r}")
    return float(given)


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


class _Outage:
    """How long the next operation may wait, so that a whole outage costs about one timeout.

    Once an operation has given up (the file stayed locked, the server stayed
    down), the ones after it, e.g. a failing job's status and clean-up writes,
    only get what is left of that first wait instead of a full one each. The
    first success ends the outage.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.since: float | None = None

    def budget(self, now: float) -> float:
        return self.timeout if self.since is None else max(0.0, self.since + self.timeout - now)

    def gave_up(self, started: float) -> None:
        if self.since is None:
            self.since = started

    def ok(self) -> None:
        self.since = None


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

    def _read(self, fn: Any) -> Any:
        """Run the read `fn(connection)`; subclasses translate errors and retry."""
        return fn(self._con())

    def head(self, key: str) -> VersionedData | None:
        row = self._read(lambda con: con.execute(_HEAD.format(p=self.P), (key,)).fetchone())
        return None if row is None else VersionedData(int(row[0]), bytes(row[1]))

    def compare_and_set(self, key: str, expected: int | None, new: VersionedData) -> bool:
        return self.compare_and_set_many([CasOp(key, expected, new)])

    def scan(self, key: str, from_seqno: int, limit: int = 1000) -> list[VersionedData]:
        rows = self._read(lambda con: con.execute(_SCAN.format(p=self.P), (key, from_seqno, limit)).fetchall())
        return [VersionedData(int(s), bytes(d)) for s, d in rows]

    def list_keys(self, prefix: str = "") -> list[str]:
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._read(lambda con: con.execute(_KEYS.format(p=self.P), (like,)).fetchall())
        return [r[0] for r in rows]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


class SqliteConsensus(_SqlConsensus):
    """Consensus in one SQLite file; safe across threads and processes (WAL, BEGIN IMMEDIATE).

    `timeout` (seconds; default `$SHARDFLOW_CONSENSUS_TIMEOUT`, else 10) bounds
    every wait for a lock another process holds: past it, `ConsensusUnavailable`
    names the file. A full disk raises `OutOfSpace`, and the transaction is
    rolled back.
    """

    P = "?"

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = None, read_only: bool = False):
        self.path = os.fspath(path)
        self.timeout = _timeout(timeout, SQLITE_TIMEOUT_S)
        self.read_only = read_only
        self._outage = _Outage(self.timeout)
        self._local = threading.local()
        if read_only:
            # Read what is there; create nothing (the directory may be read-only).
            self._read(lambda con: con.execute("SELECT count(*) FROM consensus WHERE false").fetchall())
            return
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self._read(lambda con: con.execute(_CREATE.format(blob="BLOB")))

    def _connect_read_only(self) -> sqlite3.Connection:
        """`mode=ro`; in a read-only directory, where SQLite cannot create the WAL's `-shm`
        file, `immutable=1` (nothing can write there: nothing changes under us)."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path))
        con = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchall()
            return con
        except sqlite3.OperationalError:
            con.close()
        return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None, check_same_thread=False)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            if self.read_only:
                con = self._connect_read_only()
            else:
                con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            try:
                con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
                if not self.read_only:
                    con.execute("PRAGMA journal_mode=WAL")
                    # FULL: a committed CAS survives power loss, not only a process crash.
                    con.execute("PRAGMA synchronous=FULL")
            except BaseException:
                con.close()
                raise
            self._local.con = con
            self._local.pid = os.getpid()
            self._local.busy_ms = int(self.timeout * 1000)
        return con

    def _error(self, e: sqlite3.Error) -> Exception:
        """`e` as one line naming the file, when it is a lock or a full disk; else `e` itself."""
        code = getattr(e, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        msg = str(e)
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in msg or "busy" in msg:
            return ConsensusUnavailable(
                f"sqlite consensus {self.path}: database is locked by another process; "
                f"waited {self.timeout:g}s (set ${TIMEOUT_ENV} to wait longer)"
            )
        if primary == sqlite3.SQLITE_FULL or "disk is full" in msg:
            return OutOfSpace(f"sqlite consensus {self.path}: database or disk is full")
        if primary in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT) or "not a database" in msg or "malformed" in msg:
            return StateCorrupt(f"sqlite consensus {self.path}: {msg} (not a shardflow consensus file, or damaged)")
        if primary == sqlite3.SQLITE_READONLY or "readonly" in msg:
            return ReadOnly(f"sqlite consensus {self.path}: {msg} (is the data directory read-only?)")
        hint = " (missing, or its directory is not writable)" if primary == sqlite3.SQLITE_CANTOPEN else ""
        # Anything else SQLite says (cannot open, I/O error, no such table): name the file.
        return ConsensusUnavailable(f"sqlite consensus {self.path}: {type(e).__name__}: {msg}{hint}")

    def _read(self, fn: Any) -> Any:
        try:
            return fn(self._con())
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.IntegrityError):
                raise
            raise self._error(e) from None

    def _write(self, fn: Any) -> Any:
        if self.read_only:
            raise ReadOnly(f"sqlite consensus {self.path}: opened read-only (the data directory is not writable)")
        t0 = time.monotonic()
        budget = max(self._outage.budget(t0), 0.05)
        deadline = t0 + budget
        attempt = 0
        while True:
            try:
                con = self._con()
                busy_ms = int(budget * 1000)
                if self._local.busy_ms != busy_ms:
                    con.execute(f"PRAGMA busy_timeout={busy_ms}")
                    self._local.busy_ms = busy_ms
                # Waits up to busy_timeout itself; the loop covers SQLITE_BUSY returned without waiting.
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as e:
                err = self._error(e)
                if isinstance(err, ConsensusUnavailable) and "locked by another process" in str(err):
                    if time.monotonic() < deadline:
                        attempt += 1
                        time.sleep(min(0.001 * 2**attempt, 0.05))
                        continue
                    self._outage.gave_up(t0)
                raise err from None
            self._outage.ok()
            try:
                out = fn(con)
                con.execute("ROLLBACK" if out is False else "COMMIT")
            except BaseException as e:
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.IntegrityError):
                    raise self._error(e) from None
                raise
            return out

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

    Connection errors (a server restart, a dropped connection) are retried on a
    fresh connection with bounded backoff for up to `timeout` seconds (default
    `$SHARDFLOW_CONSENSUS_TIMEOUT`, else 30); then `ConsensusUnavailable` names
    the database. A CAS whose COMMIT outcome is unknown is resolved by reading
    its rows back before it is tried again.
    """

    P = "%s"
    _SELECT_AT = "SELECT data FROM consensus WHERE shard = %s AND sequence_number = %s"
    # Not worth retrying: a wrong database name, password or role.
    _PERMANENT_SQLSTATES = ("3D000", "28000", "28P01", "42501")

    def __init__(self, dsn: str, *, timeout: float | None = None):
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        self._psycopg = psycopg
        self.dsn = dsn
        self.timeout = _timeout(timeout, POSTGRES_TIMEOUT_S)
        self._outage = _Outage(self.timeout)
        try:
            info = conninfo_to_dict(dsn)
        except psycopg.Error as e:
            raise InvalidInput(f"consensus {_redact(dsn)}: not a PostgreSQL URL ({e})") from None
        self._connect_kw: dict[str, Any] = {}
        if "connect_timeout" not in info:
            self._connect_kw["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        host = info.get("host") or info.get("hostaddr") or "localhost"
        port = info.get("port") or "5432"
        self.database = f"postgresql://{host}:{port}/{info.get('dbname') or info.get('user') or ''}"
        self._local = threading.local()

        def create(con: Any) -> None:
            with con.transaction():
                con.execute(_CREATE.format(blob="BYTEA"))

        try:
            self._retrying("connect", create)
        except psycopg.errors.UniqueViolation:
            # Two processes creating the table at once: the other one won, which is fine.
            pass

    def _con(self) -> Any:
        con = getattr(self._local, "con", None)
        if con is None or con.closed or getattr(self._local, "pid", None) != os.getpid():
            con = self._psycopg.connect(self.dsn, autocommit=True, **self._connect_kw)
            self._local.con = con
            self._local.pid = os.getpid()
        return con

    def _drop(self) -> None:
        con = getattr(self._local, "con", None)
        self._local.con = None
        if con is not None:
            try:
                con.close()
            except Exception:  # noqa: BLE001 - it is already broken; closing is best effort
                pass

    def _transient(self, e: BaseException) -> bool:
        if not isinstance(e, self._psycopg.OperationalError):
            return False
        return getattr(e, "sqlstate", None) not in self._PERMANENT_SQLSTATES

    def _unavailable(self, what: str, e: BaseException, waited: float) -> ConsensusUnavailable:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return ConsensusUnavailable(
            f"postgres consensus {self.database}: {what} failed for {waited:.0f}s "
            f"(limit {self.timeout:g}s, ${TIMEOUT_ENV}); last error: {type(e).__name__}: {first}"
        )

    def _retrying(self, what: str, fn: Any) -> Any:
        """`fn(connection)`, retried on a fresh connection while errors are transient."""
        t0 = time.monotonic()
        budget = self._outage.budget(t0)
        delay = 0.05
        while True:
            try:
                out = fn(self._con())
                self._outage.ok()
                return out
            except self._psycopg.Error as e:
                if getattr(e, "sqlstate", None) == "53100":  # disk_full
                    raise OutOfSpace(f"postgres consensus {self.database}: database or disk is full") from None
                if not self._transient(e):
                    if isinstance(e, self._psycopg.OperationalError):
                        raise self._unavailable(what, e, time.monotonic() - t0) from None
                    raise
                self._drop()
                waited = time.monotonic() - t0
                if waited + delay > budget:
                    self._outage.gave_up(t0)
                    raise self._unavailable(what, e, waited) from None
                time.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, 1.0)

    def _read(self, fn: Any) -> Any:
        return self._retrying("read", fn)

    def compare_and_set_many(self, ops: Sequence[CasOp]) -> bool:
        for op in ops:
            _check(op.key, op.expected, op.new)
        errors = self._psycopg.errors
        unknown = False  # did an earlier attempt die without telling us whether it committed?

        class _Lost(Exception):
            pass

        def attempt(con: Any) -> bool:
            nonlocal unknown
            if unknown and self._committed(con, ops):
                return True  # our earlier attempt did commit; do not apply it twice
            try:
                with con.transaction():
                    for op in ops:
                        sql, args = _cas_sql(self.P, op)
                        cur = con.execute(sql, args)
                        if cur.rowcount != 1:
                            raise _Lost
            except (_Lost, errors.UniqueViolation, errors.SerializationFailure):
                # SUBTLE: after an unknown outcome, our earlier COMMIT may still have been in
                # flight on the server when `_committed` looked; the head has moved now, so
                # look again before reporting a lost CAS the caller would write again.
                return unknown and self._committed(con, ops)
            except self._psycopg.Error as e:
                if self._transient(e):
                    unknown = True
                raise
            return True

        return bool(self._retrying("compare_and_set", attempt))

    def _committed(self, con: Any, ops: Sequence[CasOp]) -> bool:
        """True if every op's new version is stored with exactly its data (our commit went through).

        Otherwise the transaction did not commit (it is all or nothing), or its
        rows were already truncated behind newer versions; either way the CAS
        is tried again, which then fails on a moved head, and the caller's
        idempotency token recognises a commit it cannot see here.
        """
        for op in ops:
            row = con.execute(self._SELECT_AT, (op.key, op.new.seqno)).fetchone()
            if row is None or bytes(row[0]) != op.new.data:
                return False
        return True

    def truncate(self, key: str, seqno: int) -> int:
        cur = self._retrying(
            "truncate", lambda con: con.execute(_TRUNCATE.format(p=self.P), (key, seqno, key, seqno))
        )
        return int(cur.rowcount)

    def close(self) -> None:
        self._drop()


def _redact(dsn: str) -> str:
    """`dsn` without its password."""
    import re

    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def open_consensus(
    url: str | None, default_path: str, *, timeout: float | None = None, read_only: bool = False
) -> Consensus:
    """`None` or `sqlite:///path` -> SqliteConsensus; `postgresql://...` -> PostgresConsensus.

    `read_only` (SQLite): open the file read-only and create nothing; a write raises `ReadOnly`.

    `timeout`: seconds an operation may wait (see `TIMEOUT_ENV`); None: the
    environment variable, else the backend's default.
    """
    if url is None:
        return SqliteConsensus(default_path, timeout=timeout, read_only=read_only)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresConsensus(url, timeout=timeout)
    if url.startswith("sqlite://"):
        return SqliteConsensus(url[len("sqlite://") :], timeout=timeout, read_only=read_only)
    raise InvalidInput(f"consensus {url!r}: expected postgresql://... or sqlite:///path")

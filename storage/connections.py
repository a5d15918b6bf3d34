"""The DuckDB connection policy: the one place that says which connection a query runs on.

Three kinds, and nothing in `storage/` calls `duckdb.connect` but this module:

1. `cursor()`: a fresh cursor on ONE process-wide in-memory database, for
   reads that open, run and close (snapshots, counts, validation). A leased
   reader keeps one for its listen polls (`ReadHandle._listen_connection`). Close the cursor when done (`reading()`
   does). Measured (bench/snapshot.py, 8M rows): `duckdb.connect()` +
   `close()` cost ~23 ms per snapshot (a new database each time: ~10% of a
   compacted snapshot), a cursor on a shared database ~0. Each cursor is its
   own DuckDB connection, so concurrent reads from several threads are safe
   and `register`ed tables stay per cursor.
   Settings (global to this database, which runs nothing but these reads):
   - `preserve_insertion_order=false`: a snapshot is a multiset, so DuckDB may
     aggregate and materialise in parallel without keeping input order;
   - `threads = 2 x cores` on machines of <= 2 cores: measured on 2 cores, the
     GROUP BY over 10M (string, int) keys takes 0.85 s with 4 threads vs 1.25 s
     with 2 (DuckDB's default; 3 threads: 0.84 s, 6: 0.87 s); plain reads are
     not slower. Larger machines keep DuckDB's default (not measured).
   SUBTLE: re-created after a fork (a DuckDB instance must not cross fork()).
2. `thread_connection()`: a per-thread in-memory connection, one query per
   call, replaced every `RECYCLE_QUERIES` calls (the `sql` operator of flows and
   `updates.consolidate`, per batch: the hot path of every job). DuckDB's
   defaults: its results keep insertion order.
3. `private(path)`: a database of its own, closed by its owner, where a query
   must be stoppable on its own or state must outlive one query:
   - compaction: one per merge, so `Interrupt.stop()` can `interrupt()` it
     without touching anyone else's query (storage.compact);
   - `storage.query.connect`: the user's connection, holding views and macros;
   - the controller's desired store: a file, so desired is bounded by disk,
     not memory (storage.controller.desired).
   DuckDB's defaults, plus the settings passed.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb

_SHARED_LOCK = threading.Lock()
_SHARED: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (pid, database)


def cursor() -> duckdb.DuckDBPyConnection:
    """A fresh cursor on the process-wide read database (kind 1 above); the caller closes it."""
    global _SHARED
    pid = os.getpid()
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED[0] != pid:
            db = duckdb.connect()
            db.execute("SET preserve_insertion_order = false")
            cores = os.cpu_count() or 1
            if cores <= 2:
                db.execute(f"SET threads = {2 * cores}")
            _SHARED = (pid, db)
        return _SHARED[1].cursor()


@contextmanager
def reading() -> Iterator[duckdb.DuckDBPyConnection]:
    """`cursor()`, closed when the block ends."""
    con = cursor()
    try:
        yield con
    finally:
        con.close()


_local = threading.local()
_threads: dict[int, duckdb.DuckDBPyConnection] = {}
_threads_lock = threading.Lock()


#: Calls of `thread_connection` before it replaces the thread's database (see there).
RECYCLE_QUERIES = 1000


def thread_connection() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory connection (kind 2 above), for ONE query per call; do not close it.

    SUBTLE: a DuckDB database keeps about 0.5-0.7 KB of native memory per query
    that scanned an Arrow table (malloc'd: not Python, not in `duckdb_memory()`),
    freed only when the database closes (DuckDB 2.0.1; no setting turns it off).
    A continuous job consolidates several times a second, so its RSS grew without
    bound. Every `RECYCLE_QUERIES` calls the thread's database is therefore closed
    and a new one opened (~25-50 ms, < 0.05 ms a query); Arrow results already
    fetched do not depend on it. Callers keep nothing of it across calls.
    """
    con = getattr(_local, "con", None)
    n = getattr(_local, "n", 0) + 1
    if con is not None and n > RECYCLE_QUERIES:
        con.close()
        con, n = None, 1
    _local.n = n
    if con is None:
        con = duckdb.connect(":memory:")
        _local.con = con
        with _threads_lock:
            # Keyed by thread id: a reused id replaces (and drops) a dead thread's connection.
            _threads[threading.get_ident()] = con
    return con


def private(path: str | None = None, **settings: str | int | bool) -> duckdb.DuckDBPyConnection:
    """A database of its own (kind 3 above): in memory, or the file `path`; the caller closes it.

    `settings` are applied with `SET name = value` (e.g. `memory_limit="512MB"`).
    """
    con = duckdb.connect(":memory:" if path is None else path)
    for name, value in settings.items():
        v = "'" + value.replace("'", "''") + "'" if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        con.execute(f"SET {name} = {v}")
    return con


@atexit.register
def _close_all() -> None:
    """Close the shared database and every thread's connection before interpreter teardown.

    SUBTLE: daemon threads (the compactor, bytewax workers) may still hold one at
    exit; DuckDB objects alive during teardown make its bindings print pages of
    "leaked instance" warnings after everything else, e.g. after pytest's summary.
    """
    global _SHARED
    with _threads_lock:
        cons = list(_threads.values())
        _threads.clear()
    with _SHARED_LOCK:
        if _SHARED is not None and _SHARED[0] == os.getpid():
            cons.append(_SHARED[1])
        _SHARED = None
    for con in cons:
        try:
            con.close()
        except Exception:  # noqa: BLE001 - closing at exit is best effort
            pass
    _local.__dict__.pop("con", None)

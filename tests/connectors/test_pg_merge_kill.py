"""SIGKILL a continuous job that merges two PostgreSQL CDC sources into one collection.

A PostgreSQL batch spans several transactions, each at its own time (its commit
LSN), and the two sources' frontiers interleave: the sink commits part of a batch
(its updates below the other source's frontier) without the batch's offset. A
kill then makes the next run read the whole batch again. Exactly-once holds
because the source gives the re-read transactions the same times (the LSN) and
`persist_sink` drops, on resume, every update below the upper its offsets were
committed at: exactly the part already in.

Real processes: `shardflow run --mode continuous`, killed with SIGKILL at random
moments while a writer commits transactions to both tables; then a last run
catches up and stops on SIGTERM. The collection must equal the two tables
(nothing lost, nothing doubled), and commits inside a batch must have happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from connectors.postgres import parse_lsn

pytestmark = pytest.mark.postgres

FLOW = str(Path(__file__).resolve().parent / "pg_merge_flow.py")
ROOT = Path(__file__).resolve().parents[2]
SHARDFLOW = [sys.executable, "-m", "flows.cli"]

DDL = """
CREATE TABLE t_a (id int PRIMARY KEY, v int NOT NULL);
CREATE TABLE t_b (id int PRIMARY KEY, v int NOT NULL);
ALTER TABLE t_a REPLICA IDENTITY FULL;
ALTER TABLE t_b REPLICA IDENTITY FULL;
CREATE PUBLICATION merge_pub FOR TABLE t_a, t_b WITH (publish = 'insert, update, delete');
"""


class Writer(threading.Thread):
    """Small transactions on either table (sometimes both): inserts, updates, deletes."""

    def __init__(self, dsn: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.rnd = random.Random(seed)
        self.stop = threading.Event()
        self.next_id = {"t_a": 0, "t_b": 1}  # even ids in t_a, odd in t_b
        self.txns = 0

    def run(self) -> None:
        while not self.stop.is_set():
            tables = self.rnd.choice([["t_a"], ["t_b"], ["t_a", "t_b"]])
            with self.conn.transaction():
                for t in tables:
                    for _ in range(self.rnd.randint(1, 3)):
                        i = self.next_id[t]
                        self.next_id[t] += 2
                        self.conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, self.rnd.randint(0, 9)))
                    if self.next_id[t] > 10 and self.rnd.random() < 0.5:
                        k = self.rnd.randrange(self.next_id[t] % 2, self.next_id[t], 2)
                        self.conn.execute(f"UPDATE {t} SET v = v + 1 WHERE id = %s", (k,))
                    if self.next_id[t] > 10 and self.rnd.random() < 0.2:
                        k = self.rnd.randrange(self.next_id[t] % 2, self.next_id[t], 2)
                        self.conn.execute(f"DELETE FROM {t} WHERE id = %s", (k,))
            self.txns += 1
            time.sleep(self.rnd.uniform(0.0, 0.01))


def _start(data: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SHARDFLOW, "run", FLOW, "--data", str(data), "--mode", "continuous", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def shardflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHARDFLOW, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _upper(data: Path) -> int | None:
    r = shardflow("inspect", "--data", str(data), "--json", "items")
    if r.returncode != 0:
        return None
    up = json.loads(r.stdout)["items"]["upper"]
    return None if up in (None, "", "[]") else int(up)


def _straddling_commits(log: Path) -> int:
    """Commits whose upper lies strictly inside an emitted batch's times (upper in (tmin, tmax])."""
    batches, uppers = [], []
    for line in log.read_text().splitlines():
        kind, *rest = line.split()
        if kind == "B":
            batches.append((int(rest[0]), int(rest[1])))
        elif kind == "C" and rest[0] != "None":
            uppers.append(int(rest[0]))
    return sum(1 for u in uppers if any(lo < u <= hi for lo, hi in batches))


def kill_loop(pg_dsn: str, tmp_path: Path, *, trials: int, seed: int) -> None:
    rnd = random.Random(seed)
    ddl = psycopg.connect(pg_dsn, autocommit=True)
    ddl.execute(DDL)
    data, log = tmp_path / "d", tmp_path / "merge.log"
    env = {**os.environ, "PG_DSN": pg_dsn, "MERGE_LOG": str(log), "RUST_BACKTRACE": "0"}
    writer = Writer(pg_dsn, seed)
    writer.start()
    try:
        for _ in range(trials):
            p = _start(data, env)
            time.sleep(rnd.uniform(1.5, 4.0))
            p.send_signal(signal.SIGKILL)
            p.wait()
    finally:
        writer.stop.set()
        writer.join()
    end = parse_lsn(ddl.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
    p = _start(data, env)
    try:
        deadline = time.monotonic() + 120
        while (_upper(data) or 0) <= end:
            assert time.monotonic() < deadline and p.poll() is None, "the last run did not catch up"
            time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-3000:]
    want = sorted(
        (i, v) for t in ("t_a", "t_b") for i, v in ddl.execute(f"SELECT id, v FROM {t}").fetchall()
    )
    r = shardflow("query", "--data", str(data), "--format", "csv", "SELECT id, v FROM items ORDER BY id, v")
    assert r.returncode == 0, r.stderr
    got = [tuple(int(x) for x in line.split(",")) for line in r.stdout.split()[1:]]
    assert writer.txns > 50
    assert got == want, "the collection differs from the tables (lost or doubled rows)"
    # The case under test did happen: the sink committed inside a batch's times.
    assert _straddling_commits(log) > 0


@pytest.mark.slow  # a guard (no bug on main); test_straddle_commit checks the same deterministically
def test_pg_merge_sigkill_exactly_once(pg_dsn: str, tmp_path: Path) -> None:
    kill_loop(pg_dsn, tmp_path, trials=2, seed=3)


@pytest.mark.slow
def test_pg_merge_sigkill_exactly_once_long(pg_dsn: str, tmp_path: Path) -> None:
    kill_loop(pg_dsn, tmp_path, trials=10, seed=5)

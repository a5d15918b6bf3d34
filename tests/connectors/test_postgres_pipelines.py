"""Several PostgreSQL CDC pipelines, one table: each owns its slot, none loses or doubles a row.

These run the example flow (`examples/postgres_cdc.py`) through `flows.job.run_flow`
and the CLI, each pipeline with its own data dir, and compare each collection
with the table afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import storage
from connectors.errors import PostgresCdcError
from connectors.postgres import format_lsn, parse_lsn
from flows.job import open_controller, run_flow
from storage.updates import duck

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "postgres_cdc.py"


def contents(data: Path, name: str = "orders") -> list[tuple[Any, ...]]:
    """Collection `name` at its latest readable time, one tuple per copy of a row, sorted."""
    client = storage.open(data)
    ctl = open_controller(client, read_only=True)
    try:
        shard = str(ctl.collection(name).shard_id)
        with client.open_leased_reader(shard) as r:
            snap = r.snapshot(client.state(shard).upper.time - 1)
        con = duck().cursor()
        con.register("s", snap)
        assert con.sql("SELECT count(*) FROM s WHERE _diff < 0").fetchall() == [(0,)], "negative counts"
        return con.sql("SELECT * EXCLUDE (_diff, range) FROM s, range(_diff) ORDER BY ALL").fetchall()
    finally:
        getattr(ctl, "close", lambda: None)()
        client.close()


def table(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT * FROM orders ORDER BY id, qty").fetchall()


def slots(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT slot_name, confirmed_flush_lsn::text FROM pg_replication_slots ORDER BY 1").fetchall()


def sql(dsn: str, *stmts: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in stmts:
            c.execute(s)


@pytest.fixture
def orders(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    sql(
        pg_dsn,
        "CREATE TABLE orders (id int PRIMARY KEY, qty int)",
        "ALTER TABLE orders REPLICA IDENTITY FULL",
        "CREATE PUBLICATION orders_pub FOR TABLE orders WITH (publish = 'insert, update, delete')",
    )
    monkeypatch.setenv("PG_DSN", pg_dsn)
    monkeypatch.delenv("PG_SLOT", raising=False)
    return pg_dsn


def test_two_pipelines_on_one_table_each_get_every_row_once(orders: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    sql(orders, "INSERT INTO orders VALUES (1, 1), (2, 2)")
    run_flow(EXAMPLE, a)
    assert contents(a) == table(orders)

    sql(orders, "INSERT INTO orders VALUES (3, 3)")  # row 3: only A's slot has it so far
    run_flow(EXAMPLE, b)  # B's first run: its own slot, A's is left alone
    assert contents(b) == table(orders)
    assert len(slots(orders)) == 2, "one slot per pipeline"

    sql(orders, "UPDATE orders SET qty = 20 WHERE id = 2", "DELETE FROM orders WHERE id = 1")
    run_flow(EXAMPLE, a)
    assert contents(a) == table(orders), "A got row 3 and the later changes, once"

    sql(orders, "INSERT INTO orders VALUES (4, 4)", "UPDATE orders SET qty = qty + 1")
    run_flow(EXAMPLE, b)
    sql(orders, "DELETE FROM orders WHERE id = 3", "INSERT INTO orders VALUES (5, 5)")
    run_flow(EXAMPLE, a)
    run_flow(EXAMPLE, b)
    assert contents(a) == contents(b) == table(orders) == [(2, 21), (4, 5), (5, 5)]

    # A restart finds its own slot again (no new slot, nothing re-read).
    before = slots(orders)
    assert run_flow(EXAMPLE, a).rows == 0
    assert [s for s, _ in slots(orders)] == [s for s, _ in before]
    assert contents(a) == table(orders)


def test_second_pipeline_starting_while_the_first_streams(orders: str, tmp_path: Path) -> None:
    """A runs continuously (CLI process); B's first run in between must not take A's slot (A lost row 3)."""
    a, b = tmp_path / "a", tmp_path / "b"
    sql(orders, "INSERT INTO orders VALUES (1, 1), (2, 2)")
    p = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(EXAMPLE), "--data", str(a), "--mode", "continuous",
         "--tick", "0.2", "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: a.exists() and _safe_contents(a) == table(orders), p)
        sql(orders, "INSERT INTO orders VALUES (3, 3)")
        run_flow(EXAMPLE, b)
        sql(orders, "UPDATE orders SET qty = 20 WHERE id = 2", "DELETE FROM orders WHERE id = 1")
        wait_for(lambda: _safe_contents(a) == table(orders), p)
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    run_flow(EXAMPLE, b)
    assert contents(a) == contents(b) == table(orders) == [(2, 20), (3, 3)]
    assert len(slots(orders)) == 2


def wait_for(cond: Any, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the pipeline exited: {proc.communicate()}"
        assert time.monotonic() < deadline, "the pipeline did not catch up with the table"
        time.sleep(0.2)


def _safe_contents(data: Path) -> list[tuple[Any, ...]] | None:
    try:
        return contents(data)
    except Exception:  # noqa: BLE001 - not created yet, or no readable time yet
        return None


def test_resume_refuses_a_slot_advanced_past_the_committed_offset(orders: str, tmp_path: Path) -> None:
    sql(orders, "INSERT INTO orders VALUES (1, 1)")
    run_flow(EXAMPLE, tmp_path)
    ((slot, committed),) = slots(orders)
    sql(orders, "INSERT INTO orders VALUES (2, 2)")
    with psycopg.connect(orders, autocommit=True) as c:  # someone else consumes the slot
        c.execute("SELECT count(*) FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, "
                  "'proto_version', '1', 'publication_names', 'orders_pub')", (slot,))
    ((_, ahead),) = slots(orders)
    assert parse_lsn(ahead) > parse_lsn(committed)
    with pytest.raises(Exception) as e:
        run_flow(EXAMPLE, tmp_path)
    msg = _root(e.value)
    assert slot in msg and ahead in msg and committed in msg, msg
    assert contents(tmp_path) == [(1, 1)], "nothing half-written"


def test_resume_refuses_a_vanished_slot(orders: str, tmp_path: Path) -> None:
    sql(orders, "INSERT INTO orders VALUES (1, 1)")
    run_flow(EXAMPLE, tmp_path)
    ((slot, committed),) = slots(orders)
    sql(orders, f"SELECT pg_drop_replication_slot('{slot}')", "INSERT INTO orders VALUES (2, 2)")
    with pytest.raises(Exception) as e:
        run_flow(EXAMPLE, tmp_path)
    msg = _root(e.value)
    assert f"replication slot {slot!r} does not exist" in msg and committed in msg, msg
    assert slots(orders) == [], "no silent re-snapshot"
    assert contents(tmp_path) == [(1, 1)]


def test_failed_first_run_leaves_no_slot(orders: str, tmp_path: Path) -> None:
    """A role with REPLICATION but without SELECT on the table: one clear line, and no slot holding WAL."""
    sql(orders, "INSERT INTO orders VALUES (1, 1)", "CREATE ROLE cdc_nosel LOGIN REPLICATION")
    dsn = psycopg.conninfo.make_conninfo(orders, user="cdc_nosel")
    env = {**os.environ, "PG_DSN": dsn}
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(EXAMPLE), "--data", str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode != 0
    assert slots(orders) == [], "no slot holding WAL"
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "SELECT" in lines[0] and "public.orders" in lines[0], p.stderr
    # Granted, the next run works and has the row once.
    sql(orders, "GRANT SELECT ON orders TO cdc_nosel")
    run_flow(EXAMPLE, tmp_path, configure=lambda _ctx: os.environ.__setitem__("PG_DSN", dsn))
    assert contents(tmp_path) == table(orders) == [(1, 1)]
    assert len(slots(orders)) == 1


def test_a_slot_of_another_pipeline_is_never_dropped(orders: str, tmp_path: Path) -> None:
    """An explicit slot that exists while this pipeline has no offset: an error, the slot stays."""
    sql(orders, "INSERT INTO orders VALUES (1, 1)")
    sql(orders, "SELECT pg_create_logical_replication_slot('theirs', 'pgoutput')")
    ((_, lsn),) = slots(orders)
    os.environ["PG_SLOT"] = "theirs"
    try:
        with pytest.raises(Exception) as e:
            run_flow(EXAMPLE, tmp_path)
    finally:
        del os.environ["PG_SLOT"]
    assert "'theirs' already exists" in _root(e.value)
    assert slots(orders) == [("theirs", lsn)]


def _root(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    assert isinstance(e, PostgresCdcError), repr(e)
    return str(e)


_ = format_lsn


@pytest.mark.slow
def test_three_pipelines_random_interleaving(orders: str, tmp_path: Path) -> None:
    """Random DML between randomly chosen pipelines' runs; after each run it equals the table."""
    import random

    rng = random.Random(7)
    dirs = [tmp_path / n for n in "abc"]
    next_id = 1
    for _ in range(25):
        stmts = []
        for _ in range(rng.randint(1, 4)):
            k = rng.random()
            if k < 0.5:
                stmts.append(f"INSERT INTO orders SELECT g, g FROM generate_series({next_id}, {next_id + 2}) g")
                next_id += 3
            elif k < 0.8:
                stmts.append(f"UPDATE orders SET qty = qty + 1 WHERE id % {rng.randint(2, 5)} = 0")
            else:
                stmts.append(f"DELETE FROM orders WHERE id % {rng.randint(3, 7)} = 1")
        sql(orders, *stmts)
        d = rng.choice(dirs)
        run_flow(EXAMPLE, d)
        assert contents(d) == table(orders), d.name
    for d in dirs:
        run_flow(EXAMPLE, d)
        assert contents(d) == table(orders), d.name
    assert len(slots(orders)) == 3

"""The examples/ flows run end to end (batch mode) through flows.job.run_flow."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

import storage
from flows.job import open_controller, run_flow
from storage.updates import duck

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def q(data: Path, name: str, sql: str) -> list[tuple]:
    """Run `sql` over collection `name` (as table `t`, one row per copy) at its latest readable time."""
    client = storage.open(data)
    ctl = open_controller(client)
    try:
        shard = str(ctl.collection(name).shard_id)
        with client.open_leased_reader(shard) as r:
            snap = r.snapshot(client.state(shard).upper.time - 1)
        con = duck().cursor()
        con.register("s", snap)
        con.execute("CREATE OR REPLACE TEMP VIEW t AS SELECT * EXCLUDE (_diff) FROM s, range(_diff)")
        return con.sql(sql).fetchall()
    finally:
        getattr(ctl, "close", lambda: None)()
        client.close()


def test_loadgen_then_chain_then_rerun_adds_nothing(tmp_path: Path) -> None:
    s = run_flow(EXAMPLES / "loadgen_counter.py", tmp_path)
    assert s.rows == 900
    assert q(tmp_path, "counter", "SELECT count(*), max(counter) FROM t") == [(100, 500)]
    assert run_flow(EXAMPLES / "loadgen_counter.py", tmp_path).rows == 0, "resumed after the last tick"
    run_flow(EXAMPLES / "shard_chain.py", tmp_path)
    assert q(tmp_path, "counter_even", "SELECT count(*), min(counter) FROM t") == [(50, 402)]


def test_files_example_routes_the_bad_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERS_GLOB", str(EXAMPLES / "data" / "orders*.csv"))
    run_flow(EXAMPLES / "files_orders.py", tmp_path)
    assert q(tmp_path, "orders", "SELECT count(*), sum(amount) FROM t") == [(4, pytest.approx(122.65))]
    assert q(tmp_path, "orders_errors", "SELECT line, record FROM t") == [(5, "not-a-number,dave,1")]


def test_postgres_example(tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY, qty int); ALTER TABLE orders REPLICA IDENTITY FULL")
        c.execute("CREATE PUBLICATION orders_pub FOR TABLE orders; INSERT INTO orders SELECT g, g FROM generate_series(1, 10) g")
    monkeypatch.setenv("PG_DSN", pg_dsn)
    run_flow(EXAMPLES / "postgres_cdc.py", tmp_path)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("UPDATE orders SET qty = 0 WHERE id <= 5; DELETE FROM orders WHERE id = 10")
    run_flow(EXAMPLES / "postgres_cdc.py", tmp_path)
    assert q(tmp_path, "orders", "SELECT count(*), sum(qty) FROM t") == [(9, 30)]

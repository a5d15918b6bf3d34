"""connectors.postgres: snapshot + pgoutput streaming, resume after a kill, clear setup errors."""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
import psycopg
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main

from connectors.base import reset_stop
from connectors.errors import PostgresCdcError
from connectors.postgres import PostgresSource, parse_lsn
from storage import Progress, UpdateBatch
from storage.errors import InvalidInput
from storage.updates import duck

pytestmark = pytest.mark.postgres

DDL = """
CREATE TABLE orders (id int PRIMARY KEY, name text, amount numeric(10,2), ts timestamptz,
                     flag bool, score float8, day date);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE PUBLICATION orders_pub FOR TABLE orders;
CREATE TABLE other (x int PRIMARY KEY);
ALTER TABLE other REPLICA IDENTITY FULL;
ALTER PUBLICATION orders_pub ADD TABLE other;
"""


class Db:
    """The test's own view of the table: its contents after each committed transaction."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("SET TimeZone = 'UTC'")
        self.states: list[tuple[int, list[tuple[Any, ...]]]] = []

    def txn(self, *stmts: str) -> None:
        with self.conn.transaction():
            for s in stmts:
                self.conn.execute(s)
        self.record()

    def record(self) -> None:
        # Every transaction committed so far ends at or before the current WAL
        # position; the next one ends after it.
        lsn = parse_lsn(self.conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        rows = self.conn.execute("SELECT * FROM orders ORDER BY id").fetchall()
        self.states.append((lsn, rows))


def accumulate(batches: list[pa.Table], as_of: int) -> list[tuple[Any, ...]]:
    """Rows of the collection at `as_of`: updates with time <= as_of, consolidated (each count must be 1)."""
    t = pa.concat_tables(batches)
    con = duck().cursor()
    con.register("u", t)
    cols = ", ".join(f'"{c}"' for c in t.column_names[:-2])
    out = con.sql(
        f"SELECT {cols}, sum(_diff) AS n FROM u WHERE _time <= {as_of} GROUP BY ALL HAVING sum(_diff) <> 0 ORDER BY id"
    ).to_arrow_table().to_pylist()
    assert all(r["n"] == 1 for r in out), f"counts other than 1 at {as_of}: {out}"
    return [tuple(r.values())[:-1] for r in out]


def run_batch(src: PostgresSource) -> list[Any]:
    flow, out = Dataflow("pg"), []
    op.output("out", op.input("in", flow, src), TestingSink(out))
    run_main(flow)
    return out


def drive(src: PostgresSource, steps: int) -> tuple[Any, list[Any]]:
    """Build the partition directly and call next_batch up to `steps` times (a flow that gets killed)."""
    part = src.build_part("pg.in", src.key, None)
    items: list[Any] = []
    for _ in range(steps):
        try:
            items.extend(part.next_batch())
        except StopIteration:
            break
    return part, items


@pytest.fixture
def db(pg_dsn: str) -> Db:
    reset_stop()
    d = Db(pg_dsn)
    d.conn.execute(DDL)
    return d


def check_against_states(db: Db, batches: list[pa.Table], from_lsn: int) -> int:
    checked = 0
    for lsn, rows in db.states:
        if lsn >= from_lsn:
            assert accumulate(batches, lsn) == rows, f"mismatch at LSN {lsn}"
            checked += 1
    return checked


def test_snapshot_then_insert_update_delete(db: Db, pg_dsn: str) -> None:
    db.txn(
        "INSERT INTO orders VALUES (1, 'a', 1.50, '2024-01-02 03:04:05.5+00', true, 0.25, '2024-01-02')",
        "INSERT INTO orders VALUES (2, 'b', NULL, NULL, NULL, NULL, NULL)",
        "INSERT INTO orders VALUES (3, '', 0, '1999-12-31 23:59:59+00', false, -1e300, '1999-12-31')",
    )
    out = run_batch(PostgresSource(pg_dsn, "public.orders", publication="orders_pub", mode="batch", pipeline_id="p1"))
    snap = [x for x in out if isinstance(x, UpdateBatch)]
    assert len(snap) == 1 and snap[0].num_rows == 3
    c = snap[0].offsets["orders/0"]
    assert set(snap[0].table.column("_time").to_pylist()) == {c}
    assert accumulate([snap[0].table], c) == db.states[-1][1]
    assert isinstance(out[-1], Progress) and out[-1].frontier.time > c
    assert snap[0].table.schema.field("amount").type == pa.decimal128(10, 2)

    db.txn("UPDATE orders SET name = 'a2', amount = amount + 1 WHERE id = 1")
    db.txn("DELETE FROM orders WHERE id = 2")
    db.txn("INSERT INTO orders VALUES (4, 'd', 4, now(), true, 4, now())", "INSERT INTO other VALUES (1)")
    db.txn("UPDATE orders SET flag = NOT flag")  # one transaction touching several rows
    db.txn("INSERT INTO other VALUES (2)")  # a transaction of another table only

    out2 = run_batch(PostgresSource(pg_dsn, "public.orders", publication="orders_pub", mode="batch", pipeline_id="p1", resume={"orders/0": c}))
    more = [x for x in out2 if isinstance(x, UpdateBatch)]
    diffs = pa.concat_tables([b.table for b in more]).column("_diff").to_pylist()
    # update(1): -1 +1; delete(2): -1; insert(4): +1; update 3 rows: 3 x (-1 +1)
    assert sorted(diffs) == sorted([-1, 1, -1, 1] + [-1, 1] * 3)
    times = [t for b in more for t in b.table.column("_time").to_pylist()]
    assert min(times) > c
    assert check_against_states(db, [snap[0].table] + [b.table for b in more], c) >= 5


def test_kill_write_more_restart_exactly_once(db: Db, pg_dsn: str) -> None:
    db.txn("INSERT INTO orders (id, name) SELECT g, 'n' || g FROM generate_series(1, 5) g")
    for i in range(6, 16):
        db.txn(f"INSERT INTO orders (id, name) VALUES ({i}, 'n{i}')")
    mk = lambda **kw: PostgresSource(pg_dsn, "orders", publication="orders_pub", max_changes=6, pipeline_id="p1", **kw)  # noqa: E731

    # Run 1: the snapshot and some polls; only the first two batches become durable.
    part, items = drive(mk(), 2)  # the initial progress, then the snapshot
    before = db.states[-1][1]
    db.txn("UPDATE orders SET name = 'changed' WHERE id <= 3")
    for i in range(16, 30):
        db.txn(f"INSERT INTO orders (id, name) VALUES ({i}, 'n{i}')")
    items += [x for _ in range(2) for x in part.next_batch()]
    batches = [x for x in items if isinstance(x, UpdateBatch)]
    assert len(batches) == 3, "snapshot + two polls of at most ~6 changes"
    committed = batches[:2]
    offset = committed[-1].offsets["orders/0"]
    part.close()  # killed: batch 3 was emitted but never made durable

    # Write more while it is down, then restart from the committed offset.
    db.txn("DELETE FROM orders WHERE id % 4 = 0")
    db.txn("UPDATE orders SET id = id + 100 WHERE id = 5")
    src = mk(mode="continuous", resume={"orders/0": offset})
    part2, items2 = drive(src, 50)
    after = [x for x in items2 if isinstance(x, UpdateBatch)]
    assert after and min(min(b.table.column("_time").to_pylist(), default=offset + 1) for b in after) > offset
    tables = [b.table for b in committed + after]
    snapshot_time = committed[0].offsets["orders/0"]
    assert accumulate(tables, snapshot_time) == before
    assert check_against_states(db, tables, snapshot_time) >= 16
    # An ack advances the slot; a later resume from it still sees nothing twice.
    last = after[-1].offsets["orders/0"]
    src.ack({"orders/0": last})
    part2.next_batch()
    slot_lsn = db.conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (src.slot,)).fetchone()[0]
    assert parse_lsn(slot_lsn) == last
    part2.close()
    _, items3 = drive(mk(mode="continuous", resume={"orders/0": last}), 3)
    assert not [x for x in items3 if isinstance(x, UpdateBatch) and x.num_rows]


def test_setup_errors_say_how_to_fix(db: Db, pg_dsn: str) -> None:
    db.conn.execute("CREATE TABLE plain (id int PRIMARY KEY); CREATE TABLE loose (id int); ALTER TABLE loose REPLICA IDENTITY FULL")
    with pytest.raises(PostgresCdcError, match="CREATE PUBLICATION nopub FOR TABLE public.orders"):
        drive(PostgresSource(pg_dsn, "orders", publication="nopub", pipeline_id="p1"), 1)
    with pytest.raises(PostgresCdcError, match=r"REPLICA IDENTITY DEFAULT.*ALTER TABLE public.plain REPLICA IDENTITY FULL"):
        drive(PostgresSource(pg_dsn, "plain", publication="orders_pub", pipeline_id="p1"), 1)
    with pytest.raises(PostgresCdcError, match="ALTER PUBLICATION orders_pub ADD TABLE public.loose"):
        drive(PostgresSource(pg_dsn, "loose", publication="orders_pub", pipeline_id="p1"), 1)
    with pytest.raises(PostgresCdcError, match="does not exist"):
        drive(PostgresSource(pg_dsn, "nope", publication="orders_pub", pipeline_id="p1"), 1)
    with pytest.raises(PostgresCdcError, match=r"replication slot 'shardflow_orders_[0-9a-f]{12}' does not exist.*drop the collection"):
        drive(PostgresSource(pg_dsn, "orders", publication="orders_pub", pipeline_id="p1", resume={"orders/0": 12345}), 1)


def test_wal_level_error() -> None:
    class FakeConn:
        def execute(self, q: str, *a: Any) -> Any:
            class R:
                def fetchone(self) -> tuple[str]:
                    return ("replica",)

            return R()

    src = PostgresSource("postgresql://unused", "orders", publication="p")
    with pytest.raises(PostgresCdcError, match="wal_level is 'replica'.*ALTER SYSTEM SET wal_level = logical"):
        src.check_setup(FakeConn())  # type: ignore[arg-type]


def slot_rows(db: Db) -> list[tuple[str, str]]:
    return db.conn.execute("SELECT slot_name, confirmed_flush_lsn::text FROM pg_replication_slots ORDER BY 1").fetchall()


def test_a_source_needs_a_pipeline_id_or_a_slot(db: Db, pg_dsn: str) -> None:
    with pytest.raises(InvalidInput, match="give pipeline_id= .* or slot="):
        drive(PostgresSource(pg_dsn, "orders", publication="orders_pub"), 1)
    a = PostgresSource(pg_dsn, "orders", publication="orders_pub", pipeline_id="sa")
    b = PostgresSource(pg_dsn, "orders", publication="orders_pub", pipeline_id="sb")
    assert a.slot != b.slot and a.slot.startswith("shardflow_orders_") and len(a.slot) <= 63
    assert a.slot == PostgresSource(pg_dsn, "orders", publication="orders_pub", pipeline_id="sa").slot


def test_slot_consumed_while_streaming_stops_the_source(db: Db, pg_dsn: str) -> None:
    """Another consumer advances the slot between two polls: the next poll raises, naming both LSNs."""
    db.txn("INSERT INTO orders (id) VALUES (1)")
    src = PostgresSource(pg_dsn, "orders", publication="orders_pub", slot="cdc_a")
    part, items = drive(src, 3)
    ours = slot_rows(db)[0][1]
    db.txn("INSERT INTO orders (id) VALUES (2)")
    db.conn.execute(
        "SELECT count(*) FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
        "'publication_names', 'orders_pub')", (src.slot,),
    )
    theirs = slot_rows(db)[0][1]
    with pytest.raises(PostgresCdcError, match=rf"{src.slot}.*{theirs}.*{ours}"):
        part.next_batch()
    part.close()
    db.conn.execute("SELECT pg_drop_replication_slot(%s)", (src.slot,))
    part, items = drive(src, 3)
    with pytest.raises(PostgresCdcError, match=rf"{src.slot}' does not exist"):
        db.conn.execute("SELECT pg_drop_replication_slot(%s)", (src.slot,))
        part.next_batch()
    part.close()


def test_snapshot_that_fails_drops_the_slot_it_created(db: Db, pg_dsn: str) -> None:
    db.txn("INSERT INTO orders (id, amount) VALUES (1, 'NaN')")  # numeric NaN has no decimal128 form
    src = PostgresSource(pg_dsn, "orders", publication="orders_pub", slot="cdc_nan")
    with pytest.raises(PostgresCdcError, match="table public.orders column 'amount'.*'NaN'"):
        drive(src, 2)
    assert slot_rows(db) == []


def test_leftover_slot_of_own_first_run_is_replaced(db: Db, pg_dsn: str) -> None:
    """A first run that died before its first commit: the next first run drops its own slot and starts over."""
    db.txn("INSERT INTO orders (id) SELECT g FROM generate_series(1, 3) g")
    src = PostgresSource(pg_dsn, "orders", publication="orders_pub", pipeline_id="p1")
    part, _ = drive(src, 2)
    part.close()  # killed: the snapshot was never committed
    db.txn("INSERT INTO orders (id) VALUES (4)")
    part, items = drive(src, 2)
    part.close()
    batches = [x for x in items if isinstance(x, UpdateBatch)]
    assert accumulate([b.table for b in batches], batches[-1].offsets["orders/0"]) == db.states[-1][1]
    assert [s for s, _ in slot_rows(db)] == [src.slot]


def test_vanished_slot_hints_at_the_old_slot_name(db: Db, pg_dsn: str) -> None:
    """An upgraded data dir: its offsets point into the old shared slot `shardflow_<table>`."""
    db.conn.execute("SELECT pg_create_logical_replication_slot('shardflow_orders', 'pgoutput')")
    src = PostgresSource(pg_dsn, "orders", publication="orders_pub", pipeline_id="p1", resume={"orders/0": 12345})
    with pytest.raises(PostgresCdcError, match="old naming exists.*slot='shardflow_orders'"):
        src.check()
    assert [s for s, _ in slot_rows(db)] == ["shardflow_orders"]


def test_first_run_of_another_source_never_takes_a_streaming_sources_slot(db: Db, pg_dsn: str) -> None:
    """Two sources configured with one slot: the second's first run refuses; the first misses nothing."""
    db.txn("INSERT INTO orders (id) VALUES (1), (2)")
    a = PostgresSource(pg_dsn, "orders", publication="orders_pub", slot="shared")
    part, items = drive(a, 3)
    db.txn("INSERT INTO orders (id) VALUES (3)")
    with pytest.raises(PostgresCdcError, match="'shared' already exists.*will not drop it"):
        drive(PostgresSource(pg_dsn, "orders", publication="orders_pub", slot="shared"), 2)
    items += part.next_batch()
    part.close()
    batches = [x.table for x in items if isinstance(x, UpdateBatch)]
    assert accumulate(batches, db.states[-1][0]) == db.states[-1][1]

"""storage.query: views of snapshots, counts, negative accumulations, changes()."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

import storage

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


def upd(rows: list[tuple[str, int, int, int]]) -> pa.Table:
    k, v, t, d = zip(*rows, strict=True) if rows else ([], [], [], [])
    return pa.table({"k": pa.array(k, pa.string()), "v": pa.array(v, pa.int64()),
                     "_time": pa.array(t, pa.int64()), "_diff": pa.array(d, pa.int64())})


@pytest.fixture
def shard(tmp_path):
    client = storage.open(tmp_path)
    s = storage.ShardId.new()
    w = client.open_writer(s, schema=SCHEMA)
    w.compare_and_append(upd([("a", 1, 0, 3), ("b", 2, 5, 1), ("b", 2, 6, -1), ("c", 3, 7, 2)]), 0, 10)
    return client, s, w


def rows(con, q):
    return con.sql(q).fetchall()


def test_view_repeats_rows_by_count_at_latest(shard):
    client, s, _ = shard
    with storage.query.connect(client, {"orders": s}) as con:
        assert con.as_of == {"orders": 9}
        assert rows(con, "SELECT k, v FROM orders ORDER BY ALL") == [("a", 1)] * 3 + [("c", 3)] * 2


@pytest.mark.parametrize(
    ("as_of", "expected"),
    [(0, [("a", 1)] * 3), (5, [("a", 1)] * 3 + [("b", 2)]), (6, [("a", 1)] * 3), (9, [("a", 1)] * 3 + [("c", 3)] * 2)],
)
def test_view_at_explicit_as_of(shard, as_of, expected):
    client, s, _ = shard
    with storage.query.connect(client, {"orders": s}, as_of=as_of) as con:
        assert rows(con, "SELECT k, v FROM orders ORDER BY ALL") == expected


def test_negative_accumulation_is_an_error_naming_the_row(shard):
    client, s, w = shard
    w.compare_and_append(upd([("z", 9, 10, -2)]), 10, 11)
    # Raised when the connection opens, before any query: no filter can skip it.
    with pytest.raises(storage.NegativeCount, match=r"collection orders: row \{'k': 'z', 'v': 9\} has negative count -2 at time 10"):
        storage.query.connect(client, {"orders": s})
    # Before the bad retraction the collection is fine.
    with storage.query.connect(client, {"orders": s}, as_of=9) as con:
        assert rows(con, "SELECT count(*) FROM orders") == [(5,)]
    assert client.inspect(s)["leased_readers"] == {}  # the failed connect released its readers


def test_changes_returns_raw_updates_half_open(shard):
    client, s, _ = shard
    with storage.query.connect(client, {"orders": s}) as con:
        got = rows(con, "SELECT k, _time, _diff FROM changes('orders', 0, 6) ORDER BY _time")
        assert got == [("b", 5, 1), ("b", 6, -1)]
        # from defaults to -1 (time 0 included), to to the query's as_of.
        assert rows(con, "SELECT count(*) FROM changes('orders', -1, 9)") == [(4,)]
        assert rows(con, "SELECT count(*) FROM changes('orders')") == [(4,)]
        assert rows(con, "SELECT count(*) FROM changes('orders', 0)") == [(3,)]  # (0, 9]: time 0 left out


def test_snapshot_plus_changes_equals_later_snapshot(shard):
    client, s, _ = shard
    with storage.query.connect(client, {"orders": s}, as_of=4) as con:
        before = rows(con, "SELECT k, v, 1 AS d FROM orders")
    with storage.query.connect(client, {"orders": s}, as_of=9) as con:
        delta = rows(con, "SELECT k, v, _diff FROM changes('orders', 4, 9)")
        direct = rows(con, "SELECT k, v, count(*) FROM orders GROUP BY k, v ORDER BY ALL")
    acc: dict[tuple[str, int], int] = {}
    for k, v, d in before + delta:
        acc[(k, v)] = acc.get((k, v), 0) + d
    assert sorted((k, v, n) for (k, v), n in acc.items() if n) == direct


@pytest.mark.parametrize("name", ["Orders", "1x", "a-b", "a.b.c", "", "drop table x;--", "sys."])
def test_bad_names_are_refused(shard, name):
    client, s, _ = shard
    with pytest.raises(storage.InvalidInput, match="is not valid"):
        storage.query.connect(client, {name: s})


def test_schema_qualified_name_and_quoting(shard):
    client, s, _ = shard
    with storage.query.connect(client, {"sys.frontiers_like": s, "select": s}) as con:
        assert rows(con, "SELECT count(*) FROM sys.frontiers_like") == [(5,)]
        assert rows(con, 'SELECT count(*) FROM "select"') == [(5,)]


def test_empty_shard_gives_empty_view(tmp_path):
    client = storage.open(tmp_path)
    s = storage.ShardId.new()
    client.open_writer(s, schema=SCHEMA)
    with storage.query.connect(client, {"e": s}) as con:
        assert con.as_of == {"e": None}
        assert rows(con, "SELECT * FROM e") == []


def test_as_of_before_since_and_past_upper(shard):
    client, s, _ = shard
    r = client.open_leased_reader(s)
    r.downgrade_since(5)
    r2 = client.open_leased_reader(s)  # registered at since 5
    r.expire()
    with pytest.raises(storage.ReadBeforeSince, match="as_of 2 is before since 5"):
        storage.query.connect(client, {"o": s}, as_of=2)
    with pytest.raises(storage.NotYetReadable):
        storage.query.connect(client, {"o": s}, as_of=10, timeout=0.05)
    r2.expire()


def test_connection_holds_a_reader_until_closed(shard):
    client, s, _ = shard
    con = storage.query.connect(client, {"orders": s})
    assert len(client.inspect(s)["leased_readers"]) == 1
    con.close()
    assert client.inspect(s)["leased_readers"] == {}


def test_changes_below_since_is_an_error_not_a_wrong_answer(tmp_path):
    client = storage.open(tmp_path)
    s = storage.ShardId.new()
    w = client.open_writer(s, schema=SCHEMA, compact=False)
    w.compare_and_append(upd([("a", t, t, 1) for t in range(10)]), 0, 10)
    r = client.open_leased_reader(s)
    r.downgrade_since(8)
    client.compact(s, full=True)  # times 0..7 may advance to 8
    with storage.query.connect(client, {"x": s}) as con:
        with pytest.raises(duckdb.Error, match="from is before since 8"):
            rows(con, "SELECT * FROM changes('x', 0, 3)")
        with pytest.raises(duckdb.Error, match="from is before since 8"):
            rows(con, "SELECT * FROM changes('x', 7, 9)")
        assert rows(con, "SELECT k, v, _time FROM changes('x', 8, 9)") == [("a", 9, 9)]
    r.expire()


def test_nothing_readable_when_since_reaches_upper_waits_then_says_why(tmp_path):
    client = storage.open(tmp_path)
    s = storage.ShardId.new()
    w = client.open_writer(s, schema=SCHEMA)
    w.compare_and_append(upd([("a", 1, 1, 1)]), 0, 5)
    r = client.open_leased_reader(s)
    r.downgrade_since(5)
    with pytest.raises(storage.NotYetReadable, match=r"no time is readable yet in collection x: min\(upper\) - 1 = 4 "
                       r"is before max\(since\) = 5 after waiting 0.1s: x \(since 5, upper 5\)"):
        storage.query.connect(client, {"x": s}, timeout=0.1)
    r.expire()

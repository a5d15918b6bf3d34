"""One rule for every read: one as_of per query, negative counts checked before any filter,
changes() bounded by the query's as_of (issue "Nothing lost, nothing doubled, nothing poisoned",
items 13-15)."""

from __future__ import annotations

import threading
import time

import duckdb
import pyarrow as pa
import pytest

import storage
from storage.controller import CollectionDesc, StorageController

K = pa.schema([("k", pa.int64())])


def upd(ks: list[int], t: int | list[int], d: int | list[int] = 1) -> pa.Table:
    n = len(ks)
    ts = t if isinstance(t, list) else [t] * n
    ds = d if isinstance(d, list) else [d] * n
    return pa.table({"k": pa.array(ks, pa.int64()), "_time": pa.array(ts, pa.int64()),
                     "_diff": pa.array(ds, pa.int64())})


def rows(con, q):  # noqa: ANN001, ANN201
    return con.sql(q).fetchall()


@pytest.fixture
def xy(client):  # noqa: ANN001, ANN201
    """x and y both hold {1} at [0, 10); then x alone changes at t=10 (1 -> 2), so x's upper is 20."""
    x, y = storage.ShardId.new(), storage.ShardId.new()
    wx = client.open_writer(x, schema=K)
    wy = client.open_writer(y, schema=K)
    wx.compare_and_append(upd([1], 0), 0, 10)
    wy.compare_and_append(upd([1], 0), 0, 10)
    wx.compare_and_append(upd([1, 2], 10, [-1, 1]), 10, 20)
    return client, x, y, wx, wy


# ---------------------------------------------------------------- 13: one as_of per query


def test_a_join_reads_every_collection_at_one_time(xy):  # noqa: ANN001
    client, x, y, _, _ = xy
    with storage.query.connect(client, {"x": x, "y": y}) as con:
        assert con.as_of == {"x": 9, "y": 9}
        assert rows(con, "SELECT * FROM x FULL JOIN y USING (k) ORDER BY ALL") == [(1,)]
    with storage.query.connect(client, {"x": x}) as con:  # alone, x is read at its latest time
        assert con.as_of == {"x": 19} and rows(con, "SELECT k FROM x") == [(2,)]


def test_no_common_time_waits_then_names_each_collection(xy):  # noqa: ANN001
    client, x, y, _, wy = xy
    r = client.open_leased_reader(x)
    r.downgrade_since(15)
    held = client.open_leased_reader(x)  # registered at since 15
    r.expire()
    t0 = time.monotonic()
    with pytest.raises(storage.NotYetReadable, match=r"in every collection of the query: min\(upper\) - 1 = 9 is before "
                       r"max\(since\) = 15 after waiting 0.3s: x \(since 15, upper 20\), y \(since 0, upper 10\)"):
        storage.query.connect(client, {"x": x, "y": y}, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    # While it waits, y's upper moves past x's since: it reads there, both at one time.
    timer = threading.Timer(0.2, lambda: wy.compare_and_append(upd([], 10), 10, 17))
    timer.start()
    with storage.query.connect(client, {"x": x, "y": y}, timeout=10) as con:
        assert con.as_of == {"x": 16, "y": 16}
        assert rows(con, "SELECT * FROM x FULL JOIN y USING (k) ORDER BY ALL") == [(1,), (2,)]
    timer.join()
    held.expire()


def test_explicit_as_of_waits_for_every_upper(xy):  # noqa: ANN001
    client, x, y, _, wy = xy
    with pytest.raises(storage.NotYetReadable, match="collection y: .*as_of 15 is not readable yet"):
        storage.query.connect(client, {"x": x, "y": y}, as_of=15, timeout=0.1)
    wy.compare_and_append(upd([], 10), 10, 16)
    with storage.query.connect(client, {"x": x, "y": y}, as_of=15) as con:
        assert con.as_of == {"x": 15, "y": 15}


def test_table_writes_in_one_transaction_are_seen_together(tmp_path):  # noqa: ANN001
    """A writer appends the same row to x and y with append_table; every default query agrees."""
    client = storage.open(tmp_path / "d", fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc("x", K, data_source="table"), CollectionDesc("y", K, data_source="table")])
    shards = {n: m.shard_id for n, m in ctl.collections().items() if n in ("x", "y")}
    stop = threading.Event()

    def write() -> None:
        t = max(client.state(s).upper.time or 0 for s in shards.values())
        while not stop.is_set():
            row = pa.table({"k": pa.array([t], pa.int64())})
            ctl.append_table(t, t + 1, {"x": row, "y": row})
            t += 1
            time.sleep(0.002)

    w = threading.Thread(target=write)
    w.start()
    try:
        differ = 0
        for _ in range(15):
            with storage.query.connect(client, shards) as con:
                (mx, my), = rows(con, "SELECT (SELECT max(k) FROM x), (SELECT max(k) FROM y)")
                differ += mx != my
        assert differ == 0
    finally:
        stop.set()
        w.join()
        ctl.close()
        client.close()


# ---------------------------------------------------------------- 14: negative counts, every read path


@pytest.fixture
def poisoned(client):  # noqa: ANN001, ANN201
    """x holds {1, 2, 3} at [0, 10), then a retraction of 99, never inserted, at t=10."""
    x = storage.ShardId.new()
    w = client.open_writer(x, schema=K)
    w.compare_and_append(upd([1, 2, 3], 0), 0, 10)
    w.compare_and_append(upd([99], 10, -1), 10, 20)
    return client, x


@pytest.mark.parametrize("q", [
    "SELECT * FROM x",
    "SELECT count(*) FROM x",
    "SELECT count(*) FROM x WHERE k = 2",
    "SELECT count(*) FROM x WHERE k < 50",
    "SELECT k FROM x LIMIT 1",
    "SELECT 1",
])
def test_a_filtered_query_does_not_skip_a_negative_count(poisoned, q):  # noqa: ANN001
    client, x = poisoned
    bad = r"collection x: row \{'k': 99\} has negative count -1 at time 19"
    with pytest.raises(storage.NegativeCount, match=bad), storage.query.connect(client, {"x": x}) as con:
        rows(con, q)


def test_snapshot_and_snapshot_reader_refuse_a_negative_count(poisoned):  # noqa: ANN001
    client, x = poisoned
    with client.open_leased_reader(x) as r:
        assert sorted(r.snapshot(9).column("k").to_pylist()) == [1, 2, 3]
        with pytest.raises(storage.NegativeCount, match=r"row \{'k': 99\} has negative count -1 at time 19"):
            r.snapshot(19)
        with pytest.raises(storage.NegativeCount, match="negative count -1"):
            r.snapshot_reader(19)
        with pytest.raises(storage.NegativeCount, match="negative count -1"):
            list(r.subscribe(19, timeout=0))


def test_validate_checks_every_readable_time(client):  # noqa: ANN001
    """A retraction at 3 whose insertion comes at 5: negative at 3 and 4 only."""
    x = storage.ShardId.new()
    w = client.open_writer(x, schema=K)
    w.compare_and_append(upd([1, 7, 7], [0, 3, 5], [1, -1, 1]), 0, 10)
    with client.open_leased_reader(x) as r:
        r.validate(2)
        r.validate(6)
        with pytest.raises(storage.NegativeCount, match=r"row \{'k': 7\} has negative count -1 at time 4"):
            r.validate(4)
        with pytest.raises(storage.NegativeCount, match=r"shard .*: row \{'k': 7\} has negative count -1 at time 3"):
            r.validate()


def test_validate_passes_a_valid_collection_with_retractions(client):  # noqa: ANN001
    x = storage.ShardId.new()
    w = client.open_writer(x, schema=K)
    w.compare_and_append(upd([1, 1, 2, None], [0, 3, 4, 4], [2, -1, 1, 1]), 0, 10)  # type: ignore[list-item]
    w.compare_and_append(upd([None, 1], [12, 12], [-1, -1]), 10, 20)  # type: ignore[list-item]
    with client.open_leased_reader(x) as r:
        r.validate()
        assert sorted(r.snapshot(19).to_pylist(), key=str) == [{"k": 2, "_diff": 1}]
    with storage.query.connect(client, {"x": x}) as con:
        assert rows(con, "SELECT k FROM x") == [(2,)]


@pytest.mark.parametrize(("diffs", "expected"), [([1, 1, 1], [1, 1, 2]), ([1, 3, 1], [1, 1, 1, 1, 2])])
def test_views_without_retractions_skip_consolidation_and_stay_exact(client, diffs, expected):  # noqa: ANN001
    """All diffs +1 (a plain scan) or all positive (unnest, no GROUP BY): same multiset, as_of respected."""
    x = storage.ShardId.new()
    w = client.open_writer(x, schema=K)
    w.compare_and_append(upd([1, 1, 2], [0, 1, 2], diffs), 0, 5)
    w.compare_and_append(upd([5], 6), 5, 10)
    with storage.query.connect(client, {"x": x}, as_of=4) as con:
        assert [k for (k,) in rows(con, "SELECT k FROM x ORDER BY k")] == expected
        assert rows(con, "SELECT count(*) FROM x WHERE k = 1") == [(len(expected) - 1,)]


# ---------------------------------------------------------------- 15: changes() within the query's as_of


def test_changes_past_the_as_of_is_refused(xy):  # noqa: ANN001
    client, x, y, _, _ = xy
    with storage.query.connect(client, {"x": x}, as_of=5) as con:
        with pytest.raises(duckdb.Error, match=r"changes\(x, 0, 19\): to is past the query's as_of 5"):
            rows(con, "SELECT * FROM changes('x', 0, 19)")
        with pytest.raises(duckdb.Error, match="past the query's as_of 5"):
            rows(con, "SELECT count(*) FROM changes('x', 0, 19) WHERE k = 12345")
        assert rows(con, "SELECT k, _time, _diff FROM changes('x')") == [(1, 0, 1)]
    with storage.query.connect(client, {"y": y}) as con:  # y's upper is 10: 1000 is not known yet
        with pytest.raises(duckdb.Error, match=r"changes\(y, 0, 1000\): to is past the query's as_of 9"):
            rows(con, "SELECT * FROM changes('y', 0, 1000)")
        assert rows(con, "SELECT count(*) FROM changes('y', -1, 9)") == [(1,)]


def test_changes_of_an_empty_collection_past_its_upper_is_refused(client):  # noqa: ANN001
    e = storage.ShardId.new()
    client.open_writer(e, schema=K).compare_and_append(upd([], 0), 0, 3)
    with storage.query.connect(client, {"e": e}) as con:
        with pytest.raises(duckdb.Error, match="past the query's as_of 2"):
            rows(con, "SELECT * FROM changes('e', -1, 1000)")
        assert rows(con, "SELECT * FROM changes('e')") == []


def test_a_retraction_of_a_row_from_an_earlier_part_is_valid_nulls_too(client):  # noqa: ANN001
    """Inserted (NULL included) in a part with no retraction, retracted in a later part: counts 0, no error."""
    x = storage.ShardId.new()
    w = client.open_writer(x, schema=K)
    w.compare_and_append(upd([1, None, 3], 0), 0, 10)  # type: ignore[list-item]
    w.compare_and_append(upd([1, None], 10, -1), 10, 20)  # type: ignore[list-item]
    with storage.query.connect(client, {"x": x}) as con:
        assert rows(con, "SELECT k FROM x") == [(3,)]
    w.compare_and_append(upd([None], 20, -1), 20, 30)  # type: ignore[list-item]
    with pytest.raises(storage.NegativeCount, match=r"row \{'k': None\} has negative count -1 at time 29"):
        storage.query.connect(client, {"x": x})

"""append_table: all tables in one consensus transaction, under a concurrent writer."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest
from ctl_helpers import KV, contents

from storage.controller import CollectionDesc
from storage.errors import (
    IdentifierMissing,
    InvalidUppers,
    ReadOnly,
    UpdateBeyondUpper,
    UpperMismatch,
)
from storage.frontier import Frontier


def rows(*kv):
    return pa.table({"k": [k for k, _ in kv], "v": [v for _, v in kv]}, schema=KV)


@pytest.fixture
def tables(ctl):
    ctl.create_collections([CollectionDesc("t1", KV, data_source="table"), CollectionDesc("t2", KV, data_source="table")])
    return ctl.collection("t1").shard_id, ctl.collection("t2").shard_id


def test_append_table_commits_all(client, ctl, tables):
    s1, s2 = tables
    ctl.append_table(5, 10, {"t1": rows(("a", 1)), "t2": rows(("b", 2), ("c", 3))})
    assert client.state(s1).upper == client.state(s2).upper == Frontier(10)
    assert contents(client, s1, 5) == [("a", 1, 1)]
    assert contents(client, s2, 4) == []
    assert contents(client, s2, 5) == [("b", 2, 1), ("c", 3, 1)]
    ctl.append_table(10, 11, {"t1": rows(("a", 1)).append_column("_diff", pa.array([-1], pa.int64())), "t2": rows()})
    assert contents(client, s1, 10) == []
    assert ctl.frontiers("t2")[1] == Frontier(11)


def test_stale_write_ts_writes_nothing(client, ctl, tables):
    s1, s2 = tables
    ctl.append_table(0, 10, {"t1": rows(("a", 1))})
    seq = client.state(s2).seqno
    with pytest.raises(InvalidUppers, match="'t1' \\(upper 10\\).*nothing was written"):
        ctl.append_table(5, 20, {"t1": rows(("x", 1)), "t2": rows(("y", 1))})
    assert client.state(s2).seqno == seq and client.state(s2).upper == Frontier(0)


def test_update_beyond_upper(client, ctl, tables):
    s1, _ = tables
    with pytest.raises(UpdateBeyondUpper, match="t1"):
        ctl.append_table(10, 10, {"t1": rows(("a", 1))})
    timed = rows(("a", 1)).append_column("_time", pa.array([12], pa.int64()))
    with pytest.raises(UpdateBeyondUpper, match="time 12 is at or past advance_to 12"):
        ctl.append_table(10, 12, {"t1": timed})
    with pytest.raises(IdentifierMissing):
        ctl.append_table(10, 12, {"nope": rows()})
    assert client.state(s1).upper == Frontier(0)


def test_read_only_refuses(client, clock, ctl, tables):
    from storage.controller import StorageController

    ro = StorageController.open(client, clock=clock, tick_interval_ms=None, read_only=True)
    try:
        with pytest.raises(ReadOnly):
            ro.append_table(0, 1, {"t1": rows()})
    finally:
        ro.close()


def test_atomic_under_concurrent_writer(client, ctl, tables):
    """A foreign writer races on t2. Each append_table lands in both tables or in neither."""
    s1, s2 = tables
    stop = threading.Event()
    foreign = client.open_writer(s2)

    def race():
        while not stop.is_set():
            up = foreign.upper
            try:
                foreign.compare_and_append(pa.table({"k": ["f"], "v": [up.time], "_time": [up.time], "_diff": [1]}),
                                           up, up.time + 1)
            except UpperMismatch:
                pass

    t = threading.Thread(target=race)
    t.start()
    ok, stale = [], []
    try:
        ts = 0
        for i in range(40):
            ts = max(ts, client.state(s2).upper.time or 0, client.state(s1).upper.time or 0)
            try:
                ctl.append_table(ts, ts + 1, {"t1": rows(("w", i)), "t2": rows(("w", i))})
                ok.append(i)
            except InvalidUppers:
                stale.append(i)
            ts += 1
    finally:
        stop.set()
        t.join()
    assert ok, "no append_table won a race"
    end = min(client.state(s1).upper.time, client.state(s2).upper.time) - 1
    w1 = {r[1] for r in contents(client, s1, end) if r[0] == "w"}
    w2 = {r[1] for r in contents(client, s2, end) if r[0] == "w"}
    assert w1 == set(ok) and w2 == set(ok)

"""Holds that bind every process on one data directory (issue: "holds that bind every process").

Each scenario was measured failing before holds lived in the shard state:
- one controller's hold did not bind another (`fence=False`) controller;
- a read-only controller's hold did not bind the writer;
- a dropped shard was finalized under another process's hold;
- a dependent's hold on its input lived only in its controller's memory, so
  the input's since moved on between runs;
- a crashed process's hold must not pin history for ever (its lease ends).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest
from ctl_helpers import KV, Clock, contents

import storage
from storage.controller import CollectionDesc, StorageController, ValidFrom, step_back
from storage.errors import ReadBeforeSince
from storage.frontier import Frontier

ROWS = pa.schema([*KV, ("_time", pa.int64()), ("_diff", pa.int64())])


def write(client: storage.Client, shard: str, k: str, t: int, upper: int) -> None:
    w = client.open_writer(shard)
    w.compare_and_append(pa.table({"k": [k], "v": [t], "_time": [t], "_diff": [1]}, schema=ROWS), w.upper, upper)


def open_ctl(client: storage.Client, clock: Clock, **kw) -> StorageController:
    return StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False, **kw)


def test_a_hold_binds_another_writable_controller(client, clock):
    a = open_ctl(client, clock, role="a")
    b = open_ctl(client, clock, role="b", fence=False)
    try:
        a.create_collections([CollectionDesc("x", KV, read_policy=step_back())])
        shard = a.collection("x").shard_id
        write(client, shard, "k1", 5, 9000)
        a.tick()
        (h,) = a.acquire_read_holds(["x"])
        assert h.time == Frontier(8999)
        write(client, shard, "k2", 20_000, 39_000)
        b.tick()  # b applies the policy: the policy handle moves to 38999 ...
        assert b.implied_capability("x") == Frontier(38_999)
        # ... but a's hold is a handle in the shard too: since stays at it.
        assert client.state(shard).since == Frontier(8999)
        assert b.frontiers("x")[0] == Frontier(8999)
        assert contents(client, shard, as_of=8999) == [("k1", 5, 1)]
        h.release()
        assert client.state(shard).since == Frontier(38_999)
    finally:
        a.close()
        b.close()


def test_a_read_only_hold_binds_the_writer(client, clock):
    w = open_ctl(client, clock)
    try:
        w.create_collections([CollectionDesc("x", KV, read_policy=step_back())])
        shard = w.collection("x").shard_id
        write(client, shard, "k1", 5, 10_000)
        w.tick()
        ro = open_ctl(client, clock, read_only=True, role="dashboard")
        try:
            (h,) = ro.acquire_read_holds(["x"])
            assert h.time == Frontier(9999)
            write(client, shard, "k2", 20_000, 46_000)
            w.tick()
            assert client.state(shard).since == Frontier(9999)
            assert contents(client, shard, as_of=h.time.time) == [("k1", 5, 1)]
        finally:
            ro.close()  # its holds end with it
        assert client.state(shard).since == Frontier(45_999)
    finally:
        w.close()


def test_no_finalization_under_a_foreign_hold(client, clock):
    a = open_ctl(client, clock, role="reader")
    b = open_ctl(client, clock, role="dropper", fence=False)
    try:
        a.create_collections([CollectionDesc("x", KV)])
        shard = a.collection("x").shard_id
        write(client, shard, "k1", 5, 100)
        (h,) = a.acquire_read_holds(["x"])
        b.drop_collections(["x"])
        b.tick()
        s = client.state(shard)
        assert not s.is_tombstone and s.upper.is_empty  # closed for writes, still readable
        assert contents(client, shard, as_of=99) == [("k1", 5, 1)]
        h.release()  # a cannot finalize (it need not know x was dropped) ...
        b.tick()  # ... the writer that finds no holder left does
        assert client.state(shard).is_tombstone
        from storage.controller.catalog import CatalogStore

        assert CatalogStore(client.consensus).head().unfinalized_shards == ()
    finally:
        a.close()
        b.close()


def test_a_hold_outlives_its_own_drop(client, clock, ctl):
    ctl.create_collections([CollectionDesc("x", KV)])
    shard = ctl.collection("x").shard_id
    write(client, shard, "k1", 5, 100)
    (h,) = ctl.acquire_read_holds(["x"])
    ctl.drop_collections(["x"])
    ctl.tick()
    assert not client.state(shard).is_tombstone
    h.release()  # the last holder: the drop finishes at once
    assert client.state(shard).is_tombstone


def test_a_late_dependent_starts_at_its_inputs_since(client, clock, ctl):
    ctl.create_collections([CollectionDesc("a", KV, read_policy=step_back())])
    sa = ctl.collection("a").shard_id
    write(client, sa, "k", 5, 100)
    ctl.tick()
    assert ctl.frontiers("a") == (Frontier(99), Frontier(100))
    ctl.create_collections([CollectionDesc("d", KV, read_policy=ValidFrom(0), depends_on=("a",))])
    sd = ctl.collection("d").shard_id
    assert ctl.frontiers("d")[0] == Frontier(99)
    # The dependency hold is a durable handle on a's shard, at d's since.
    assert client.state(sa).critical_readers[f"dep:{sd}"].since == Frontier(99)


def test_a_dependency_hold_survives_its_controller(client, clock):
    """The chained-flow scenario at the controller level: d depends on a; between d's
    runs a goes on (its policy moves), and d still reads a where it stopped."""
    one = open_ctl(client, clock, role="job:chain")
    one.create_collections([CollectionDesc("a", KV, read_policy=step_back())])
    sa = one.collection("a").shard_id
    write(client, sa, "k1", 5, 100)
    one.tick()
    one.create_collections([CollectionDesc("d", KV, depends_on=("a",))])  # default policy: lag 1 s
    sd = one.collection("d").shard_id
    write(client, sd, "k1", 5, 100)
    one.tick()
    d_since = client.state(sd).since
    one.close()
    two = open_ctl(client, clock, role="job:counter", fence=False)  # the input's job runs on
    try:
        for t in range(200, 5000, 500):
            write(client, sa, f"k{t}", t, t + 1)
            two.tick()
        assert two.implied_capability("a") == Frontier(4700)
        assert client.state(sa).since == d_since  # held where d stopped
        client.compact(sa)
        assert contents(client, sa, as_of=d_since.time) == [("k1", 5, 1)]
    finally:
        two.close()
    # Dropping d releases its hold on a: a's since catches up with its policy.
    three = open_ctl(client, clock, role="admin", fence=False)
    try:
        three.drop_collections(["d"])
        assert f"dep:{sd}" not in client.state(sa).critical_readers
        assert client.state(sa).since == Frontier(4700)
        three.tick()
        assert client.state(sd).is_tombstone
        with pytest.raises(ReadBeforeSince):
            contents(client, sa, as_of=d_since.time)
    finally:
        three.close()


def test_an_orphaned_dependency_hold_is_released(client, clock, ctl):
    """A crash between the drop and the release leaves a dep: handle whose dependent is gone."""
    ctl.create_collections([CollectionDesc("a", KV, read_policy=step_back())])
    sa = ctl.collection("a").shard_id
    write(client, sa, "k", 5, 100)
    client.open_critical_since(sa, "dep:s-gone", opaque="dep:s-gone")  # registered at since 0
    ctl.tick()
    s = client.state(sa)
    assert "dep:s-gone" not in s.critical_readers and s.since == Frontier(99)


CHILD = textwrap.dedent("""
    import sys, time, storage
    from storage.controller import StorageController
    client = storage.open(sys.argv[1], fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None, compact=False, read_only=True,
                                 role="job:crashy", hold_lease_ms=1500)
    (h,) = ctl.acquire_read_holds(["x"])
    print(h.time.time, flush=True)
    time.sleep(600)
""")


def test_a_crashed_process_hold_expires(root):
    client = storage.open(root, fsync=False)
    w = StorageController.open(client, tick_interval_ms=None, compact=False)
    try:
        w.create_collections([CollectionDesc("x", KV, read_policy=step_back())])
        shard = w.collection("x").shard_id
        write(client, shard, "k", 5, 100)
        w.tick()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.Popen([sys.executable, "-c", CHILD, root], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert p.stdout is not None
            held = int(p.stdout.readline())
            assert held == 99
            time.sleep(1.0)  # its heartbeat (every 0.5 s) keeps it alive meanwhile
            write(client, shard, "k2", 200, 300)
            w.tick()
            assert client.state(shard).since == Frontier(99)
            readers = [r for r in client.state(shard).leased_readers if r.startswith("hold:job:crashy:")]
            assert len(readers) == 1 and f":{p.pid}@" in readers[0]
        finally:
            p.kill()
            p.wait()
        deadline = time.monotonic() + 10
        while client.state(shard).since != Frontier(299) and time.monotonic() < deadline:
            time.sleep(0.2)
            w.tick()
        assert client.state(shard).since == Frontier(299)  # the lease ran out: the hold is gone
    finally:
        w.close()
        client.close()


def test_set_dependencies_holds_a_new_input_and_refuses_cycles(client, clock, ctl):
    ctl.create_collections([CollectionDesc("a", KV, read_policy=step_back()), CollectionDesc("d", KV)])
    sa, sd = ctl.collection("a").shard_id, ctl.collection("d").shard_id
    write(client, sa, "k", 5, 100)
    ctl.tick()
    ctl.set_dependencies("d", ["a"])
    assert ctl.collection("d").depends_on == ("a",)
    assert f"dep:{sd}" in client.state(sa).critical_readers
    from storage.errors import IdentifierMissing, InvalidInput

    with pytest.raises(InvalidInput, match="'a'.*derived from"):
        ctl.set_dependencies("a", ["d"])
    with pytest.raises(InvalidInput, match="'a'"):
        ctl.set_dependencies("a", ["a"])
    with pytest.raises(IdentifierMissing, match="'nope'"):
        ctl.set_dependencies("d", ["nope"])
    # Removing the input releases its hold (as an orphan, at the input's next tick).
    ctl.set_dependencies("d", [])
    ctl.tick()
    assert f"dep:{sd}" not in client.state(sa).critical_readers


def test_a_released_dependency_hold_is_taken_again(client, clock, ctl):
    """An operator released d's hold on a (`shardflow holds release`); d's writer holds a again."""
    ctl.create_collections([CollectionDesc("a", KV, read_policy=step_back()),
                            CollectionDesc("d", KV, read_policy=ValidFrom(0), depends_on=("a",))])
    sa, sd = ctl.collection("a").shard_id, ctl.collection("d").shard_id
    write(client, sa, "k", 5, 100)
    write(client, sd, "k", 5, 100)
    ctl.tick()
    assert client.release_critical_since(sa, f"dep:{sd}")
    assert client.state(sa).since == Frontier(99)
    ctl.set_read_policy({"d": step_back()})  # d's since moves: its writer moves the hold
    assert client.state(sa).critical_readers[f"dep:{sd}"].since == Frontier(99)


def test_reopening_keeps_a_dependent_at_its_own_policy(client, clock):
    """Found by the multi-controller model: reopening took the policy handle's since for the
    input's since, so the dependent (ValidFrom(0)) jumped to 15 and lost times 0-14."""
    one = open_ctl(client, clock)
    one.create_collections([CollectionDesc("a", KV, read_policy=ValidFrom(0)),
                            CollectionDesc("d", KV, read_policy=ValidFrom(0), depends_on=("a",))])
    sa, sd = one.collection("a").shard_id, one.collection("d").shard_id
    write(client, sa, "k", 5, 16)
    write(client, sd, "k", 5, 16)
    one.set_read_policy({"a": step_back()})
    assert client.state(sa).since == Frontier(0)  # d holds a at 0
    one.close()
    two = open_ctl(client, clock)
    try:
        assert two.frontiers("d")[0] == Frontier(0) and two.frontiers("a")[0] == Frontier(0)
        assert client.state(sd).since == Frontier(0) and client.state(sa).since == Frontier(0)
    finally:
        two.close()

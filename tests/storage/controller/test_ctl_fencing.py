"""Read-only mode, allow_writes and fencing across two processes; the drop -> finalize crash test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa
from ctl_helpers import KV, contents

import storage
from storage.controller import (
    CATALOG_KEY,
    Append,
    CollectionDesc,
    StorageController,
    ValidFrom,
    step_back,
)
from storage.controller.controller import CRASH_ENV
from storage.frontier import Frontier

CHILD = os.path.join(os.path.dirname(__file__), "_ctl_child.py")


def heads(client: storage.Client) -> dict[str, int]:
    return {k: client.consensus.head(k).seqno for k in client.consensus.list_keys("")}


def shard_facts(client: storage.Client) -> dict[str, tuple]:
    """Every shard's data and durable handles: what a read-only controller must not change."""
    out = {}
    for sid in client.list_shards():
        s = client.state(sid)
        out[str(sid)] = (s.since, s.upper, s.batches, dict(s.critical_readers), dict(s.metadata))
    return out


def test_read_only_writes_nothing_but_its_holds(client, clock, ctl):
    ctl.create_collections([CollectionDesc("kv", KV), CollectionDesc("ev", KV, data_source="webhook")])
    ctl.differential_write("kv", Append(pa.table({"k": ["a"], "v": [1]}, schema=KV)))
    ctl.close()
    ro = StorageController.open(client, clock=clock, tick_interval_ms=None, read_only=True)
    try:
        before = heads(client)
        facts = shard_facts(client)
        blobs = sorted(client.blob.list(""))
        clock.advance(10_000)
        h = ro.acquire_read_holds(["kv"])[0]
        shard = ro.collection("kv").shard_id
        # The one thing it writes: the leased reader behind its hold, so the hold binds writers too.
        assert [r for r in client.state(shard).leased_readers if r.startswith("hold:controller:")]
        ro.set_read_policy({"kv": step_back()})
        h.release()
        assert ro.differential_write("kv", Append(pa.table({"k": ["b"], "v": [2]}, schema=KV))) is None
        assert not ro.report_sink_status("s", "running")
        ro.tick()
        assert {k: v for k, v in heads(client).items() if not k.startswith("shard/")} == \
            {k: v for k, v in before.items() if not k.startswith("shard/")}
        assert shard_facts(client) == facts
        assert sorted(client.blob.list("")) == blobs
        # ...but desired is current, and is written once allowed.
        assert sorted(ro.desired("kv").column("k").to_pylist()) == ["a", "b"]
        ro.allow_writes()
        assert client.consensus.head(CATALOG_KEY).seqno > before[CATALOG_KEY]
        ro.tick()
        assert contents(client, ro.collection("kv").shard_id) == [("a", 1, 1), ("b", 2, 1)]
    finally:
        ro.close()


def test_allow_writes_writes_corrections_at_once(client, clock, ctl):
    ctl.create_collections([CollectionDesc("kv", KV)])
    ctl.differential_write("kv", Append(pa.table({"k": ["a"], "v": [1]}, schema=KV)))
    ctl.close()
    ro = StorageController.open(client, clock=clock, tick_interval_ms=None, read_only=True, compact=False)
    try:
        clock.advance(10)
        assert ro.differential_write("kv", Append(pa.table({"k": ["b"], "v": [2]}, schema=KV))) is None
        shard = ro.collection("kv").shard_id
        assert contents(client, shard) == [("a", 1, 1)]
        ro.allow_writes()
        # No tick: the corrections made while read-only are written by allow_writes itself.
        assert contents(client, shard) == [("a", 1, 1), ("b", 2, 1)]
    finally:
        ro.close()


def test_allow_writes_rebases_since_onto_the_shards(client, clock, ctl):
    ctl.create_collections([CollectionDesc("a", KV, read_policy=step_back())])
    shard = ctl.collection("a").shard_id
    ro = StorageController.open(client, clock=clock, tick_interval_ms=None, read_only=True, compact=False)
    try:
        assert ro.frontiers("a") == (Frontier(0), Frontier(0))
        # The writer moves the shard's since past the read-only view (whose holds never reach the shard).
        w = client.open_writer(shard)
        empty = pa.table({"k": [], "v": [], "_time": [], "_diff": []},
                         schema=pa.schema([*KV, ("_time", pa.int64()), ("_diff", pa.int64())]))
        w.compare_and_append(empty, Frontier(0), Frontier(100))
        assert ctl.frontiers("a") == (Frontier(99), Frontier(100))
        ctl.close()
        assert client.state(shard).since == Frontier(99)
        ro.allow_writes()
        h = ro.acquire_read_holds(["a"])[0]
        assert h.time >= client.state(shard).since  # readable: a snapshot at it works
        with client.open_leased_reader(shard, heartbeat=False) as r:
            r.snapshot(h.time.time, timeout=5)
        assert ro.frontiers("a")[0] == Frontier(99)
        h.release()
    finally:
        ro.close()


def test_fencing_across_processes(root):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, CHILD, "fence", root], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # let the old writer write a few times
        client = storage.open(root, fsync=False)
        new = StorageController.open(client, tick_interval_ms=None, read_only=True, compact=False)
        try:
            new.allow_writes()
            out, _ = child.communicate(timeout=20)
            assert child.returncode == 0, out
            assert out.startswith("fenced"), out
            assert int(out.split()[1]) > 0
            # The new writer owns the collection; its desired started from what was persisted.
            new.differential_write("kv", Append(pa.table({"k": ["new"], "v": [0]}, schema=KV)))
            shard = new.collection("kv").shard_id
            got = contents(client, shard)
            want = sorted(tuple(d.values()) for d in new.desired("kv").to_pylist())
            assert got == want and ("new", 0, 1) in got
            assert client.state(shard).critical_readers["controller"].opaque == new.epoch
        finally:
            new.close()
            client.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_drop_finalize_crash_resumes(root):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), CRASH_ENV: "drop_recorded"}
    p = subprocess.run([sys.executable, CHILD, "drop", root], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)
    shard = p.stdout.split()[0]
    client = storage.open(root, fsync=False)
    try:
        # The crash hit between the steps: dropped in the catalog, not finalized.
        from storage.controller.catalog import CatalogStore

        cat = CatalogStore(client.consensus).head()
        assert "doomed" not in cat.collections and shard in cat.unfinalized_shards
        assert not client.state(shard).is_tombstone
        ctl = StorageController.open(client, tick_interval_ms=None, compact=False)
        try:
            assert client.state(shard).is_tombstone
            assert CatalogStore(client.consensus).head().unfinalized_shards == ()
        finally:
            ctl.close()
    finally:
        client.close()


def test_fencing_in_process(client, clock):
    import pytest

    from storage.errors import Fenced

    fenced = []
    old = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False, on_fenced=fenced.append)
    old.create_collections([CollectionDesc("kv", KV, read_policy=ValidFrom(0))])
    w = client.open_writer(old.collection("kv").shard_id)
    w.compare_and_append(pa.table({"k": [], "v": [], "_time": [], "_diff": []},
                                  schema=pa.schema([*KV, ("_time", pa.int64()), ("_diff", pa.int64())])), 0, 50)
    (h,) = old.acquire_read_holds(["kv"])
    old.set_read_policy({"kv": ValidFrom(30)})
    assert old.frontiers("kv")[0] == Frontier(0)
    new = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False, read_only=True)
    try:
        new.allow_writes()
        assert new.epoch == old.epoch + 1
        # Its hold was its own leased reader: releasing it lets since go to the policy's 30.
        h.release()
        assert client.state(w.shard_id).since == Frontier(30)
        # Its next write notices the new epoch.
        with pytest.raises(Fenced):
            old.differential_write("kv", Append(pa.table({"k": ["x"], "v": [1]}, schema=KV)))
        assert old.fenced and len(fenced) == 1
        with pytest.raises(Fenced):
            old.tick()
        # The new writer is unaffected.
        new.differential_write("kv", Append(pa.table({"k": ["y"], "v": [2]}, schema=KV)))
        assert contents(client, new.collection("kv").shard_id) == [("y", 2, 1)]
    finally:
        old.close()
        new.close()


def test_fenced_by_catalog(client, clock):
    import pytest

    from storage.errors import Fenced

    old = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    new = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    try:
        with pytest.raises(Fenced, match="epoch 1 was fenced by epoch 2"):
            old.create_collections([CollectionDesc("kv", KV)])
        assert old.fenced
        new.create_collections([CollectionDesc("kv", KV)])
    finally:
        old.close()
        new.close()

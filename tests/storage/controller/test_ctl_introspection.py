"""Introspection collections in schema `system`."""

from __future__ import annotations

import pyarrow as pa
from ctl_helpers import KV, contents

from storage.controller import Append, CollectionDesc, StorageController


def test_frontiers_and_shard_mapping(client, clock, ctl):
    ctl.create_collections([CollectionDesc("a", KV), CollectionDesc("b", KV)])
    ctl.differential_write("a", Append(pa.table({"k": ["x"], "v": [1]}, schema=KV)))
    clock.advance(2000)
    ctl.tick()
    shards = ctl.introspection_shards()
    mapping = contents(client, shards["system.shard_mapping"])
    assert ("a", ctl.collection("a").shard_id, 1) in mapping
    assert ("b", ctl.collection("b").shard_id, 1) in mapping
    assert ("system.frontiers", shards["system.frontiers"], 1) in mapping
    fr = {r[0]: r[1:] for r in contents(client, shards["system.frontiers"])}
    since, upper = ctl.frontiers("a")
    assert fr["a"] == (since.time, upper.time, 1)
    # A drop retracts the collection's rows at the next tick.
    ctl.drop_collections(["b"])
    clock.advance(10)
    ctl.tick()
    assert "b" not in {r[0] for r in contents(client, shards["system.shard_mapping"])}
    assert "b" not in {r[0] for r in contents(client, shards["system.frontiers"])}
    stats = {r[0]: r[1:] for r in contents(client, shards["system.statistics"])}
    assert stats["a"][0] == 1 and stats["a"][3] == 1  # rows, updates_committed


def test_status_history_dedup_and_keep_last_n(client, clock):
    ctl = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    assert ctl.report_source_status("src", "starting")
    assert not ctl.report_source_status("src", "starting")  # repeats the current status
    for i in range(5):
        clock.advance(1)
        assert ctl.report_source_status("src", "running" if i % 2 else "stalled", error=None if i % 2 else "boom")
    assert ctl.report_sink_status("snk", "running")
    clock.advance(1)
    ctl.tick()
    shard = ctl.introspection_shards()["system.source_status_history"]
    assert len(contents(client, shard)) == 6
    sink_shard = ctl.introspection_shards()["system.sink_status_history"]
    assert [r[1:3] for r in contents(client, sink_shard)] == [("snk", "running")]
    ctl.close()
    # Restart keeping the last 2 per object: the older rows are retracted at the old upper.
    old_upper = client.state(shard).upper.time
    ctl2 = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False, status_keep_last=2)
    try:
        rows = contents(client, shard)
        assert len(rows) == 2
        assert [r[2] for r in sorted(rows)] == ["running", "stalled"]
        assert contents(client, shard, old_upper - 1) != rows  # history before the retraction is intact
        # The current status survived the restart: repeating it writes nothing.
        assert not ctl2.report_source_status("src", "stalled", error="boom")
        assert ctl2.report_source_status("src", "running")
    finally:
        ctl2.close()


def test_read_only_reports_nothing(client, clock, ctl):
    ro = StorageController.open(client, clock=clock, tick_interval_ms=None, read_only=True)
    try:
        assert not ro.report_source_status("src", "running")
        assert set(ro.introspection_shards()) == set(ctl.introspection_shards())
    finally:
        ro.close()

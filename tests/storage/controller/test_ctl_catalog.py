"""Catalog semantics: create, drop, alter, restart, validation before mutation."""

from __future__ import annotations

import pyarrow as pa
import pytest
from ctl_helpers import KV, contents

import storage
from storage.controller import (
    CATALOG_KEY,
    CollectionDesc,
    StorageController,
    ValidFrom,
    lag_writes_by,
    step_back,
)
from storage.errors import (
    AlterError,
    IdentifierMissing,
    InvalidInput,
    ReadOnly,
    SourceIdReused,
)
from storage.frontier import Frontier


def seqno(client: storage.Client) -> int:
    h = client.consensus.head(CATALOG_KEY)
    return -1 if h is None else h.seqno


def test_create_identical_is_noop_and_restart_keeps_shard(client, clock, ctl):
    d = CollectionDesc("orders", KV, data_source="ingestion")
    ctl.create_collections([d])
    meta = ctl.collection("orders")
    assert meta.name == "orders" and meta.data_source == "ingestion" and meta.schema.equals(KV)
    before = seqno(client)
    ctl.create_collections([d, d])  # identical, even twice in one call
    assert seqno(client) == before
    assert ctl.collection("orders").shard_id == meta.shard_id
    ctl.close()
    ctl2 = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    try:
        assert ctl2.collection("orders").shard_id == meta.shard_id
        assert list(ctl2.collections()) == ["orders"]
        ctl2.create_collections([d])
        assert ctl2.collection("orders").shard_id == meta.shard_id
    finally:
        ctl2.close()


def test_source_id_reused(client, ctl):
    ctl.create_collections([CollectionDesc("a", KV)])
    other = pa.schema([("k", pa.string())])
    before = seqno(client)
    with pytest.raises(SourceIdReused, match="'a'.*another description"):
        ctl.create_collections([CollectionDesc("b", KV), CollectionDesc("a", other)])
    with pytest.raises(SourceIdReused, match="'c'.*twice in one call"):
        ctl.create_collections([CollectionDesc("c", KV), CollectionDesc("c", other)])
    with pytest.raises(SourceIdReused):
        ctl.create_collections([CollectionDesc("a", KV, data_source="table")])
    # Failed calls change nothing: not even the valid parts of the batch.
    assert seqno(client) == before
    assert set(ctl.collections()) == {"a"}


def test_names_validated(ctl):
    for bad in ["Orders", "1x", "a-b", "", "system.frontiers", "a.b", None]:
        with pytest.raises(InvalidInput, match="invalid|reserved"):
            ctl.create_collections([CollectionDesc(bad, KV)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="'Bad'"):
        ctl.collection("Bad")
    with pytest.raises(InvalidInput, match="data_source"):
        ctl.create_collections([CollectionDesc("x", KV, data_source="kafka")])
    with pytest.raises(InvalidInput, match="reserved"):
        ctl.create_collections([CollectionDesc("x", pa.schema([("_time", pa.int64())]))])


def test_unknown_ids(client, ctl):
    ctl.create_collections([CollectionDesc("a", KV)])
    before = seqno(client)
    with pytest.raises(IdentifierMissing, match="nope"):
        ctl.collection("nope")
    with pytest.raises(IdentifierMissing, match="nope"):
        ctl.drop_collections(["a", "nope"])
    with pytest.raises(IdentifierMissing):
        ctl.acquire_read_holds(["a", "nope"])
    with pytest.raises(IdentifierMissing):
        ctl.set_read_policy({"nope": step_back()})
    with pytest.raises(IdentifierMissing):
        ctl.frontiers("nope")
    with pytest.raises(IdentifierMissing):
        ctl.create_collections([CollectionDesc("d", KV, depends_on=("nope",))])
    assert seqno(client) == before
    assert "a" in ctl.collections()
    assert ctl.frontiers("a")[0] == Frontier(0)  # the failed acquire took no hold either


def test_drop_finalizes_once_holds_released(client, clock, ctl):
    ctl.create_collections([CollectionDesc("a", KV, data_source="other")])
    shard = ctl.collection("a").shard_id
    w = client.open_writer(shard)
    w.compare_and_append(pa.table({"k": ["x"], "v": [1], "_time": [10], "_diff": [1]}), 0, 20)
    (h,) = ctl.acquire_read_holds(["a"])
    ctl.drop_collections(["a"])
    with pytest.raises(IdentifierMissing):
        ctl.collection("a")
    assert "a" not in ctl.collections()
    # Still held: readable, not finalized, and recorded as unfinalized.
    assert not client.state(shard).is_tombstone
    assert contents(client, shard, 15) == [("x", 1, 1)]
    assert shard in ctl._catalog.head().unfinalized_shards
    h.release()
    assert client.state(shard).is_tombstone
    assert ctl._catalog.head().unfinalized_shards == ()
    # A re-create under the same name gets a fresh shard.
    ctl.create_collections([CollectionDesc("a", KV, data_source="other")])
    assert ctl.collection("a").shard_id != shard


def test_drop_without_holds_finalizes_at_once(client, ctl):
    ctl.create_collections([CollectionDesc("a", KV), CollectionDesc("b", KV)])
    sa, sb = ctl.collection("a").shard_id, ctl.collection("b").shard_id
    ctl.drop_collections(["a"])
    assert client.state(sa).is_tombstone
    assert not client.state(sb).is_tombstone


def test_drop_respects_dependencies(client, ctl):
    ctl.create_collections([CollectionDesc("a", KV), CollectionDesc("d", KV, depends_on=("a",))])
    with pytest.raises(InvalidInput, match="'d' depends on it"):
        ctl.drop_collections(["a"])
    ctl.drop_collections(["d", "a"])
    assert ctl.collections() == {}


def test_alter(client, ctl):
    ctl.create_collections([CollectionDesc("a", KV)])
    shard = ctl.collection("a").shard_id
    wider = KV.append(pa.field("note", pa.string(), nullable=True))
    before = seqno(client)
    for bad, msg in [
        (pa.schema([("k", pa.string())]), "cannot be removed"),
        (pa.schema([("k", pa.string()), ("v", pa.int32())]), "types cannot change"),
        (pa.schema([("v", pa.int64()), ("k", pa.string())]), "renamed or reordered"),
        (KV.append(pa.field("n", pa.int64(), nullable=False)), "must be nullable"),
    ]:
        with pytest.raises(AlterError, match=msg):
            ctl.alter_collection("a", bad)
    assert seqno(client) == before
    with pytest.raises(IdentifierMissing):
        ctl.alter_collection("nope", wider)
    ctl.alter_collection("a", wider)
    assert ctl.collection("a").schema.equals(wider)
    assert client.state(shard).schema.equals(wider)


def test_read_only_ddl(client, clock, ctl):
    ctl.create_collections([CollectionDesc("a", KV)])
    ro = StorageController.open(client, clock=clock, tick_interval_ms=None, read_only=True)
    try:
        before = seqno(client)
        ro.create_collections([CollectionDesc("a", KV)])  # identical: a no-op, allowed
        with pytest.raises(ReadOnly):
            ro.create_collections([CollectionDesc("b", KV)])
        with pytest.raises(ReadOnly):
            ro.drop_collections(["a"])
        assert seqno(client) == before
        # The writer's later create is visible to the read-only controller.
        ctl.create_collections([CollectionDesc("c", KV)])
        assert ro.collection("c").shard_id == ctl.collection("c").shard_id
    finally:
        ro.close()


def test_policy_persisted_in_catalog(client, clock, ctl):
    ctl.create_collections([CollectionDesc("a", KV, read_policy=ValidFrom(0))])
    ctl.set_read_policy({"a": lag_writes_by(50, 10)})
    ctl.close()
    ctl2 = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    try:
        assert ctl2.collection("a").read_policy == lag_writes_by(50, 10)
    finally:
        ctl2.close()


def test_system_collections(ctl):
    shards = ctl.introspection_shards()
    assert set(shards) == {
        "system.frontiers", "system.shard_mapping", "system.source_status_history",
        "system.sink_status_history", "system.statistics",
    }
    assert ctl.collections() == {}
    with pytest.raises(InvalidInput):
        ctl.drop_collections(["system.frontiers"])

"""append_table is fenced exactly: a take-over between the epoch check and the commit
makes the whole append fail, and nothing of it becomes visible."""

from __future__ import annotations

import pyarrow as pa
import pytest

import storage
from storage.controller import CollectionDesc, StorageController

SCHEMA = pa.schema([("k", pa.string())])


def test_take_over_between_check_and_commit_fences_append_table(client, clock):
    a = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    a.create_collections([CollectionDesc("t", SCHEMA, data_source="table")])
    real = a._catalog.check_epoch
    taken: list[StorageController] = []

    def check_then_take_over(epoch: int):  # the race: B takes over right after A's check
        cat = real(epoch)
        if not taken:
            taken.append(StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False))
        return cat

    a._catalog.check_epoch = check_then_take_over  # type: ignore[method-assign]
    with pytest.raises(storage.Fenced):
        a.append_table(10, 11, {"t": pa.table({"k": ["stale-writer"]})})
    b = taken[0]
    shard = b.collection("t").shard_id
    assert client.state(shard).upper.time in (0, None) or client.state(shard).upper.time < 11
    b.append_table(10, 11, {"t": pa.table({"k": ["new-writer"]})})
    with client.open_leased_reader(shard) as r:
        assert r.snapshot(10).column("k").to_pylist() == ["new-writer"]
    a.close()
    b.close()

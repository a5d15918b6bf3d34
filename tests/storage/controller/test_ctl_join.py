"""fence=False: writable controllers that join the current epoch do not fence each other;
a real take-over (fence=True) still fences all of them."""

from __future__ import annotations

import pyarrow as pa
import pytest

import storage
from storage.controller import CollectionDesc, StorageController

SCHEMA = pa.schema([("k", pa.string())])


def _open(client, clock, **kw) -> StorageController:
    return StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False, **kw)


def test_joined_controllers_do_not_fence_each_other(client, clock):
    a = _open(client, clock, fence=False)
    a.create_collections([CollectionDesc("events", SCHEMA, data_source="webhook")])
    b = _open(client, clock, fence=False)  # e.g. a flow job started next to a webhook server
    assert a.epoch == b.epoch == 1
    b.create_collections([CollectionDesc("other", SCHEMA, data_source="webhook")])
    clock.advance(10)
    a.monotonic_appender("events").append(pa.table({"k": ["x"]}))
    b.monotonic_appender("other").append(pa.table({"k": ["y"]}))
    a.tick()
    b.tick()
    assert not a.fenced and not b.fenced
    assert set(a.collections()) == set(b.collections()) == {"events", "other"}
    # A real take-over fences both.
    c = _open(client, clock)
    assert c.epoch == 2
    clock.advance(10)
    with pytest.raises(storage.Fenced):
        a.monotonic_appender("events").append(pa.table({"k": ["z"]}))
    with pytest.raises(storage.Fenced):
        b.create_collections([CollectionDesc("third", SCHEMA, data_source="webhook")])
    for x in (a, b, c):
        x.close()

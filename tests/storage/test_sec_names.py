"""Collection names (issue 14, item 7): a full match, `__` reserved for query internals, at most 63 characters.

Before: `'orders\\n'` passed (`match` with `$`), `__since` and `__changes_x` were accepted and
then collided with the query connection's own tables, and a 10,000-character name flooded
every error message.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

import storage
from storage.controller import CollectionDesc, StorageController

K = pa.schema([("k", pa.int64())])
BAD = ["orders\n", "orders\r\n", "__since", "__changes_orders", "__x", "x" * 64, "x" * 10_000, "Orders", "1x", "a-b", ""]


@pytest.fixture
def ctl(tmp_path):  # noqa: ANN001, ANN201
    c = StorageController.open(storage.open(tmp_path, fsync=False), tick_interval_ms=None)
    yield c
    c.close()


def test_bad_collection_names_are_refused_with_a_short_message(ctl):
    for name in BAD:
        with pytest.raises(storage.InvalidInput, match=r"collection name .* is invalid") as e:
            ctl.create_collections([CollectionDesc(name, K, data_source="other")])
        assert len(str(e.value)) < 250 and "\n" not in str(e.value), name[:20]
    assert ctl.collections() == {}


def test_bad_names_are_refused_by_query(ctl):
    for name in [*BAD, "system.__since", "a.b.c"]:
        with pytest.raises(storage.InvalidInput, match=r"collection name .* is not valid") as e:
            storage.query.connect(ctl.client, {name: storage.ShardId.new()})
        assert len(str(e.value)) < 250 and "\n" not in str(e.value), name[:20]


def test_good_names_at_the_limits_are_taken(ctl):
    good = ["x" * 63, "_x", "a__b", "orders_2"]
    ctl.create_collections([CollectionDesc(name, K, data_source="other") for name in good])
    ctl.tick()
    shards = {name: ctl.collections()[name].shard_id for name in good}
    with storage.query.connect(ctl.client, shards) as con:
        assert con.sql(f'SELECT count(*) FROM "{"x" * 63}", _x, a__b, orders_2').fetchall() == [(0,)]

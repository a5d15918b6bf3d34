"""Inputs users have every right to send (issue 14, item 9).

pandas 3 hands strings over as `large_string`, polars as `string_view`, both may
dictionary-encode; and a dict of columns or a list of dicts is the obvious way to
write a few rows. Each is cast to the collection's schema when that loses nothing;
otherwise the error names the column and both types.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

import storage
from storage.controller import Append, CollectionDesc, StorageController
from storage.errors import InvalidInput, SchemaMismatch

SCHEMA = pa.schema([pa.field("name", pa.string()), pa.field("blob", pa.binary()), pa.field("n", pa.int32())])


def sample(string_type: pa.DataType, binary_type: pa.DataType = pa.binary(), n_type: pa.DataType = pa.int32()) -> pa.Table:
    return pa.table(
        {
            "name": pa.array(["a", "é", None], string_type),
            "blob": pa.array([b"x", b"", b"\x00\xff"], binary_type),
            "n": pa.array([1, -2, 3], n_type),
        }
    )


def rows_of(client: storage.Client, shard: storage.ShardId, t: int) -> list[dict]:
    with client.open_leased_reader(shard) as r:
        snap = r.snapshot(t)
    assert snap.schema.field("name").type == pa.string() and snap.schema.field("blob").type == pa.binary()
    out = []
    for row in snap.to_pylist():  # consolidated: a row written twice has _diff 2
        d = row.pop("_diff")
        row.pop("_time", None)
        out += [row] * d
    return sorted(out, key=lambda d: d["n"])


EXPECTED = sorted(sample(pa.string()).to_pylist(), key=lambda d: d["n"])


def with_updates(t: pa.Table, time: int = 0) -> pa.Table:
    return t.append_column("_time", pa.array([time] * t.num_rows, pa.int64())).append_column(
        "_diff", pa.array([1] * t.num_rows, pa.int64())
    )


@pytest.mark.parametrize(
    "table",
    [
        sample(pa.large_string(), pa.large_binary()),
        sample(pa.string_view(), pa.binary_view()),
        sample(pa.string()).set_column(0, "name", pa.array(["a", "é", None]).dictionary_encode()),
        sample(pa.string(), n_type=pa.int64()),
    ],
    ids=["large", "view", "dictionary", "int64-fits"],
)
def test_write_handle_casts_lossless_types(tmp_path: Path, table: pa.Table) -> None:
    client = storage.open(tmp_path)
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA)
    w.compare_and_append(with_updates(table), 0, 1)
    assert rows_of(client, shard, 0) == EXPECTED
    at = w.monotonic_append(table, 5)  # the blind append takes them too
    assert rows_of(client, shard, at) == sorted(EXPECTED * 2, key=lambda d: d["n"])


def test_lossy_or_foreign_types_name_the_column_and_both_types(tmp_path: Path) -> None:
    client = storage.open(tmp_path)
    w = client.open_writer(storage.ShardId.new(), schema=SCHEMA)
    too_big = sample(pa.string(), n_type=pa.int64()).set_column(2, "n", pa.array([1, 2, 1 << 40], pa.int64()))
    with pytest.raises(SchemaMismatch, match=r"column 'n' has type int64, the schema says int32.*without loss"):
        w.compare_and_append(with_updates(too_big), 0, 1)
    floats = sample(pa.string()).set_column(2, "n", pa.array([1.0, 2.5, 3.0]))
    with pytest.raises(SchemaMismatch, match=r"column 'n' has type double, the schema says int32"):
        w.compare_and_append(with_updates(floats), 0, 1)
    with pytest.raises(SchemaMismatch, match=r"column 'name' has type binary, the schema says string"):
        w.compare_and_append(with_updates(sample(pa.binary())), 0, 1)
    assert w.upper == storage.Frontier(0), "nothing written"


def test_controller_apis_take_dicts_lists_and_pandas_like_types(tmp_path: Path) -> None:
    client = storage.open(tmp_path)
    ctl = StorageController.open(client, tick_interval_ms=None, clock=lambda: 1000)
    try:
        ctl.create_collections(
            [
                CollectionDesc("ev", SCHEMA, data_source="webhook"),
                CollectionDesc("tbl", SCHEMA, data_source="table"),
                CollectionDesc("kv", SCHEMA),
            ]
        )
        app = ctl.monotonic_appender("ev")
        app.append({"name": ["a", "é", None], "blob": [b"x", b"", b"\x00\xff"], "n": [1, -2, 3]})
        app.append([{"name": "b", "blob": b"y", "n": 4}, {"name": None, "blob": None, "n": 5}])
        app.append(sample(pa.large_string(), pa.large_binary()))
        app.append([])
        t_ev = ctl.frontiers("ev")[1].time
        assert t_ev is not None
        got = rows_of(client, storage.ShardId(ctl.collection("ev").shard_id), t_ev - 1)
        assert len(got) == 8 and {"name": "b", "blob": b"y", "n": 4} in got

        ctl.append_table(2000, 2001, {"tbl": [{"name": "a", "blob": b"x", "n": 1}]})
        ctl.append_table(2001, 2002, {"tbl": sample(pa.string_view())})
        assert len(rows_of(client, storage.ShardId(ctl.collection("tbl").shard_id), 2001)) == 4

        ctl.differential_write("kv", Append({"name": pa.array(["z"]).dictionary_encode(), "blob": [b"z"], "n": [9]}))
        assert ctl.desired("kv").select(SCHEMA.names).to_pylist() == [{"name": "z", "blob": b"z", "n": 9}]

        with pytest.raises(SchemaMismatch, match=r"column 'n' has type double, the schema says int32"):
            app.append([{"name": "a", "blob": b"x", "n": 1.5}])
        with pytest.raises(InvalidInput, match="dict of columns"):
            app.append({"name": ["a"], "blob": [b"x", b"y"], "n": [1]})
        with pytest.raises(InvalidInput, match="expected an Arrow table"):
            app.append("name,blob,n")
    finally:
        ctl.close()


@settings(max_examples=25, deadline=None)
@given(
    values=hs.lists(hs.one_of(hs.none(), hs.text(max_size=8)), min_size=1, max_size=20),
    kind=hs.sampled_from(["large", "view", "dictionary"]),
)
def test_string_casts_round_trip(tmp_path_factory: pytest.TempPathFactory, values: list[str | None], kind: str) -> None:
    col = {
        "large": pa.array(values, pa.large_string()),
        "view": pa.array(values, pa.string_view()),
        "dictionary": pa.array(values, pa.string()).dictionary_encode(),
    }[kind]
    schema = pa.schema([pa.field("s", pa.string())])
    client = storage.open(tmp_path_factory.mktemp("rt"))
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=schema)
    w.compare_and_append(with_updates(pa.table({"s": col})), 0, 1)
    with client.open_leased_reader(shard) as r:
        back = r.snapshot(0)
    expected: dict[str | None, int] = {}
    for v in values:
        expected[v] = expected.get(v, 0) + 1
    got = {row["s"]: row["_diff"] for row in back.to_pylist()}
    assert got == expected

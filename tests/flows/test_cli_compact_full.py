"""`shardflow compact --full`: one consolidated batch per collection, progress on stderr, one result line."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

import storage
from flows.cli import main
from storage.controller import CollectionDesc, StorageController, step_back

K = pa.schema([("k", pa.int64())])


def upd(ks: list[int], t: int, d: int = 1) -> pa.Table:
    n = len(ks)
    return pa.table({"k": pa.array(ks, pa.int64()), "_time": pa.array([t] * n, pa.int64()),
                     "_diff": pa.array([d] * n, pa.int64())})


@pytest.fixture
def data(tmp_path: Path):  # noqa: ANN201
    """Collections x (12 batches with retractions, since moved to 55) and y (one unconsolidated batch)."""
    d = tmp_path / "d"
    client = storage.open(d, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc(n, K, data_source="other", read_policy=step_back()) for n in ("x", "y")])
    shards = {n: m.shard_id for n, m in ctl.collections().items()}
    ctl.close()
    wx = client.open_writer(shards["x"], schema=K, compact=False)
    u = client.state(shards["x"]).upper.time
    lo = u
    for i in range(12):
        t = u + 10 * i
        rows = upd([i, 100 + i], t)
        if i:
            rows = pa.concat_tables([rows, upd([i - 1], t + 5, -1)])
        wx.compare_and_append(rows, lo, t + 10)
        lo = t + 10
    r = client.open_leased_reader(shards["x"])
    before = sorted(map(str, r.snapshot(lo - 1).to_pylist()))
    r.downgrade_since(lo - 1)
    wy = client.open_writer(shards["y"], schema=K, compact=False)
    uy = client.state(shards["y"]).upper.time
    wy.compare_and_append(pa.concat_tables([upd([1, 1, 2], uy), upd([2], uy + 1, -1)]), uy, uy + 5)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.tick()  # the read policies move since to upper - 1
    ctl.close()
    client.wait_compaction()
    assert client.state(shards["x"]).since.time == lo - 1
    yield d, client, shards, r, before, lo - 1
    r.expire()
    client.close()


def test_compact_full_makes_one_consolidated_batch(data, capsys) -> None:  # noqa: ANN001
    d, client, shards, r, before, as_of = data
    n = len(client.state(shards["x"]).batches)
    assert n >= 2
    capsys.readouterr()
    assert main(["compact", "--data", str(d), "--full", "x"]) == 0
    out, err = capsys.readouterr()
    assert f"x: merging {n} batches" in err
    assert out.count("\n") == 1 and out.startswith(f"x: {n} -> 1 batches, ") and f"since {as_of}" in out, out
    s = client.state(shards["x"])
    assert len(s.batches) == 1
    (b,) = s.batches
    assert b.consolidated and b.since.time == as_of
    assert sorted(map(str, r.snapshot(as_of).to_pylist())) == before
    # Collapsed: every update at as_of, so 12 live rows plus the last one inserted, nothing else.
    assert b.rows == 13
    # Once settled, a second --full rewrites nothing.
    assert main(["compact", "--data", str(d), "--full", "x"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("x: 1 -> 1 batches, 13 -> 13 updates"), out
    assert client.state(shards["x"]).batches == s.batches


def test_compact_full_rewrites_a_lone_unconsolidated_batch(data, capsys) -> None:  # noqa: ANN001
    d, client, shards, _, _, _ = data
    assert len(client.state(shards["y"]).batches) == 1 and not client.state(shards["y"]).batches[0].consolidated
    capsys.readouterr()
    assert main(["compact", "--data", str(d), "--full"]) == 0  # every collection, system ones included
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert any(ln.startswith("x: ") and " -> 1 batches" in ln for ln in lines), out
    assert any(ln.startswith("y: 1 -> 1 batches, 4 -> 1 updates") for ln in lines), out
    assert err.count("merging") == len(lines)
    (b,) = client.state(shards["y"]).batches
    assert b.consolidated


def test_compact_without_full_is_unchanged(data, capsys) -> None:  # noqa: ANN001
    d, _, _, _, _, _ = data
    capsys.readouterr()
    assert main(["compact", "--data", str(d), "y"]) == 0
    out, err = capsys.readouterr()
    assert out == "y: 1 -> 1 batches\n" and err == ""


def test_compact_full_unknown_collection_is_one_line(data, capsys) -> None:  # noqa: ANN001
    d, _, _, _, _, _ = data
    capsys.readouterr()
    assert main(["compact", "--data", str(d), "--full", "nope"]) == 1
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("shardflow: error: ") and "nope" in err

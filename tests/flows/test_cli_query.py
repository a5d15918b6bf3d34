"""`shardflow query`, `tail` and `inspect` read consistently (issue "Nothing lost, nothing doubled,
nothing poisoned", items 13-16 and 7): one as_of per query, negative counts under filters,
changes() bounded by the as_of, live rows vs update records, unrelated collections left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from flows.cli import main
from storage.controller import CollectionDesc, StorageController

K = pa.schema([("k", pa.int64())])


def upd(ks: list[int], t: int, d: int = 1) -> pa.Table:
    n = len(ks)
    return pa.table({"k": pa.array(ks, pa.int64()), "_time": pa.array([t] * n, pa.int64()),
                     "_diff": pa.array([d] * n, pa.int64())})


def make(data: Path, names: list[str]) -> tuple[storage.Client, dict[str, str]]:
    """Collections `names` (schema k BIGINT) in a catalog under `data`; writes go through plain writers."""
    client = storage.open(data, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc(n, K, data_source="other") for n in names])
    ctl.tick()  # the system.* collections get parts
    shards = {n: m.shard_id for n, m in ctl.collections().items()}
    shards.update(ctl.introspection_shards())
    ctl.close()
    return client, shards


def cli(capsys: pytest.CaptureFixture[str], data: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([argv[0], "--data", str(data), *argv[1:]])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("shardflow: error: ") and "Traceback" not in err, err
    return err[len("shardflow: error: "):-1]


@pytest.fixture
def xy(tmp_path: Path):  # noqa: ANN201
    """x and y both hold {1}; then x alone changes at t=10 (1 -> 2): x's upper is 20, y's 10."""
    data = tmp_path / "d"
    client, shards = make(data, ["x", "y"])
    wx = client.open_writer(shards["x"], schema=K)
    wy = client.open_writer(shards["y"], schema=K)
    ux, uy = client.state(shards["x"]).upper.time, client.state(shards["y"]).upper.time
    wx.compare_and_append(upd([1], 0), ux, 10)
    wy.compare_and_append(upd([1], 0), uy, 10)
    wx.compare_and_append(pa.concat_tables([upd([1], 10, -1), upd([2], 10)]), 10, 20)
    yield data, client, shards
    client.close()


def test_query_joins_at_one_time(xy, capsys) -> None:  # noqa: ANN001
    data, _, _ = xy
    rc, out, err = cli(capsys, data, "query", "--format", "csv", "SELECT * FROM x FULL JOIN y USING (k) ORDER BY ALL")
    assert rc == 0, err
    assert out.splitlines() == ['"k"', "1"]


def test_query_filtered_negative_count_fails(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = tmp_path / "d"
    client, shards = make(data, ["x"])
    w = client.open_writer(shards["x"], schema=K)
    u = client.state(shards["x"]).upper.time
    w.compare_and_append(upd([1, 2, 3], 0), u, 10)
    w.compare_and_append(upd([99], 10, -1), 10, 20)
    client.close()
    for q in ("SELECT count(*) FROM x WHERE k = 2", "SELECT count(*) FROM x WHERE k < 50", "SELECT count(*) FROM x"):
        rc, out, err = cli(capsys, data, "query", q)
        assert rc == 1 and out == "", (q, out)
        assert "collection x: row {'k': 99} has negative count -1 at time 19" in one_error(err)
    rc, out, err = cli(capsys, data, "tail", "x", "--timeout", "0.1")
    assert rc == 1 and "k=99" not in out
    assert "negative count -1" in one_error(err)
    rc, out, _ = cli(capsys, data, "query", "--as-of", "9", "--format", "csv", "SELECT count(*) AS n FROM x WHERE k = 2")
    assert rc == 0 and out.splitlines() == ['"n"', "1"]


def test_query_changes_respects_as_of_and_upper(xy, capsys) -> None:  # noqa: ANN001
    data, _, _ = xy
    rc, out, err = cli(capsys, data, "query", "--as-of", "5", "SELECT * FROM changes('x', 0, 19)")
    assert rc == 1 and out == ""
    assert "changes(x, 0, 19): to is past the query's as_of 5" in one_error(err)
    rc, out, err = cli(capsys, data, "query", "SELECT * FROM changes('y', 0, 1000)")
    assert rc == 1 and "changes(y, 0, 1000): to is past the query's as_of 9" in one_error(err)
    rc, out, err = cli(capsys, data, "query", "--format", "csv", "SELECT k, _time, _diff FROM changes('x') ORDER BY ALL")
    assert rc == 0, err
    assert out.splitlines()[1:] == ["1,0,1", "1,10,-1", "2,10,1"]


def test_query_help_says_how_to_include_time_zero(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "changes('x', -1, T) include time 0" in out and "a later to is an error" in out


def test_inspect_shows_live_rows_and_update_records(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = tmp_path / "d"
    client, shards = make(data, ["e", "x"])
    we = client.open_writer(shards["e"], schema=K)
    u = client.state(shards["e"]).upper.time
    we.compare_and_append(upd([7], u), u, u + 1)
    we.compare_and_append(upd([7], u + 1, -1), u + 1, u + 2)  # cancelled: nothing is live
    wx = client.open_writer(shards["x"], schema=K)
    u = client.state(shards["x"]).upper.time
    wx.compare_and_append(upd([1, 1, 2], u), u, u + 1)
    client.close()
    rc, out, err = cli(capsys, data, "inspect", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert (info["e"]["rows"], info["e"]["updates"]) == (0, 2)
    assert (info["x"]["rows"], info["x"]["updates"]) == (3, 3)
    rc, out, _ = cli(capsys, data, "inspect", "e")
    assert rc == 0 and "updates" in out
    # Compaction merges records; the live rows stay as they are.
    client = storage.open(data, fsync=False)
    r = client.open_leased_reader(shards["e"])
    r.downgrade_since(client.state(shards["e"]).upper.time - 1)
    client.compact(shards["e"], full=True)
    r.expire()
    client.close()
    rc, out, _ = cli(capsys, data, "inspect", "--json", "e")
    assert json.loads(out)["e"]["rows"] == 0


def test_query_opens_only_the_collections_it_mentions(xy, capsys) -> None:  # noqa: ANN001
    data, client, shards = xy
    # Break every part of y and of every system.* collection that has parts.
    broken = [shards["y"]] + [s for n, s in shards.items() if n.startswith("system.")]
    assert sum(len(b.parts) for s in broken[1:] for b in client.state(s).batches) >= 2
    for s in broken:
        for b in client.state(s).batches:
            for p in b.parts:
                path = client.blob.local_path(p.key)
                Path(path).write_bytes(b"garbage")
    rc, out, err = cli(capsys, data, "query", "--format", "csv", "SELECT k FROM x")
    assert rc == 0, err
    assert out.splitlines() == ['"k"', "2"]
    rc, _, err = cli(capsys, data, "query", "SELECT k FROM y")
    assert rc == 1 and "part" in one_error(err)

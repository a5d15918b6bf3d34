"""`shardflow query` cannot destroy or read its own store (issue 14, item 2).

Before: `COPY (...) TO 'data/consensus.sqlite'` succeeded and wiped the store, and
`read_blob('data/consensus.sqlite')` showed its internals. Now every file under the
data directory is out of reach of the SQL, while other files stay readable and
writable as in DuckDB's CLI, and the SQL cannot switch that off.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from flows.cli import main
from storage.controller import CollectionDesc, StorageController

K = pa.schema([("k", pa.int64())])


def digest(data: Path) -> dict[str, str]:
    """The files of the store a query must not change: the parts, and which files there are.
    (consensus.sqlite changes under any query: its leased readers are registered there.)"""
    files = {str(p.relative_to(data)) for p in data.rglob("*") if not p.name.endswith(("-wal", "-shm", "-journal"))}
    return {f: hashlib.sha256((data / f).read_bytes()).hexdigest() if f.startswith("blob/") and (data / f).is_file()
            else "" for f in files}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    client = storage.open(data, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc("c", K, data_source="other")])
    shard = ctl.collections()["c"].shard_id
    w = client.open_writer(shard, schema=K)
    up = client.state(shard).upper.time
    w.compare_and_append(pa.table({"k": [1, 2, 3], "_time": [up] * 3, "_diff": [1] * 3}), up, up + 10)
    ctl.close()
    client.close()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "in.csv").write_text("a\n7\n")
    return data


def q(capsys: pytest.CaptureFixture[str], data: Path, sql: str, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["query", "--data", str(data), "--format", "csv", sql, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def part_path(data: Path) -> str:
    return str(next(p for p in (data / "blob").rglob("*") if p.is_file()))


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '{data}/consensus.sqlite'",
    "COPY (SELECT 1) TO '{data}/consensus.sqlite' (USE_TMP_FILE false)",
    "COPY (SELECT 1 AS k) TO '{part}' (OVERWRITE)",
    "COPY (SELECT 1 AS k) TO '{part}' (USE_TMP_FILE false)",
    "COPY (SELECT 1) TO '{data}/new.csv'",
    "COPY (SELECT 1) TO '{data}/blob/../x.csv'",
    "EXPORT DATABASE '{data}/exported'",
    "ATTACH '{data}/consensus.sqlite' AS s",
    "SELECT count(*) FROM read_blob('{data}/consensus.sqlite')",
    "SELECT count(*) FROM read_parquet('{part}')",
    "SELECT count(*) FROM glob('{data}/**')",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
])
def test_query_cannot_touch_the_store(capsys, store, sql):
    before = digest(store)
    rc, out, err = q(capsys, store, sql.format(data=store, part=part_path(store)))
    assert rc == 1 and err.startswith("shardflow: error: query: ") and err.count("\n") == 1, err
    assert digest(store) == before
    assert (store / "consensus.sqlite").read_bytes()[:16] == b"SQLite format 3\x00"
    assert q(capsys, store, "SELECT sum(k) FROM c")[1] == '"sum(k)"\n6\n'


def test_other_files_stay_readable_and_writable(capsys, store):
    out_dir = store.parent / "out"
    rc, out, err = q(capsys, store, f"COPY (SELECT k FROM c ORDER BY k) TO '{out_dir}/c.csv'")
    assert rc == 0, err
    assert (out_dir / "c.csv").read_text() == "k\n1\n2\n3\n"
    rc, out, err = q(capsys, store, f"SELECT a + (SELECT sum(k) FROM c) AS s FROM read_csv('{out_dir}/in.csv')")
    assert (rc, out) == (0, '"s"\n13\n'), err


def test_output_file_inside_the_store_is_refused(capsys, store):
    before = digest(store)
    rc, out, err = q(capsys, store, "SELECT 1", "-o", str(store / "consensus.sqlite"))
    assert rc == 1 and "inside the store" in err, err
    assert digest(store) == before

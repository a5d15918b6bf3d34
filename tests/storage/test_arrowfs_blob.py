"""ArrowFsBlob on the local filesystem, through the same interface as LocalBlob.

Three flavours: `pyarrow.fs.LocalFileSystem` (which hands DuckDB local paths),
a wrapper that returns None from `local_path` (so reads go through
`client.parts.read`: fetch, verify, decode to Arrow, as on S3), and an fsspec
filesystem wrapped in `pyarrow.fs.PyFileSystem(FSSpecHandler(...))` when fsspec
is installed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

import storage
from storage.blob import ArrowFsBlob, Blob, LocalBlob

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


class RemoteLikeBlob(ArrowFsBlob):
    """ArrowFsBlob that pretends not to be local: no path for DuckDB, bytes only."""

    def local_path(self, key: str) -> str | None:
        return None


def _fsspec_blob(base: str) -> Blob:
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return ArrowFsBlob(PyFileSystem(FSSpecHandler(fsspec.filesystem("file"))), base)


FACTORIES: dict[str, Callable[[str], Blob]] = {
    "local-blob": lambda base: LocalBlob(base, fsync=False),
    "arrowfs-local": lambda base: ArrowFsBlob(pafs.LocalFileSystem(), base),
    "arrowfs-no-local-path": lambda base: RemoteLikeBlob(pafs.LocalFileSystem(), base),
    "arrowfs-fsspec": _fsspec_blob,
}


@pytest.fixture(params=list(FACTORIES))
def make_blob(request: pytest.FixtureRequest, tmp_path) -> Callable[[], Blob]:  # noqa: ANN001
    return lambda: FACTORIES[request.param](str(tmp_path / "blob"))


def test_blob_interface(make_blob: Callable[[], Blob]) -> None:
    b = make_blob()
    assert b.get("s1/missing") is None
    b.put("s1/a.parquet", b"hello")
    b.put("s1/sub/b.parquet", b"x" * 1000)
    b.put("s2/c.parquet", b"")
    assert b.get("s1/a.parquet") == b"hello" and b.get("s2/c.parquet") == b""
    metas = {m.key: m for m in b.list("s1/")}
    assert set(metas) == {"s1/a.parquet", "s1/sub/b.parquet"}
    assert metas["s1/sub/b.parquet"].size == 1000
    assert abs(metas["s1/a.parquet"].mtime_s - time.time()) < 60
    assert {m.key for m in b.list()} >= {"s1/a.parquet", "s1/sub/b.parquet", "s2/c.parquet"}
    b.delete("s1/a.parquet")
    b.delete("s1/a.parquet")  # deleting a missing key is fine
    assert b.get("s1/a.parquet") is None
    assert {m.key for m in b.list("s1/")} == {"s1/sub/b.parquet"}
    assert list(b.list("nope/")) == []
    for bad in ("/abs", "a/../b"):
        with pytest.raises(ValueError):
            b.put(bad, b"x")
    p = b.local_path("s1/sub/b.parquet")
    if p is not None:
        assert open(p, "rb").read() == b"x" * 1000
    # No temporary files are left behind by put.
    assert not [m.key for m in b.list() if "/.tmp-" in m.key]


def test_arrowfs_local_path_only_for_local_filesystems(tmp_path) -> None:  # noqa: ANN001
    local = ArrowFsBlob(pafs.LocalFileSystem(), str(tmp_path / "a"))
    assert local.local_path("k/x") == str(tmp_path / "a" / "k" / "x")
    assert RemoteLikeBlob(pafs.LocalFileSystem(), str(tmp_path / "b")).local_path("k/x") is None


def _updates(i: int, n: int = 50) -> pa.Table:
    return pa.table({
        "k": [f"k{j % 17}" for j in range(n)], "v": [i * 1000 + j for j in range(n)],
        "_time": [i] * n, "_diff": [1 if j % 5 else -1 for j in range(n)],
    })


def test_full_shard_lifecycle_on_blob(make_blob: Callable[[], Blob], tmp_path) -> None:  # noqa: ANN001
    blob = make_blob()
    client = storage.open(tmp_path / "root", blob=blob)
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    for i in range(8):
        w.compare_and_append(_updates(i), i, i + 1)
    with client.open_leased_reader(shard) as r:
        before = {as_of: r.snapshot(as_of, validate=False).sort_by([("k", "ascending"), ("v", "ascending")]) for as_of in (0, 3, 7)}
        assert before[7].num_rows == 8 * 50
        assert client.compact(shard).merges_applied >= 1
        assert len(client.state(shard).batches) < 8
        for as_of, t in before.items():
            assert r.snapshot(as_of, validate=False).sort_by([("k", "ascending"), ("v", "ascending")]).equals(t)
        # listen reads through the same path.
        events = list(r.listen(3, timeout=0.2))
        got = pa.concat_tables([e.table for e in events if isinstance(e, storage.UpdateBatch)])
        assert got.num_rows == 4 * 50
    assert client.gc(shard).parts_deleted > 0
    assert {m.key for m in blob.list(f"{shard}/")} == {p.key for b in client.state(shard).batches for p in b.parts}
    assert client.verify(shard).ok
    # A flipped byte is caught on this path too, and never yields a wrong answer.
    part = client.state(shard).batches[0].parts[0]
    data = bytearray(blob.get(part.key))  # type: ignore[arg-type]
    data[len(data) // 2] ^= 0x10
    blob.delete(part.key)
    blob.put(part.key, bytes(data))
    with client.open_leased_reader(shard) as r, pytest.raises(storage.CorruptPart, match=part.key):
        r.snapshot(7)
    assert not client.verify(shard).ok
    client.finalize(shard)
    assert list(blob.list(f"{shard}/")) == []
    client.close()


def test_remote_like_blob_never_hands_duckdb_a_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    blob = RemoteLikeBlob(pafs.LocalFileSystem(), str(tmp_path / "blob"))
    client = storage.open(tmp_path / "root", blob=blob)
    calls = []
    orig = client.parts.read
    monkeypatch.setattr(client.parts, "read", lambda *a: calls.append(a[2].key) or orig(*a))
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    w.compare_and_append(_updates(0), 0, 1)
    w.compare_and_append(_updates(1), 1, 2)
    with client.open_leased_reader(shard) as r:
        assert r.snapshot(1, validate=False).num_rows == 100
    assert len(calls) == 2
    assert not os.path.exists(tmp_path / "root" / "blob")  # the default LocalBlob was never used
    client.close()

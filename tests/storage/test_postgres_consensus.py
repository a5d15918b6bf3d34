"""PostgresConsensus: same contract as SqliteConsensus, atomic multi-key CAS, 4 racing processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

import storage
from storage import state as st
from storage.consensus import CasOp, PostgresConsensus, SqliteConsensus, VersionedData

SCHEMA = pa.schema([("p", pa.int64()), ("i", pa.int64())])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def consensus(request: pytest.FixtureRequest, tmp_path):  # noqa: ANN001, ANN201
    if request.param == "sqlite":
        c = SqliteConsensus(tmp_path / "c.sqlite")
    else:
        c = PostgresConsensus(request.getfixturevalue("pg_dsn"))
    yield c
    c.close()


def _v(seqno: int, data: bytes = b"x") -> VersionedData:
    return VersionedData(seqno, data)


def test_cas_scan_truncate(consensus) -> None:  # noqa: ANN001
    c = consensus
    assert c.head("a") is None
    assert c.compare_and_set("a", None, _v(0, b"a0"))
    assert not c.compare_and_set("a", None, _v(0, b"again"))  # already exists
    assert c.compare_and_set("a", 0, _v(1, b"a1"))
    assert not c.compare_and_set("a", 0, _v(1, b"lost"))  # lost race
    assert c.head("a") == _v(1, b"a1")
    for s in range(2, 6):
        assert c.compare_and_set("a", s - 1, _v(s, b"a%d" % s))
    assert [v.seqno for v in c.scan("a", 2, limit=2)] == [2, 3]
    assert c.truncate("a", 4) == 4
    assert [v.seqno for v in c.scan("a", 0)] == [4, 5]
    assert c.truncate("a", 99) == 0  # never truncates away the head
    assert c.head("a").seqno == 5  # type: ignore[union-attr]
    c.compare_and_set("b_x", None, _v(0))
    assert c.list_keys("a") == ["a"] and c.list_keys("b_") == ["b_x"] and c.list_keys("b%") == []


def test_compare_and_set_many_is_all_or_nothing(consensus) -> None:  # noqa: ANN001
    c = consensus
    assert c.compare_and_set_many([CasOp("t1", None, _v(0)), CasOp("t2", None, _v(0))])
    assert c.compare_and_set_many([CasOp("t1", 0, _v(1, b"t1")), CasOp("t2", 0, _v(1, b"t2"))])
    # The second op's expectation is stale: neither key moves.
    ok = c.compare_and_set_many([CasOp("t1", 1, _v(2, b"new")), CasOp("t2", 0, _v(1, b"stale"))])
    assert not ok
    assert c.head("t1") == _v(1, b"t1") and c.head("t2") == _v(1, b"t2")
    # A failing *first* op also leaves the others alone (and a brand-new key absent).
    assert not c.compare_and_set_many([CasOp("t1", 0, _v(1)), CasOp("t3", None, _v(0))])
    assert c.head("t3") is None
    assert c.compare_and_set_many([CasOp("t1", 1, _v(2)), CasOp("t2", 1, _v(2)), CasOp("t3", None, _v(0))])
    assert (c.head("t1").seqno, c.head("t2").seqno, c.head("t3").seqno) == (2, 2, 0)  # type: ignore[union-attr]


@pytest.mark.postgres
def test_storage_open_with_postgres_url(pg_dsn: str, tmp_path) -> None:  # noqa: ANN001
    client = storage.open(tmp_path, consensus=pg_dsn)
    assert isinstance(client.consensus, PostgresConsensus)
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=SCHEMA, compact=False)
    for t in range(12):
        w.compare_and_append(pa.table({"p": [0], "i": [t], "_time": [t], "_diff": [1]}), t, t + 1)
    client.compact(shard)
    assert client.gc(shard).parts_deleted > 0
    # A second client (another "machine") sees the same shard.
    other = storage.open(tmp_path, consensus=pg_dsn)
    with other.open_leased_reader(shard) as r:
        assert sorted(x["i"] for x in r.snapshot(11).to_pylist()) == list(range(12))
    client.finalize(shard)
    with pytest.raises(storage.Tombstone):
        other.open_writer(shard)
    other.close()
    client.close()


CHILD = textwrap.dedent(
    """
    import sys
    import pyarrow as pa
    import storage
    root, dsn, shard, p, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    client = storage.open(root, consensus=dsn)
    w = client.open_writer(shard, compact=False, writer_id=f"proc{p}")
    upper = w.upper.time
    for i in range(n):
        while True:
            t = pa.table({"p": [p], "i": [i], "_time": [upper], "_diff": [1]})
            try:
                w.compare_and_append(t, upper, upper + 1)
            except storage.UpperMismatch as e:
                upper = e.current.time  # retry at the new upper
                continue
            print(f"ACK {p} {i} {upper} {upper + 1}", flush=True)
            upper += 1
            break
    client.close()
    """
)


@pytest.mark.postgres
def test_four_processes_compare_and_append(pg_dsn: str, tmp_path) -> None:  # noqa: ANN001
    procs, n = 4, 25
    root = str(tmp_path)
    shard = storage.ShardId.new()
    client = storage.open(root, consensus=pg_dsn)
    client.open_writer(shard, schema=SCHEMA, compact=False)  # create it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, root, pg_dsn, shard, str(p), str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for p in range(procs)
    ]
    acks: dict[tuple[int, int], tuple[int, int]] = {}
    for c in children:
        out, err = c.communicate(timeout=240)
        assert c.returncode == 0, err
        for line in out.splitlines():
            _, p, i, lo, hi = line.split()
            acks[(int(p), int(i))] = (int(lo), int(hi))
    assert len(acks) == procs * n
    s = client.state(shard)
    st.check_invariants(s)
    # One contiguous chain of batches, one per acknowledged append, at the acknowledged bounds.
    assert [(b.lower.time, b.upper.time) for b in s.batches] == [(t, t + 1) for t in range(procs * n)]
    assert sorted(acks.values()) == [(t, t + 1) for t in range(procs * n)]
    # Every acknowledged batch is present exactly once, at its acknowledged time.
    with client.open_leased_reader(shard) as r:
        rows = r.snapshot(procs * n - 1).to_pylist()
        assert sorted((x["p"], x["i"], x["_diff"]) for x in rows) == sorted((p, i, 1) for p, i in acks)
        for (p, i), (lo, _hi) in list(acks.items())[:: max(1, len(acks) // 10)]:
            at = r.snapshot(lo).to_pylist()
            assert {"p": p, "i": i, "_diff": 1} in at and len(at) == lo + 1
    # The history: every version extends the previous one's chain (no batch ever vanished).
    prev: tuple[st.BatchMeta, ...] = ()
    for v in client.consensus.scan(f"shard/{shard}", 0, limit=10_000):
        cur = st.ShardState.decode(v.data, "test").batches
        assert cur[: len(prev)] == prev
        prev = cur
    client.close()

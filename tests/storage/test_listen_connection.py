"""listen keeps one DuckDB connection across its polls (issue 13: one per poll cost up to ~80 ms)."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import storage
from storage import Frontier, Progress, ShardId, connections

SCHEMA = pa.schema([("k", pa.string())])


def upd(keys: list[str], t: int, diff: int = 1) -> pa.Table:
    n = len(keys)
    return pa.table({"k": pa.array(keys, pa.string()), "_time": pa.array([t] * n, pa.int64()),
                     "_diff": pa.array([diff] * n, pa.int64())})


def test_listen_polls_reuse_one_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Polled as the shard source and `follow` poll it (a new `listen(..., timeout=0)` each
    time), a reader opens one cursor, not one per poll; what it yields stays exact."""
    opened: list[duckdb.DuckDBPyConnection] = []
    orig = connections.cursor

    def counting() -> duckdb.DuckDBPyConnection:
        con = orig()
        opened.append(con)
        return con

    monkeypatch.setattr(connections, "cursor", counting)
    client = storage.open(str(tmp_path), fsync=False)
    try:
        shard = ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA, compact=False)
        got: list[tuple[str, int, int]] = []
        with client.open_leased_reader(shard) as r:
            frontier = 0
            for t in range(12):
                w.compare_and_append(upd(["a", "b", "a"] if t % 3 else ["a"], t, 1 if t % 4 else -1), t, t + 1)
                for ev in r.listen(max(frontier - 1, 0), timeout=0):
                    if isinstance(ev, Progress):
                        frontier = ev.frontier.time
                    else:
                        got += [(x["k"], x["_time"], x["_diff"]) for x in ev.table.to_pylist()]
            assert len(opened) == 1
        # Consolidated per (row, time), as before: t % 3 != 0 wrote "a" twice.
        want = sorted((k, t, (1 if t % 4 else -1) * c) for t in range(1, 12)
                      for k, c in ({"a": 2, "b": 1} if t % 3 else {"a": 1}).items())
        assert sorted(got) == want
    finally:
        client.close()


def test_listens_on_two_threads_of_one_handle(tmp_path: Path) -> None:
    """Two threads listening through one handle at once each read through a connection of their own."""
    client = storage.open(str(tmp_path), fsync=False)
    try:
        shard = ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA, compact=False)
        for t in range(30):
            w.compare_and_append(upd([f"k{t}"], t), t, t + 1)
        w.compare_and_append(upd([], 30), 30, Frontier.EMPTY)
        with client.open_leased_reader(shard) as r:
            out: dict[int, list[str]] = {}

            def run(j: int) -> None:
                keys: list[str] = []
                for ev in r.listen(j, timeout=5):
                    if not isinstance(ev, Progress):
                        keys += ev.table.column("k").to_pylist()
                out[j] = keys

            ts = [threading.Thread(target=run, args=(j,)) for j in (0, 5)]
            for th in ts:
                th.start()
            for th in ts:
                th.join()
        assert sorted(out[0]) == sorted(f"k{t}" for t in range(1, 30))
        assert sorted(out[5]) == sorted(f"k{t}" for t in range(6, 30))
    finally:
        client.close()

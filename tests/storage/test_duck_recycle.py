"""Long-lived DuckDB databases are reopened every N queries (bench/soak.py: flat RSS).

A DuckDB database keeps native memory per query until it is closed (~0.7 KB per
Arrow-scanning query with DuckDB 2.0.1), so the per-thread connection that every
consolidation uses (`storage.connections.thread_connection`) and the controller's
`DesiredStore` are replaced every so many queries. What was stored or already
returned must survive the swap.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from storage import connections, consolidate
from storage.controller.desired import DesiredStore

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64()), ("_time", pa.int64()), ("_diff", pa.int64())])


def test_consolidate_recycles_its_duckdb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "RECYCLE_QUERIES", 5)
    t = pa.Table.from_pylist(
        [{"k": k, "v": v, "_time": 3, "_diff": d} for k, v, d in [("a", 1, 1), ("a", 1, 1), ("b", 2, 1), ("b", 2, -1)]],
        schema=SCHEMA,
    )
    seen: list[duckdb.DuckDBPyConnection] = []
    outs = []
    for _ in range(23):
        outs.append(consolidate(t))
        con = connections.thread_connection()  # the connection the next query on this thread gets
        if not seen or seen[-1] is not con:
            seen.append(con)
    assert len(seen) >= 9  # 46 calls (23 consolidations + 23 peeks), 5 per database
    for old in seen[:-1]:
        with pytest.raises(duckdb.ConnectionException):
            old.execute("SELECT 1")
    assert all(o.to_pylist() == [{"k": "a", "v": 1, "_time": 3, "_diff": 2}] for o in outs)


def test_desired_store_reopens_and_keeps_its_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "RECYCLE_QUERIES", 3)
    schema = pa.schema([("k", pa.string())])
    ds = DesiredStore(None)
    try:
        ds.register("x", schema)
        cons = [ds.con]  # kept alive, so each new connection is a new object
        for i in range(20):
            ds.append("x", pa.table({"k": [f"r{i}"], "_diff": pa.array([1], pa.int64())}))
            if i % 2:
                ds.persisted_is_desired("x")
            if ds.con is not cons[-1]:
                cons.append(ds.con)
        assert len(cons) > 5  # reopened several times
        assert sorted(ds.desired("x").column("k").to_pylist()) == sorted(f"r{i}" for i in range(20))
        # persisted was last set at i == 19: desired - persisted is empty
        assert ds.corrections("x").num_rows == 0
    finally:
        ds.close()

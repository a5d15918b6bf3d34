"""The one consolidation query (`updates.consolidate_sql`) in each of its modes, and the one CAS loop."""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pytest

from storage import machine
from storage.errors import CasRetriesExhausted, DiffOverflow
from storage.updates import INT64_MAX, consolidate_sql, overflow_checked

A = pa.table({"k": ["a", "a", "b", "c"], "_time": [1, 3, 2, 9], "_diff": [1, 1, 1, 1]})
B = pa.table({"k": ["a", "b"], "_time": [2, 2], "_diff": [1, 1]})


def run(sql: str, **tables: pa.Table) -> list[tuple[Any, ...]]:
    con = duckdb.connect()
    for name, t in tables.items():
        con.register(name, t)
    with overflow_checked():
        return sorted(con.sql(sql).fetchall())


@pytest.mark.parametrize(
    "kw, expect",
    [
        ({}, [("a", 1, 1), ("a", 3, 1), ("b", 2, 1), ("c", 9, 1)]),
        ({"since": 5}, [("a", 5, 2), ("b", 5, 1), ("c", 9, 1)]),
        ({"as_of": 3}, [("a", 2), ("b", 1)]),
        ({"drop_time": True}, [("a", 2), ("b", 1), ("c", 1)]),
        ({"minus": "b"}, [("a", 1, 1), ("a", 2, -1), ("a", 3, 1), ("c", 9, 1)]),
        ({"minus": "b", "since": 5}, [("a", 5, 1), ("c", 9, 1)]),
        ({"minus": "b", "as_of": 3}, [("a", 1)]),
        ({"minus": "b", "drop_time": True}, [("a", 1), ("c", 1)]),
    ],
)
def test_modes(kw: dict[str, Any], expect: list[tuple[Any, ...]]) -> None:
    assert run(consolidate_sql("a", ["k"], where="t", **kw), a=A, b=B) == expect


def test_no_row_columns() -> None:
    t = pa.table({"_time": [1, 2], "_diff": [2, -1]})
    assert run(consolidate_sql("t", [], where="t", as_of=5), t=t) == [(1,)]
    assert run(consolidate_sql("t", [], where="t", as_of=1), t=t) == [(2,)]
    assert run(consolidate_sql("t", [], where="t", minus="t", drop_time=True), t=t) == []


def test_order_by_time_and_overflow() -> None:
    sql = consolidate_sql("a", ["k"], where="t", order_by_time=True)
    assert sql.endswith("ORDER BY _time")
    big = pa.table({"k": ["x", "x"], "_time": [1, 1], "_diff": [INT64_MAX, 1]})
    with pytest.raises(DiffOverflow, match="shard z"):
        run(consolidate_sql("big", ["k"], where="shard z"), big=big)


def test_cas_retry_backs_off_until_done_or_exhausted(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[int] = []
    monkeypatch.setattr(machine, "cas_backoff", slept.append)
    outcomes = iter([None, None, "won"])
    assert machine.cas_retry(lambda: next(outcomes)) == "won"
    assert slept == [1, 2]
    with pytest.raises(CasRetriesExhausted):
        machine.cas_retry(lambda: None, max_attempts=3)

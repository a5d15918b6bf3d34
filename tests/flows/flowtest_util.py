"""Helpers shared by the flows tests (a uniquely named module: `conftest` names collide across dirs)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def upd(rows: list[tuple[Any, int, int]], col: str = "k", typ: pa.DataType = pa.string()) -> pa.Table:
    """A table of updates from (value, time, diff) triples."""
    return pa.table(
        {
            col: pa.array([r[0] for r in rows], typ),
            "_time": pa.array([r[1] for r in rows], pa.int64()),
            "_diff": pa.array([r[2] for r in rows], pa.int64()),
        }
    )


def rows_of(t: pa.Table) -> list[tuple]:
    """Sorted (row..., time, diff) tuples of a table."""
    cols = t.schema.names
    return sorted(tuple(r[c] for c in cols) for r in t.to_pylist())

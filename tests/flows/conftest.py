"""Helpers for flows tests: run a flow under run_main and a 2-worker cluster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import cluster_main, run_main

RUNNERS: dict[str, Callable[[Dataflow], None]] = {
    "run_main": lambda f: run_main(f),
    "cluster2": lambda f: cluster_main(f, [], 0, worker_count_per_proc=2),
}


@pytest.fixture(params=sorted(RUNNERS))
def runner(request: pytest.FixtureRequest) -> Callable[[Dataflow], None]:
    return RUNNERS[request.param]


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

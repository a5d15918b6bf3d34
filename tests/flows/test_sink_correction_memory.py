"""persist_sink: a correction that runs out of DuckDB memory is retried with more, not lost."""

from __future__ import annotations

from pathlib import Path

import bytewax.operators as op
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

import flows.sinks as sinks
import storage
from flows.sinks import persist_sink
from storage import Frontier, Progress, UpdateBatch


def test_big_correction_in_a_small_duckdb_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1M distinct rows against foreign contents: the correction is a GROUP BY that does not
    fit 16 MB; it is retried with 32, then 64 MB and the shard ends up equal to desired."""
    monkeypatch.setattr(sinks, "SINK_MEMORY_MB", 16)
    client = storage.open(tmp_path, fsync=False)
    shard = str(storage.ShardId.new())
    w = client.open_writer(shard, pa.schema([("k", pa.int64())]))
    w.compare_and_append(pa.table({"k": [-1], "_time": [0], "_diff": [1]}), 0, 1)  # foreign: corrected away
    n = 1_000_000
    k = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), n)), pa.scalar(1, pa.int64()))
    t = pa.table([k, pa.repeat(pa.scalar(1, pa.int64()), n), pa.repeat(pa.scalar(1, pa.int64()), n)],
                 names=["k", "_time", "_diff"])
    out: list = []
    flow = Dataflow("corr")
    s = op.input("in", flow, TestingSource([UpdateBatch(t), Progress(Frontier(2))]))
    op.output("out", persist_sink("sink", s, client, shard), TestingSink(out))
    run_main(flow)
    assert out[0].corrected
    with client.open_leased_reader(shard) as r:
        snap = r.snapshot(1, timeout=0)
    assert snap.num_rows == n and pc.min(snap.column("k")).as_py() == 0
    assert pc.sum(snap.column("k")).as_py() == n * (n - 1) // 2

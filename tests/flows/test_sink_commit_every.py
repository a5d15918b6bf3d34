"""persist_sink(commit_every=...): fewer, larger appends with the same contents and offsets; batch jobs use it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from faults_util import FLOW, ROOT, assert_exact, counter_values, shardflow
from flowtest_util import upd

import storage
from flows.operators import consolidate
from flows.sinks import OFFSETS_KEY, persist_sink
from storage import Frontier, Progress, UpdateBatch

SCHEMA = pa.schema([("k", pa.string())])


def run_sink(tmp_path: Path, commit_every: float | None) -> tuple[list, Counter, dict, int]:
    client = storage.open(tmp_path / "d", fsync=False)
    shard = str(storage.ShardId.new())
    items: list = []
    for i in range(6):
        rows = [(f"k{i % 4}", i, 1), (f"k{i % 4}", i, 1)] + ([(f"k{(i - 1) % 4}", i, -1)] if i % 2 else [])
        items.append(UpdateBatch(upd(rows), offsets={"s/0": i}))
        items.append(Progress(Frontier(i + 1), "s/0", ("s/0",)))
    out: list = []
    flow = Dataflow("every")
    s = consolidate("cons", op.input("in", flow, TestingSource(items)))
    op.output("out", persist_sink("sink", s, client, shard, schema=SCHEMA, commit_every=commit_every), TestingSink(out))
    run_main(flow)
    st = client.state(shard)
    with client.open_leased_reader(shard) as r:
        snap = Counter({x["k"]: x["_diff"] for x in r.snapshot(5, timeout=0).to_pylist()})
    return out, snap, dict(st.metadata[OFFSETS_KEY]), len(st.batches)


def test_commit_every_appends_once_at_the_end_with_the_same_contents(tmp_path: Path) -> None:
    each, snap_each, offs_each, _ = run_sink(tmp_path / "a", None)
    once, snap_once, offs_once, nbatches = run_sink(tmp_path / "b", 3600)
    assert len(each) == 6
    assert [(c.lower, c.upper) for c in once] == [(Frontier(0), Frontier(6))]
    assert sum(c.rows for c in once) == sum(c.rows for c in each)
    assert snap_once == snap_each and offs_once == offs_each == {"s/0": 5}
    assert nbatches == 1


def test_batch_run_appends_once_per_interval(tmp_path: Path) -> None:
    """A batch job's sinks commit every BATCH_COMMIT_EVERY seconds and at the end: 30 quick ticks, one batch."""
    r = shardflow("run", "--data", str(tmp_path / "d"), FLOW)
    assert r.returncode == 0, r.stderr
    assert "300 rows in 1 batches" in r.stdout, r.stdout
    assert_exact(counter_values(tmp_path / "d"), 10)
    r = shardflow("run", "--data", str(tmp_path / "e"), FLOW, env={"SHARDFLOW_BATCH_COMMIT_EVERY": "0"})
    assert r.returncode == 0, r.stderr
    assert int(re.search(r"300 rows in (\d+) batches", r.stdout).group(1)) > 1, r.stdout  # type: ignore[union-attr]


def test_killed_batch_run_with_commit_every_resumes_exactly(tmp_path: Path) -> None:
    """SIGKILL between interval commits; the rerun redoes what was not committed, nothing twice."""
    data = tmp_path / "d"
    env = {"SHARDFLOW_BATCH_COMMIT_EVERY": "0.3", "COUNTER_TICKS": "100000", "RUST_BACKTRACE": "0"}
    cmd = [sys.executable, "-m", "flows.cli", "run", "--data", str(data), FLOW]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    seen: list[int] = []
    while time.monotonic() < deadline and len(seen) < 200:
        time.sleep(0.2)
        seen = counter_values(data) if data.exists() else []
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = counter_values(data)
    assert 200 <= len(before) < 1_000_000
    r = shardflow("run", "--data", str(data), FLOW, env={**env, "COUNTER_TICKS": str(len(before) // 10 + 50)})
    assert r.returncode == 0, r.stderr
    after = counter_values(data)
    assert_exact(after, 10)
    assert len(after) == (len(before) // 10 + 50) * 10

"""`consolidate` spilling its pending updates to DuckDB: the same output as in memory, no files left."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import bytewax.operators as op
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from faults_util import ROOT, assert_exact, counter_values, shardflow
from flowtest_util import rows_of, upd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.operators import consolidate
from storage import Frontier, Progress, UpdateBatch
from storage.errors import InvalidInput

PREFIX = "shardflow-consolidate-"


def run(items: list, spill_bytes: int | None, probe: list | None = None) -> list:
    out: list = []
    flow = Dataflow("c")
    s = consolidate("cons", op.input("in", flow, TestingSource(items)), spill_bytes=spill_bytes)
    if probe is not None:
        # What the temp dir holds each time an item comes out.
        s = op.inspect("probe", s, lambda _id, _x: probe.append(spill_dirs()))
    op.output("out", s, TestingSink(out))
    run_main(flow)
    return out


def spill_dirs() -> list[str]:
    return sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith(PREFIX))


def normal(out: list) -> list:
    """Items as comparable values: batches by bounds, sorted rows and offsets; progress as is."""
    res = []
    for x in out:
        if isinstance(x, UpdateBatch):
            res.append(("batch", x.lower, x.upper, rows_of(x.table), x.offsets))
        else:
            res.append(("progress", x.frontier, x.partition))
    return res


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp dir of the test's own, so other processes' spills do not show."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


updates = st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 12), st.sampled_from([1, 1, 2, -1])), max_size=12)
step = st.one_of(
    updates.map(lambda rows: ("data", rows)),
    st.tuples(st.sampled_from(["s/0", "s/1"]), st.integers(0, 14)).map(lambda p: ("progress", p)),
)


def build_items(steps: list) -> list:
    items: list = []
    for i, (kind, v) in enumerate(steps):
        if kind == "data":
            items.append(UpdateBatch(upd(v), offsets={"s/0": i}))
        else:
            items.append(Progress(Frontier(v[1]), v[0], ("s/0", "s/1")))
    # End like a batch source: past every time.
    items.append(Progress(Frontier(13), "s/0", ("s/0", "s/1")))
    items.append(Progress(Frontier(13), "s/1", ("s/0", "s/1")))
    return items


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, max_size=10), spill_bytes=st.sampled_from([0, 1, 300]))
def test_spilled_output_equals_in_memory(private_tmp: Path, steps: list, spill_bytes: int) -> None:
    """Duplicates, retractions, late and beyond-frontier updates, partitions: the same items
    come out whether the pending updates stay in memory or move to DuckDB (0 bytes: at the
    first update; 300: after a few batches, so some flushes are mixed)."""
    items = build_items(steps)
    assert normal(run(items, spill_bytes)) == normal(run(items, 1 << 40))
    assert spill_dirs() == []


def test_spill_file_lives_while_updates_wait_then_goes(private_tmp: Path) -> None:
    items = [
        UpdateBatch(upd([("a", 1, 1), ("a", 1, 1), ("b", 9, 1), ("c", 2, -1)]), offsets={"s/0": 0}),
        Progress(Frontier(5)),
        UpdateBatch(upd([("b", 9, -1), ("d", 7, 1)]), offsets={"s/0": 1}),
        Progress(Frontier(10)),
    ]
    probe: list = []
    out = run(items, 0, probe)
    assert normal(out) == [
        ("batch", Frontier(0), Frontier(5), [("a", 1, 2), ("c", 2, -1)], None),
        ("progress", Frontier(5), None),
        ("batch", Frontier(5), Frontier(10), [("d", 7, 1)], {"s/0": 1}),
        ("progress", Frontier(10), None),
    ]
    # "b" at 9 waited in the file past the first flush; the second flush took everything.
    assert len(probe[0]) == 1 and probe[0] == probe[1]
    assert probe[2] == probe[3] == []
    assert spill_dirs() == []


def test_in_memory_below_threshold_makes_no_file(private_tmp: Path) -> None:
    probe: list = []
    run([UpdateBatch(upd([("a", 1, 1), ("b", 9, 1)])), Progress(Frontier(5)), Progress(Frontier(10))], None, probe)
    assert all(p == [] for p in probe)


def test_spill_rejects_a_changed_schema(private_tmp: Path) -> None:
    items = [UpdateBatch(upd([("a", 1, 1)])), UpdateBatch(upd([(1, 1, 1)], typ=pa.int64())), Progress(Frontier(5))]
    with pytest.raises(Exception) as ei:  # noqa: PT011 - bytewax wraps it; the cause is checked
        run(items, 0)
    e: BaseException | None = ei.value
    while e is not None and not isinstance(e, InvalidInput):
        e = e.__cause__
    assert e is not None and str(e).startswith("step 'c.cons': an update batch's schema"), ei.value
    del e, ei  # the traceback holds the operator; once it goes, so does the file
    gc.collect()
    assert spill_dirs() == []


KILLED = textwrap.dedent(
    """
    import sys, time, tempfile
    sys.path.insert(0, {root!r})
    tempfile.tempdir = {tmp!r}
    from datetime import datetime, UTC
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import DynamicSource, StatelessSourcePartition
    from bytewax.testing import TestingSink, run_main
    from flows.operators import consolidate
    from storage import Frontier, Progress, UpdateBatch
    import pyarrow as pa

    class Part(StatelessSourcePartition):
        def __init__(self):
            self.sent = False
        def next_batch(self):
            if self.sent:
                print("SPILLED", flush=True)
                time.sleep(0.05)
                return []
            self.sent = True
            t = pa.table({{"k": ["a"], "_time": [7], "_diff": [1]}})
            return [UpdateBatch(t), Progress(Frontier(1))]

    class Src(DynamicSource):
        def build(self, step_id, worker_index, worker_count):
            return Part()

    flow = Dataflow("k")
    op.output("out", consolidate("cons", op.input("in", flow, Src()), spill_bytes=0), TestingSink([]))
    run_main(flow)
    """
)


def test_a_killed_process_spill_is_removed_by_the_next(private_tmp: Path) -> None:
    """SIGKILL leaves the spill dir behind (nothing runs); the next spill removes it, keeping live ones."""
    code = KILLED.format(root=str(ROOT), tmp=str(private_tmp))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "SPILLED"
        left = spill_dirs()
        assert len(left) == 1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert spill_dirs() == left
    probe: list = []
    run([UpdateBatch(upd([("a", 1, 1), ("b", 9, 1)])), Progress(Frontier(5)), Progress(Frontier(10))], 0, probe)
    assert probe[0] and left[0] not in probe[0]  # the stale dir went; this run's own is there
    assert spill_dirs() == []


def test_killed_and_resumed_spilling_job_is_exact(tmp_path: Path) -> None:
    """The spill is scratch, not state: a SIGKILLed run that spilled every batch resumes from
    the sink's committed offsets, nothing lost or doubled."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    data = tmp_path / "data"
    env = {**os.environ, "TMPDIR": str(tmp), "SHARDFLOW_CONSOLIDATE_SPILL_MB": "0", "COUNTER_RATE": "50",
           "RUST_BACKTRACE": "0"}
    flow = str(ROOT / "tests" / "flows" / "loadgen_counter_flow.py")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--data", str(data), "--mode", "continuous", "--tick", "0.1",
           "--no-progress", flow]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(counter_values(data) if data.exists() else []) < 50:
        time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = counter_values(data)
    assert len(before) >= 50
    r = shardflow("run", "--data", str(data), flow, env={**env, "COUNTER_TICKS": str(len(before) // 10 + 20)})
    assert r.returncode == 0, r.stderr
    after = counter_values(data)
    assert_exact(after, 10)
    assert after[: len(before)] == before and len(after) == (len(before) // 10 + 20) * 10
    assert [n for n in os.listdir(tmp) if n.startswith(PREFIX)] == []


def test_a_flush_that_runs_out_of_memory_is_retried_with_more(private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1M distinct rows do not fit an 8 MB DuckDB (its hash aggregation cannot spill that
    small); the flush is retried with 16, then 32 MB, and comes out whole."""
    import pyarrow.compute as pc

    import flows.operators as ops

    monkeypatch.setattr(ops, "SPILL_MEMORY_MB", 8)
    n = 1_000_000
    k = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), n)), pa.scalar(1, pa.int64()))
    t = pa.table([k, pa.repeat(pa.scalar(1, pa.int64()), n), pa.repeat(pa.scalar(1, pa.int64()), n)],
                 names=["k", "_time", "_diff"])
    out = run([UpdateBatch(t), Progress(Frontier(2))], 0)
    got = out[0].table
    assert got.num_rows == n and pc.sum(got.column("k")).as_py() == n * (n - 1) // 2
    assert pc.min(got.column("_diff")).as_py() == pc.max(got.column("_diff")).as_py() == 1
    assert spill_dirs() == []

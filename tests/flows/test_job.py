from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest

import storage
from flows.job import open_controller, run_flow

HERE = os.path.dirname(os.path.abspath(__file__))
FLOW = os.path.join(HERE, "counter_flow.py")
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import counter_flow  # noqa: E402


def expected_at(t, parts, rows, ticks) -> Counter:
    c: Counter = Counter()
    for p in range(parts):
        for i in range(min(t, ticks - 1) + 1):
            for r in counter_flow.tick_table(p, i, rows).to_pylist():
                c[r["k"]] += r["_diff"]
    return Counter({k: v for k, v in c.items() if v})


def shard_at(client, shard, t) -> Counter:
    with client.open_leased_reader(shard) as r:
        return Counter({x["k"]: x["_diff"] for x in r.snapshot(t, timeout=5).to_pylist()})


def shard_of(client):
    ctl = open_controller(client, read_only=True)
    try:
        return str(ctl.collection(counter_flow.NAME).shard_id)
    finally:
        ctl.close()


def set_env(monkeypatch, **kw):
    for k, v in kw.items():
        monkeypatch.setenv(k, str(v))


@pytest.mark.parametrize("workers", [1, 2])
def test_batch_run_and_rerun(monkeypatch, workers):
    set_env(monkeypatch, COUNTER_TICKS=12, COUNTER_ROWS=5, COUNTER_PARTS=2)
    data = tempfile.mkdtemp(prefix="sf-job-")
    s = run_flow(FLOW, data, mode="batch", workers=workers)
    assert s.rows > 0 and s.frontiers["counter"] == 12 and s.batches >= 1
    client = storage.open(data)
    shard = shard_of(client)
    for t in range(12):
        assert shard_at(client, shard, t) == expected_at(t, 2, 5, 12)
    # A second batch run resumes after the committed offsets: nothing new, nothing doubled.
    s2 = run_flow(FLOW, data, mode="batch", workers=workers)
    assert s2.rows == 0
    assert shard_at(client, shard, 11) == expected_at(11, 2, 5, 12)


RUNNER = (
    "import sys; sys.path.insert(0, {here!r}); from flows.job import run_flow; "
    "s = run_flow({flow!r}, {data!r}, mode='continuous', workers={w}, configure=lambda c: print('READY', flush=True)); "
    "print('SUMMARY', s, flush=True)"
)


def start_job(data, env, workers=1):
    code = RUNNER.format(here=HERE, flow=FLOW, data=data, w=workers)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_upper(client, data, target, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.state(shard_of(client)).upper.time >= target:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"upper did not reach {target}")


def crash_loop(trials, seed, ticks=40, rows=20, interval=0.03):
    rnd = random.Random(seed)
    data = tempfile.mkdtemp(prefix="sf-kill-")
    env = dict(os.environ, COUNTER_TICKS=str(ticks), COUNTER_ROWS=str(rows), COUNTER_PARTS="2",
               COUNTER_INTERVAL=str(interval), RUST_BACKTRACE="0")
    for _ in range(trials):
        p = start_job(data, env, workers=rnd.choice([1, 2]))
        time.sleep(rnd.uniform(0.3, 2.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
    # Last run: let it finish its input, then stop it gracefully.
    p = start_job(data, env)
    assert p.stdout.readline().strip() == "READY"
    client = storage.open(data)
    wait_upper(client, data, ticks)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-3000:]
    assert "SUMMARY" in out
    shard = shard_of(client)
    assert client.state(shard).upper.time == ticks
    for t in range(ticks):
        assert shard_at(client, shard, t) == expected_at(t, 2, rows, ticks), t


def test_sigterm_flushes_and_exits_zero():
    data = tempfile.mkdtemp(prefix="sf-term-")
    env = dict(os.environ, COUNTER_TICKS="1000000", COUNTER_ROWS="5", COUNTER_INTERVAL="0.01", RUST_BACKTRACE="0")
    p = start_job(data, env, workers=2)
    assert p.stdout.readline().strip() == "READY"
    client = storage.open(data)
    wait_upper(client, data, 5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-3000:]
    up = client.state(shard_of(client)).upper.time
    assert up >= 5
    # everything emitted before the stop is committed: the upper is the final Progress
    assert shard_at(client, shard_of(client), up - 1) == expected_at(up - 1, 2, 5, 10**6)


def test_sigkill_crash_loop_quick():
    crash_loop(trials=3, seed=7)


@pytest.mark.slow
def test_sigkill_crash_loop_slow():
    crash_loop(trials=12, seed=11, ticks=80)


def test_type_error_opening_the_controller_propagates_and_never_fences(monkeypatch):
    """A TypeError inside `StorageController.open` is the job's error: no retry, no take-over.

    (An earlier build retried with the default `fence=True` on any TypeError, which
    would silently fence every other job's controller.)
    """
    from storage.controller import StorageController

    calls = []

    def broken_open(client, **kw):
        calls.append(kw)
        raise TypeError("a bug inside open")

    data = tempfile.mkdtemp(prefix="sf-job-")
    monkeypatch.setattr(StorageController, "open", staticmethod(broken_open))
    with pytest.raises(TypeError, match="a bug inside open"):
        run_flow(FLOW, data, mode="batch")
    assert len(calls) == 1 and calls[0]["fence"] is False


def test_progress_hook_sees_the_stats_while_the_flow_runs(monkeypatch):
    """`progress` is entered around the running flow with the job's JobStats (the CLI renders them)."""
    import contextlib

    from flows.job import JobStats

    set_env(monkeypatch, COUNTER_TICKS=4, COUNTER_ROWS=3, COUNTER_PARTS=1)
    seen = []

    @contextlib.contextmanager
    def hook(stats):
        assert isinstance(stats, JobStats) and stats.rows == 0
        seen.append(stats)
        yield
        seen.append(stats.snapshot()[0])

    s = run_flow(FLOW, tempfile.mkdtemp(prefix="sf-job-"), mode="batch", progress=hook)
    assert len(seen) == 2 and seen[1] == s.rows > 0

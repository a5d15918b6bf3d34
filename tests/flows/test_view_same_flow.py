"""A view maintained in the same `shardflow run` as the flow that ingests its input.

`examples/csv_groupby_view.py`: CSV files -> collection `orders` -> view
`orders_by_customer`, one process. Checked against DuckDB over the collection
(`shardflow query` recomputing the SQL), and the collection against the CSV lines:
batch runs, a rerun after the input moved on without the view (the gap is read
from the shard), and SIGKILLs at random moments of a continuous run followed by reruns.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARDFLOW = [sys.executable, "-m", "flows.cli"]
FLOW = str(ROOT / "examples" / "csv_groupby_view.py")
VIEW = "SELECT customer, count(*) AS orders, sum(amount) AS total, max(amount) AS top FROM orders GROUP BY customer"
CUSTOMERS = [f"c{i:02d}" for i in range(37)]


def env_for(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "ORDERS_GLOB": str(tmp / "in" / "orders*.csv")}


def sf(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    p = subprocess.run([*SHARDFLOW, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-4000:])
    return p.stdout


def rows(env: dict[str, str], data: str, sql: str) -> list[str]:
    return sf(env, "query", "--data", data, "--format", "csv", sql).strip().splitlines()


def write_lines(path: Path, start: int, n: int) -> int:
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("id,customer,amount\n")
        for i in range(start, start + n):
            f.write(f"{i},{CUSTOMERS[(i * 7) % len(CUSTOMERS)]},{(i * 13) % 1000 / 4}\n")
    return start + n


def check(env: dict[str, str], data: str, ids: int) -> None:
    """The collection holds each CSV line once; the view equals its SQL over the collection."""
    assert rows(env, data, "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM orders")[1:] == [
        f"{ids},{ids},0,{ids - 1}"
    ]
    got = rows(env, data, "SELECT * FROM orders_by_customer ORDER BY ALL")
    want = rows(env, data, f"SELECT * FROM ({VIEW}) ORDER BY ALL")
    assert got == want and len(want) == len(CUSTOMERS) + 1, (got, want)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    return tmp_path


def test_batch_ingest_and_view_in_one_run(tmp: Path) -> None:
    env, data = env_for(tmp), str(tmp / "data")
    n = write_lines(tmp / "in" / "orders1.csv", 0, 3000)
    n = write_lines(tmp / "in" / "orders2.csv", n, 2000)
    out = sf(env, "run", FLOW, "--data", data, "--no-progress")
    assert "batch run of" in out and "orders_by_customer=" in out
    check(env, data, n)
    # New lines: one run ingests them and updates the view.
    n = write_lines(tmp / "in" / "orders2.csv", n, 500)
    sf(env, "run", FLOW, "--data", data, "--no-progress")
    check(env, data, n)
    # The input moves on without the view (another flow ingests); the next run of the
    # view's flow has nothing new to ingest, and reads the gap from the shard.
    n = write_lines(tmp / "in" / "orders3.csv", n, 700)
    sf({**env, "ORDERS_VIEW": ""}, "run", FLOW, "--data", data, "--no-progress")
    sf(env, "run", FLOW, "--data", data, "--no-progress")
    check(env, data, n)
    # Nothing new at all: a no-op.
    assert "0 rows" in sf(env, "run", FLOW, "--data", data, "--no-progress")
    check(env, data, n)


def test_batch_view_over_an_input_that_already_has_data(tmp: Path) -> None:
    """A new view over an input with data: it starts from the input's snapshot, then follows the commits."""
    env, data = env_for(tmp), str(tmp / "data")
    n = write_lines(tmp / "in" / "orders1.csv", 0, 1000)
    sf({**env, "ORDERS_VIEW": ""}, "run", FLOW, "--data", data, "--no-progress")
    n = write_lines(tmp / "in" / "orders1.csv", n, 1000)
    sf(env, "run", FLOW, "--data", data, "--no-progress")
    check(env, data, n)


def test_sigkill_at_random_moments_then_rerun(tmp: Path) -> None:
    """A writer appends CSV lines while the one-process flow runs continuously; it is
    SIGKILLed at random moments and restarted. After a final batch run both the
    collection (each line once) and the view (its SQL over the collection) are exact."""
    env, data = env_for(tmp), str(tmp / "data")
    rng = random.Random(12)
    written = [0]
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            written[0] = write_lines(tmp / "in" / f"orders{k // 20}.csv", written[0], 400)
            k += 1
            time.sleep(0.05)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(4):
            p = subprocess.Popen([*SHARDFLOW, "run", FLOW, "--data", data, "--mode", "continuous", "--tick", "0.2",
                                  "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(1.5, 5.0))
            assert p.poll() is None, p.communicate()
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=30)
    finally:
        stop.set()
        t.join()
    sf(env, "run", FLOW, "--data", data, "--no-progress")
    check(env, data, written[0])

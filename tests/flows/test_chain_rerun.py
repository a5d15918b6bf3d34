"""A chained flow reruns exactly after its input moved on and was compacted (a durable dependency hold).

`examples/shard_chain.py` computes `counter_even` from collection `counter`
with a `ShardSource`. Before dependency holds were durable, rerunning it after
the counter flow ran on failed with `ReadBeforeSince`: nothing held `counter`
between the chain's runs. Every step is a real `shardflow` process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARDFLOW = [sys.executable, "-m", "flows.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def sf(*args: str, timeout: float = 180) -> str:
    p = subprocess.run([*SHARDFLOW, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-4000:])
    return p.stdout


def rows(data: Path, sql: str) -> list[str]:
    return sf("query", "--data", str(data), "--format", "csv", sql).strip().splitlines()


def test_chain_reruns_exactly_after_its_input_moved_on(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    counter, chain = str(ROOT / "examples" / "loadgen_counter.py"), str(ROOT / "examples" / "shard_chain.py")
    sf("run", counter, "--data", data, "--no-progress")
    sf("run", chain, "--data", data, "--no-progress")
    # The counter flow runs on, continuously, for a few seconds: its since moves far past
    # where the chain stopped, and compaction folds the history the chain has not read.
    p = subprocess.Popen([*SHARDFLOW, "run", counter, "--data", data, "--mode", "continuous", "--no-progress"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)
    sf("compact", "--data", data)
    inspect = sf("inspect", "--data", data, "counter")
    assert "dependency of counter_even" in inspect, inspect  # the hold, named by its dependent
    sf("run", chain, "--data", data, "--no-progress")
    even = rows(tmp_path / "data", "SELECT counter, count(*) FROM counter_even GROUP BY ALL ORDER BY ALL")
    want = rows(tmp_path / "data", "SELECT counter, count(*) FROM counter WHERE counter % 2 = 0 GROUP BY ALL ORDER BY ALL")
    assert len(want) > 10 and even == want

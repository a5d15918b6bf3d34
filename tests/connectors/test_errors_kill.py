"""SIGKILL a `shardflow run` whose source sends bad lines to `<name>_errors`, at random moments.

Each chunk of the file holds good and bad lines, so most commit steps write both
collections; a kill between the two commits must lose and double nothing (see
ARCHITECTURE.md section 8 and `tests/flows/test_errors_commit.py`, the deterministic test).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOW = str(ROOT / "tests" / "connectors" / "files_flow.py")
SHARDFLOW = [sys.executable, "-m", "flows.cli"]
LINES = 3000


def _csv() -> tuple[str, list[int], list[int]]:
    out, good, bad = ["id,name"], [], []
    for i in range(1, LINES + 1):
        if i % 3 == 0:
            out.append(f"x{i},bad")
            bad.append(i + 1)  # the 1-based line number (the header is line 1)
        else:
            out.append(f"{i},n{i}")
            good.append(i)
    return "\n".join(out) + "\n", good, bad


def _ints(data: Path, sql: str) -> list[int]:
    r = subprocess.run([*SHARDFLOW, "query", "--data", str(data), "--format", "csv", sql],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()[1:]]


@pytest.mark.slow
def test_sigkill_between_the_data_and_errors_commits_loses_and_doubles_nothing(tmp_path: Path) -> None:
    text, good, bad = _csv()
    (tmp_path / "in.csv").write_text(text)
    data = tmp_path / "data"
    env = {**os.environ, "FILES_GLOB": str(tmp_path / "in.csv"), "FILES_BLOCK": "64",
           # every frontier its own commit pair: many windows between the two commits
           "SHARDFLOW_BATCH_COMMIT_EVERY": "0"}
    rng = random.Random(7)
    cmd = [*SHARDFLOW, "run", FLOW, "--data", str(data)]
    for _ in range(6):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _ints(data, "SELECT id FROM rows ORDER BY 1") == good
    assert _ints(data, "SELECT line FROM rows_errors ORDER BY 1") == bad

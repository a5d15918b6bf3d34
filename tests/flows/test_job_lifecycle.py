"""`run_flow` closes the client it opens; a job process ends with exit 0 (issue item 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import storage
from flows.job import run_flow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FLOW = HERE / "counter_flow.py"


def test_run_flow_closes_the_client_it_opened(tmp_path, monkeypatch):
    monkeypatch.setenv("COUNTER_TICKS", "12")
    seen: list[storage.Client] = []
    s = run_flow(FLOW, tmp_path, configure=lambda ctx: seen.append(ctx.client))
    assert s.frontiers["counter"] == 12
    (client,) = seen
    assert client.closed
    assert client.compactor.stopped  # no background merge outlives the run


def test_run_flow_leaves_a_given_client_open(tmp_path, monkeypatch):
    monkeypatch.setenv("COUNTER_TICKS", "12")
    with storage.open(tmp_path) as c:
        run_flow(FLOW, tmp_path, client=c)
        assert not c.closed
        assert c.list_shards()  # still usable
    assert c.closed


SCRIPT = """
import sys
from flows.job import run_flow
s = run_flow(sys.argv[1], sys.argv[2])
print(s.frontiers["counter"])
"""


def test_script_running_a_flow_exits_0(tmp_path):
    env = {**os.environ, "COUNTER_TICKS": "60", "COUNTER_ROWS": "200"}
    for i in range(3):
        p = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(FLOW), str(tmp_path / f"d{i}")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        assert (p.returncode, p.stdout.split()[-1:]) == (0, ["60"]), p.stderr[-1500:]

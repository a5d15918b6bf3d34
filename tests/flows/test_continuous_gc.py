"""A continuous job collects garbage while it runs, and SIGINT stops it in seconds (issue item 17).

The job is a real `shardflow run --mode continuous` process of bench/soak_flow.py
(the COUNTER generator at 100 ticks/s, at most 1,000 live rows): every append
writes a part, compaction merges them away, and only gc deletes the merged-away
parts and truncates consensus. Before the fix gc ran only when the job stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "bench" / "soak_flow.py"


def _parts(data: Path) -> set[str]:
    return {str(p) for p in (data / "blob").rglob("*.parquet")}


def _consensus(data: Path) -> tuple[int, int]:
    """(rows, versions ever written) over the data shards (`shard/...` keys)."""
    con = sqlite3.connect(f"file:{data / 'consensus.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        rows, written = con.execute(
            "SELECT sum(n), sum(hi + 1) FROM (SELECT count(*) AS n, max(sequence_number) AS hi "
            "FROM consensus WHERE shard LIKE 'shard/%' GROUP BY shard)"
        ).fetchone()
        return int(rows or 0), int(written or 0)
    finally:
        con.close()


def _start(data: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(FLOW), "--data", str(data), "--mode", "continuous",
         "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "SOAK_RATE": "100", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, float, str]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, time.monotonic() - t0, out.decode(errors="replace")


def test_gc_runs_while_continuous_job_runs_and_sigint_stops_fast(tmp_path):
    data = tmp_path / "data"
    proc = _start(data, SHARDFLOW_GC_INTERVAL="1")
    try:
        deadline = time.monotonic() + 60
        first: set[str] = set()
        while time.monotonic() < deadline and len(first) < 30:
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            time.sleep(0.5)
            first = _parts(data) if (data / "blob").exists() else set()
        assert len(first) >= 30, f"the job wrote only {len(first)} parts in 60 s"
        # Compaction merges those early parts away within a second or two; gc (every
        # second here) must delete them while the job keeps running.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            gone = first - _parts(data)
            rows, written = _consensus(data)
            if len(gone) >= len(first) // 2 and rows < written:
                break
            time.sleep(0.5)
        assert len(gone) >= len(first) // 2, f"only {len(gone)} of {len(first)} early parts deleted while running"
        assert rows < written, f"consensus not truncated while running: {rows} rows of {written} versions"
    finally:
        rc, secs, out = _stop(proc)
    assert rc == 0, out[-2000:]
    assert secs < 5.0, f"SIGINT took {secs:.1f} s to stop the job"


@pytest.mark.slow
def test_soak_short_is_flat(tmp_path):
    """bench/soak.py for 90 s: part files, consensus rows and RSS stop growing after warm-up."""
    out = tmp_path / "soak.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "1.5", "--every", "10", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    samples = json.loads(out.read_text())
    *running, stop = samples
    late = [s for s in running if s["t_s"] >= 30]
    assert len(late) >= 5, running
    # Without gc parts and versions grow by ~1 per append (about 6,000 a minute); with it
    # they stay within a few gc intervals' worth.
    assert max(s["parts"] for s in late) <= 1200, running
    assert max(s["cons_rows"] for s in late) <= 1500, running
    # Bounded, not linear: the last samples are not above the early ones by much.
    assert late[-1]["parts"] <= 2 * max(s["parts"] for s in late[:3]) + 300, running
    assert late[-1]["rss_mb"] <= late[0]["rss_mb"] + 60, running
    assert stop["exit"] == 0 and stop["stop_s"] < 5.0, stop

"""Helpers of the fault tests: run the CLI as a subprocess, read the loadgen counter back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARDFLOW = [sys.executable, "-m", "flows.cli"]
FLOW = str(ROOT / "tests" / "flows" / "loadgen_counter_flow.py")


def shardflow(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(env or {})}
    return subprocess.run([*SHARDFLOW, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "panicked" not in r.stderr, r.stderr
    assert lines[0].startswith("shardflow: error: "), r.stderr
    return lines[0][len("shardflow: error: ") :]


def counter_values(data: Path, *extra: str) -> list[int]:
    r = shardflow("query", "--data", str(data), *extra, "--format", "csv", "SELECT counter FROM counter ORDER BY 1")
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()[1:]]


def upper(data: Path, *extra: str) -> str:
    r = shardflow("inspect", "--data", str(data), *extra, "--json", "counter")
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["counter"]["upper"])


def assert_exact(values: list[int], rows: int) -> None:
    """`1 .. N`, each once, whole ticks only: nothing lost, nothing doubled."""
    assert values == list(range(1, len(values) + 1)), "gap or duplicate in the counter"
    assert len(values) % rows == 0, f"{len(values)} values is not a whole number of ticks of {rows}"

"""`shardflow view` end to end: real processes, checked against `shardflow query` recomputing the SQL.

Covers batch catch-up, resume after the inputs moved on, views over views,
the stored definition (--replace, --list, --drop), refusals, continuous mode,
and SIGKILL at random moments followed by a restart.
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
SHARDFLOW = [sys.executable, "-m", "flows.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
COUNTER = str(ROOT / "examples" / "loadgen_counter.py")

BY_TENS = "SELECT counter % 10 AS d, count(*) AS n, max(counter) AS top FROM counter GROUP BY ALL"
OVER_VIEW = "SELECT n, count(*) AS digits FROM by_tens GROUP BY n"


def sf(*args: str, ok: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*SHARDFLOW, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-4000:])
    return p


def rows(data: str, sql: str, *extra: str) -> list[str]:
    return sf("query", "--data", data, "--format", "csv", *extra, sql).stdout.strip().splitlines()


def same(data: str, view: str, sql: str, *extra: str) -> None:
    got = rows(data, f"SELECT * FROM {view} ORDER BY ALL", *extra)
    want = rows(data, f"SELECT * FROM ({sql}) ORDER BY ALL", *extra)
    assert got == want and len(want) > 1, (got, want)


def counter_continuous(data: str, seconds: float) -> None:
    p = subprocess.Popen([*SHARDFLOW, "run", COUNTER, "--data", data, "--mode", "continuous", "--no-progress"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)


@pytest.fixture
def data(tmp_path: Path) -> str:
    d = str(tmp_path / "data")
    sf("run", COUNTER, "--data", d, "--no-progress")
    return d


def test_view_batch_resume_and_view_over_view(data: str) -> None:
    out = sf("view", "by_tens", BY_TENS, "--data", data).stdout
    assert "batch view by_tens" in out
    same(data, "by_tens", BY_TENS)
    sf("view", "tens_hist", OVER_VIEW, "--data", data)
    same(data, "tens_hist", OVER_VIEW)
    counter_continuous(data, 4)  # the input moves on (and its old times are compacted)
    sf("compact", "--data", data)
    sf("view", "by_tens", BY_TENS, "--data", data)  # resumes where it stopped
    same(data, "by_tens", BY_TENS)
    sf("view", "tens_hist", OVER_VIEW, "--data", data)
    same(data, "tens_hist", OVER_VIEW)
    # Time travel: the view at an earlier readable time equals the SQL at that time.
    import json

    info = json.loads(sf("inspect", "--json", "--data", data, "by_tens").stdout)["by_tens"]
    since, upper = info["since"], info["upper"]
    for t in sorted({since, (since + upper) // 2, upper - 1}):
        same(data, "by_tens", BY_TENS, "--as-of", str(t))


def test_definition_is_stored(data: str) -> None:
    sf("view", "by_tens", BY_TENS, "--data", data)
    p = sf("view", "by_tens", "SELECT 1 AS one FROM counter", "--data", data, ok=False)
    assert p.returncode == 1 and "exists with another definition" in p.stderr and "--replace" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    other = "SELECT counter % 3 AS d, count(*) AS n FROM counter GROUP BY ALL"
    sf("view", "by_tens", other, "--replace", "--data", data)
    same(data, "by_tens", other)
    listed = sf("view", "--list", "--data", data).stdout
    assert "by_tens" in listed and other in listed and "inputs: counter" in listed
    sf("view", "by_tens", "--drop", "--data", data)
    assert "no views" in sf("view", "--list", "--data", data).stdout
    p = sf("query", "--data", data, "SELECT * FROM by_tens", ok=False)
    assert p.returncode == 1


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("SELECT * FROM counter ORDER BY counter", "ORDER BY"),
        ("SELECT * FROM nosuch", "nosuch"),
        ("SELECT counter, random() AS r FROM counter", "random"),
        ("SELECT *, count(*) OVER () AS n FROM counter", "PARTITION BY"),
    ],
)
def test_refused_sql_names_the_construct(data: str, sql: str, says: str) -> None:
    p = sf("view", "bad", sql, "--data", data, ok=False)
    assert p.returncode == 1 and says in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def kill_view_while_counter_runs(
    data: str, name: str, sql: str, args: list[str], rnd: random.Random, *, kills: int, lo: float, hi: float
) -> None:
    """While the counter flow runs continuously, start `shardflow view name sql` (continuous, `args`)
    `kills` times and SIGKILL it after lo..hi seconds; then stop the counter cleanly."""
    counter = subprocess.Popen([*SHARDFLOW, "run", COUNTER, "--data", data, "--mode", "continuous", "--no-progress"],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(kills):
            v = subprocess.Popen([*SHARDFLOW, "view", name, sql, "--data", data, "--mode", "continuous", *args,
                                  "--no-progress"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            time.sleep(rnd.uniform(lo, hi))
            v.send_signal(signal.SIGKILL)
            v.wait()
    finally:
        counter.send_signal(signal.SIGINT)
        out, err = counter.communicate(timeout=60)
        assert counter.returncode == 0, (out, err)


def test_continuous_view_survives_sigkill(data: str) -> None:
    """The view runs continuously beside the counter flow; SIGKILLed at random moments and
    restarted, it ends equal to the SQL over its input."""
    rnd = random.Random(7)
    kill_view_while_counter_runs(data, "by_tens", BY_TENS, [], rnd, kills=3, lo=2.0, hi=5.0)
    sf("view", "by_tens", BY_TENS, "--data", data)  # catch up to the input's final upper
    same(data, "by_tens", BY_TENS)


def test_view_with_two_workers_and_two_processes(data: str) -> None:
    sf("view", "w2", BY_TENS, "--data", data, "-w", "2")
    same(data, "w2", BY_TENS)
    sf("view", "p2", BY_TENS, "--data", data, "-p", "2")
    same(data, "p2", BY_TENS)


def test_two_copies_of_one_view_converge(data: str) -> None:
    """Started together (a user running the same command twice): both exit 0, the view is exact."""
    counter_continuous(data, 2)
    procs = [subprocess.Popen([*SHARDFLOW, "view", "by_tens", BY_TENS, "--data", data], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, (out, err[-3000:])
    same(data, "by_tens", BY_TENS)


@pytest.mark.parametrize(("name", "says"), [("Bad-Name", "Bad-Name"), ("system.x", "is invalid"), ("counter", "not a view")])
def test_bad_view_names_are_one_line(data: str, name: str, says: str) -> None:
    p = sf("view", name, BY_TENS, "--data", data, ok=False)
    assert p.returncode == 1 and says in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

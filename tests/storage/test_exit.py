"""A process that uses a client and ends normally exits 0, closed or not (issue item 10).

Each run is a real interpreter running tests/storage/_exit_script.py: 30 appends
(which wake the background compactor), a snapshot, then the end of the script.
Before the fix the compactor was still inside DuckDB at interpreter teardown and
the process aborted (SIGABRT, exit 134) in most runs.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pyarrow as pa
import pytest

import storage

SCRIPT = os.path.join(os.path.dirname(__file__), "_exit_script.py")


def _exit_codes(tmp_path, runs: int, how: str) -> collections.Counter[int]:
    codes: collections.Counter[int] = collections.Counter()
    errs = []
    for i in range(runs):
        p = subprocess.run(
            [sys.executable, SCRIPT, str(tmp_path / f"r{how}{i}"), how], capture_output=True, text=True, timeout=120
        )
        codes[p.returncode] += 1
        if p.returncode != 0:
            errs.append(p.stderr[-300:])
    assert codes == {0: runs}, (codes, errs[:2])
    return codes


def test_script_without_close_exits_0(tmp_path):
    _exit_codes(tmp_path, 8, "plain")


def test_script_with_context_manager_exits_0(tmp_path):
    _exit_codes(tmp_path, 3, "with")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["plain", "with", "close"])
def test_exit_code_loop(tmp_path, how):
    _exit_codes(tmp_path, 50, how)


def test_open_is_a_context_manager(tmp_path):
    schema = pa.schema([("k", pa.string())])
    with storage.open(tmp_path) as c:
        assert isinstance(c, storage.Client)
        shard = storage.ShardId.new()
        w = c.open_writer(shard, schema=schema)
        w.compare_and_append(pa.table({"k": ["a"], "_time": [0], "_diff": [1]}), 0, 1)
    # Closed: background compaction is off for good, close is idempotent.
    assert c.compactor.stopped
    c.close()
    # Still usable without `with`.
    c2 = storage.open(tmp_path)
    assert c2.state(shard).upper.time == 1
    c2.close()

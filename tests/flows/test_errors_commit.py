"""A source's data and its bad records go to two collections; a run that stops between the
two sinks' commits must leave nothing lost or doubled for the next run.

The flow (`errors_commit_flow.py`) holds one sink's frontier back for one run, so that
sink commits only below it: the state a SIGKILL between the two commits leaves. The
next run resumes from the data collection's offsets.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest

import storage
from flows.job import open_controller, run_flow

FLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "errors_commit_flow.py")
# Byte clock: the header is bytes 0 .. 7; the bad line starts at byte 36 (past the stall at 30).
CSV = "id,name\n1,a\n2,b\n3,c\n4,d\n5,e\n6,f\n7,g\nx,bad\n8,h\n9,i\n10,j\n"


def _shard(client: storage.Client, name: str) -> str:
    ctl = open_controller(client, read_only=True)
    try:
        return str(ctl.collection(name).shard_id)
    finally:
        ctl.close()


def _upper(data: str, name: str) -> int:
    client = storage.open(data)
    t = client.state(_shard(client, name)).upper.time
    assert t is not None
    return t


def _contents(data: str, name: str, cols: str) -> Counter[tuple]:
    client = storage.open(data)
    shard = _shard(client, name)
    up = client.state(shard).upper.time
    assert up is not None and up > 0
    with client.open_leased_reader(shard) as r:
        c: Counter[tuple] = Counter()
        for x in r.snapshot(up - 1, timeout=5).to_pylist():
            c[tuple(x[k] for k in cols.split(","))] += x["_diff"]
        return +c


@pytest.mark.parametrize("held", ["errors", "data"])
def test_a_run_stopped_between_the_data_and_errors_commits_loses_and_doubles_nothing(monkeypatch, held):
    d = Path(tempfile.mkdtemp(prefix="sf-errs-"))
    (d / "in.csv").write_text(CSV)
    data = str(d / "data")
    monkeypatch.setenv("ERRS_GLOB", str(d / "in.csv"))
    monkeypatch.setenv("ERRS_STALL", held)
    run_flow(FLOW, data, mode="batch")
    # The data collection's offsets (the resume point) never run ahead of the errors.
    assert _upper(data, "rows") <= 30 and _upper(data, "rows") <= _upper(data, "rows_errors")
    if held == "data":
        # The errors are ahead: the rerun reads the bad line again, and its row is in already.
        assert _contents(data, "rows_errors", "line") == Counter({(9,): 1})
    monkeypatch.delenv("ERRS_STALL")
    run_flow(FLOW, data, mode="batch")
    assert _contents(data, "rows", "id,name") == Counter({(i, n): 1 for i, n in zip(range(1, 11), "abcdefghij", strict=True)})
    errs = _contents(data, "rows_errors", "line")
    assert errs == Counter({(9,): 1}), errs

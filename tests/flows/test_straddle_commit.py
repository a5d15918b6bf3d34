"""A source batch spread over several times, partly committed without its offsets, then read again.

The sink commits a batch's offsets only once all its updates are below the frontier,
but commits its updates below the frontier as soon as they are. A rerun reads the
whole batch again (its offsets were not committed); `persist_sink` drops its updates
below the resume point (`as_of`, the upper the offsets were committed at), which are
exactly the ones already in, provided the source gives them the same times again
(ShardSource: the input's own times; PostgreSQL: the commit LSN; loadgen: the tick).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import storage
from flows.job import open_controller, run_flow
from flows.sinks import OFFSETS_UPPER_KEY, committed_offsets

FLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "straddle_flow.py")


def _out(client: storage.Client) -> str:
    ctl = open_controller(client, read_only=True)
    try:
        return str(ctl.collection("out").shard_id)
    finally:
        ctl.close()


def _at(client: storage.Client, shard: str, t: int) -> Counter[int]:
    with client.open_leased_reader(shard) as r:
        c: Counter[int] = Counter()
        for x in r.snapshot(t, timeout=5).to_pylist():
            c[x["counter"]] += x["_diff"]
        return c


def test_a_partly_committed_multi_time_batch_is_not_doubled_on_rerun(monkeypatch):
    data = tempfile.mkdtemp(prefix="sf-straddle-")
    monkeypatch.setenv("STRADDLE_TICKS", "1")
    run_flow(FLOW, data, mode="batch")
    client = storage.open(data)
    out = _out(client)
    s = client.state(out)
    # The partial commit: the listen batch (times 1 .. 9, offset 10) is in up to time 4, its offset is not.
    assert s.upper.time == 5 and s.metadata[OFFSETS_UPPER_KEY] == 5
    assert committed_offsets(s) == {"src/0": 1, "lg/0": 0}
    assert _at(client, out, 4) == Counter({1000: 1, 1001: 1, 1002: 1, 1003: 1, 1004: 1, 1: 1})

    # The rerun reads the whole batch again; the part below 5 is already in.
    monkeypatch.setenv("STRADDLE_TICKS", "2")
    run_flow(FLOW, data, mode="batch")
    s = client.state(out)
    assert s.upper.time == 10 and committed_offsets(s)["src/0"] == 10
    want = Counter({1000 + t: 1 for t in range(10)}) + Counter({1: 1})
    assert _at(client, out, 9) == want

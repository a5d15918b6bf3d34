"""The background compactor yields to the writer (issue 13, P2 append).

Measured on 2 cores (bench/append.py, default settings): at the writer's
priority the compactor's merges took the CPU from the appends (0.26-0.54x bare
`pq.write_table`); at nice 19 the appends ran at 0.84x and compaction caught up
after them. The compactor's thread, and so the DuckDB and encoder threads it
starts, runs at `COMPACTOR_NICE`; the writer's thread keeps its priority.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from storage import ShardId

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def test_background_compaction_runs_below_the_writers_priority(tmp_path: Path) -> None:
    client = storage.open(str(tmp_path), fsync=False)
    try:
        shard = ShardId.new()
        w = client.open_writer(shard, schema=pa.schema([("k", pa.int64())]))
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        for t in range(8):
            w.compare_and_append(pa.table({"k": [t], "_time": [t], "_diff": [1]}), t, t + 1)
        assert client.wait_compaction(timeout=60)
        # Every compactor thread alive (this client's, and any other test's still idling).
        comps = [t.native_id for t in threading.enumerate() if t.name == "shardflow-compactor"]
        assert comps and None not in comps
        assert all(os.getpriority(os.PRIO_PROCESS, tid) > mine for tid in comps if tid is not None)  # nicer: lower
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the writer's is unchanged
        assert len(client.state(shard).batches) < 8  # and it did compact
    finally:
        client.close()

"""The cost of one listen poll, as the shard source and `follow` poll (a new `listen(..., timeout=0)` each time).

Each round appends one small batch (`--rows`, default 100 updates) to a shard
(compaction off: one batch per append) and then, alternating who goes first:

- ours: `reader.listen(frontier - 1, timeout=0)` drained: the new batch,
  consolidated, and its Progress;
- baseline: the same rows read straight from the new part's Parquet file with
  a GROUP BY consolidation, on one DuckDB connection kept for the whole run (the
  least a poll must do).

Prints the median and spread of ours / baseline over `--rounds` (default 101),
and how many DuckDB cursors ours opened (one per reader since issue 13, one per
poll before).

    .venv/bin/python bench/listen_poll.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import duckdb
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

import storage  # noqa: E402
from storage import Progress, connections  # noqa: E402
from storage import state as st  # noqa: E402

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


def batch(t: int, rows: int) -> pa.Table:
    return pa.table({
        "k": pa.array([f"k{(t * rows + j) % 977}" for j in range(rows)], pa.string()),
        "v": pa.array([j % 13 for j in range(rows)], pa.int64()),
        "_time": pa.array([t] * rows, pa.int64()),
        "_diff": pa.array([1] * rows, pa.int64()),
    })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=101)
    ap.add_argument("--rows", type=int, default=100)
    a = ap.parse_args(argv)
    print(f"machine: {machine()}")
    opened = [0]
    orig = connections.cursor

    def counting() -> duckdb.DuckDBPyConnection:
        opened[0] += 1
        return orig()

    connections.cursor = counting  # count the cursors opened (ours)
    tmp = tempfile.mkdtemp(prefix="sf-bench-listen-")
    try:
        client = storage.open(tmp)
        shard = storage.ShardId.new()
        w = client.open_writer(shard, schema=SCHEMA, compact=False)  # one batch per append
        base_con = duckdb.connect()
        ours, base, ratios = [], [], []
        with client.open_leased_reader(shard) as r:
            frontier = 0
            for t in range(a.rounds + 1):
                w.compare_and_append(batch(t, a.rows), t, t + 1)
                path = client.parts.verify(shard, *_last_part(client, shard))

                def poll_ours(frontier: int = frontier) -> int:
                    n = 0
                    for ev in r.listen(max(frontier - 1, 0), timeout=0):
                        if not isinstance(ev, Progress):
                            n += ev.num_rows
                    return n

                def poll_base(frontier: int = frontier, path: str | None = path) -> int:
                    q = (f"SELECT k, v, _time, sum(_diff) AS _diff FROM read_parquet('{path}') "
                         f"WHERE _time >= {frontier} GROUP BY k, v, _time HAVING sum(_diff) <> 0")
                    return base_con.sql(q).to_arrow_table().num_rows

                got = {}
                for side in (["ours", "base"] if t % 2 else ["base", "ours"]):
                    t0 = time.perf_counter()
                    n = poll_ours() if side == "ours" else poll_base()
                    got[side] = (time.perf_counter() - t0, n)
                frontier = t + 1
                if t == 0:
                    continue  # warm-up: the first listen also opens the reader's cursor
                assert got["ours"][1] == got["base"][1], got
                ours.append(got["ours"][0])
                base.append(got["base"][0])
                ratios.append(got["ours"][0] / got["base"][0])
        base_con.close()
        client.close()
    finally:
        connections.cursor = orig
        shutil.rmtree(tmp, ignore_errors=True)
    ratios.sort()
    print(f"{a.rounds} polls of {a.rows} new updates: ours median {statistics.median(ours) * 1e3:.2f} ms, "
          f"baseline median {statistics.median(base) * 1e3:.2f} ms")
    print(f"ours / baseline, paired per poll: median {statistics.median(ratios):.2f} "
          f"(spread {ratios[0]:.2f}-{ratios[-1]:.2f}); DuckDB cursors opened by ours: {opened[0]}")
    return 0


def _last_part(client: storage.Client, shard: str) -> tuple[st.BatchMeta, st.PartMeta]:
    b = client.state(shard).batches[-1]
    return b, b.parts[0]


if __name__ == "__main__":
    raise SystemExit(main())

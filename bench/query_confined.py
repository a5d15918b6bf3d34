"""Whole-process `shardflow query` of two checkouts, alternated, on one store: 2M updates in 200 batches.

Before (OLD: e.g. `git worktree add --detach /tmp/old main`) and after (this checkout):
the same `python -m flows.cli query --format csv "SELECT count(*), sum(v) FROM bids"`,
each with PYTHONPATH at its checkout (the same venv), alternated `--repeat` times on one
store: 200 batches of 10,000 updates, each batch 90% new rows and 10% retractions of
the previous batch's (uncompacted), or after `shardflow compact --full` with `--full`.
Printed: each side's median and range, and the median of the per-pair ratios new/old.
Both sides must print the same answer (checked).

    OLD=/tmp/old .venv/bin/python bench/query_confined.py [--full] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQL = "SELECT count(*), sum(v) FROM bids"


def make_store(full: bool) -> str:
    import storage
    from storage.controller import CollectionDesc, StorageController

    d = tempfile.mkdtemp(prefix="bench-query-confined-")
    client = storage.open(d, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    schema = pa.schema([("k", pa.string()), ("v", pa.int64())])
    ctl.create_collections([CollectionDesc("bids", schema, data_source="other")])
    shard = ctl.collections()["bids"].shard_id
    ctl.close()
    w = client.open_writer(shard, compact=False)
    u = client.state(shard).upper.time
    n = 10_000
    for i in range(200):
        ins = [f"k{i}_{j}" for j in range(int(n * 0.9))]
        ret = [f"k{i - 1}_{j}" for j in range(int(n * 0.1))] if i else []
        w.compare_and_append(pa.table({
            "k": ins + ret, "v": list(range(len(ins))) + list(range(len(ret))),
            "_time": [u + i] * (len(ins) + len(ret)), "_diff": [1] * len(ins) + [-1] * len(ret),
        }), u + i, u + i + 1)
    client.close()
    if full:
        sf = os.path.join(os.path.dirname(sys.executable), "shardflow")
        subprocess.run([sf, "compact", "--full", "--data", d], check=True, capture_output=True)
    return d


def run(root: str, data: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": root}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "flows.cli", "query", "--data", data, "--format", "csv", SQL],
                       env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{root}: {p.stderr}")
    return elapsed, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    sys.path.insert(0, HERE)
    old = os.environ["OLD"]
    data = make_store(a.full)
    res: dict[str, list[float]] = {"old": [], "new": []}
    outs = set()
    for rep in range(a.repeat):
        order = [("old", old), ("new", HERE)]
        for name, root in order if rep % 2 == 0 else order[::-1]:
            el, out = run(root, data)
            res[name].append(el)
            outs.add(out)
    assert len(outs) == 1, outs
    ratios = [b / a_ for a_, b in zip(res["old"], res["new"], strict=True)]
    print(f"{'full' if a.full else 'uncompacted'}: {outs.pop().strip().splitlines()[-1]}")
    for k, v in res.items():
        print(f"  {k}: median {statistics.median(v):.3f}s [{min(v):.3f}-{max(v):.3f}]")
    print(f"  paired ratio new/old: median {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]; "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

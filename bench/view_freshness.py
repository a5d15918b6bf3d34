"""View freshness in continuous mode: p50/p99 of (view commit - input commit), real processes.

    .venv/bin/python bench/view_freshness.py                    # 100k updates/s, 30 s, tick 1 s

Two processes on one data directory:
- **input**: `shardflow run bench/view_freshness_flow.py --mode continuous --tick T`, COUNTER
  at 10 ticks/s of 5,000 rows, at most 100,000 live: 100k updates/s (inserts + retractions)
  once warm (2 s), committed by the self-correcting sink as each tick's progress arrives;
- **view**: `shardflow view by_g "SELECT counter % 1000 AS g, count(*) AS n, sum(counter) AS s
  FROM counter GROUP BY ALL" --mode continuous --tick T` (a `ShardSource` on `counter`).

Commit times: nothing durable records a commit's wall time, so this process polls both
shards' state (`client.state(shard).upper`, the consensus head) every `--poll` seconds and
notes when each upper was first seen. For each input upper U seen, the lag is
(first time the view's upper was >= U) - (first time the input's upper was >= U): from the
input's commit to the view's commit that covers it. Both ends are seen by the same poller,
so its delay (<= one poll) is on both sides; the first `--warmup` seconds are dropped.
Prints p50/p99/max of the lag, the tick, and the target check p99 <= 2 x tick.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from _common import machine  # noqa: E402

SQL = "SELECT counter % 1000 AS g, count(*) AS n, sum(counter) AS s FROM counter GROUP BY ALL"
SF = [sys.executable, "-m", "flows.cli"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def shard_of(data: str, name: str, wait: float = 60.0) -> str:
    import storage
    from flows.job import open_controller

    end = time.monotonic() + wait
    while True:
        client = storage.open(data)
        try:
            ctl = open_controller(client, read_only=True, role="bench")
            try:
                return str(ctl.collection(name).shard_id)
            finally:
                ctl.close()
        except Exception:
            if time.monotonic() > end:
                raise
        finally:
            client.close()
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000, help="rows inserted per input tick")
    ap.add_argument("--rate", type=float, default=10.0, help="input ticks per second")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--tick", type=float, default=1.0, help="--tick of both processes")
    ap.add_argument("--poll", type=float, default=0.01)
    a = ap.parse_args()
    import storage

    print(machine())
    ups = 2 * a.rows * a.rate
    print(f"input: {a.rows:,} rows x {a.rate:g} ticks/s = {ups:,.0f} updates/s once warm; tick {a.tick}s; "
          f"{a.seconds:g}s measured after {a.warmup:g}s warm-up; poll every {a.poll * 1000:g} ms")
    d = tempfile.mkdtemp(prefix="sf-bench-vfresh-")
    data = os.path.join(d, "data")
    env = {**os.environ, "PYTHONPATH": ROOT, "FRESH_ROWS": str(a.rows), "FRESH_RATE": str(a.rate),
           "FRESH_CARD": str(20 * a.rows)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        common = ["--data", data, "--mode", "continuous", "--tick", str(a.tick), "--no-progress"]
        procs.append(subprocess.Popen([*SF, "run", os.path.join(HERE, "view_freshness_flow.py"), *common],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        s_in = shard_of(data, "counter")
        # The view needs something readable to start from.
        client = storage.open(data)
        while client.state(s_in).upper.time in (None, 0):
            time.sleep(0.05)
        procs.append(subprocess.Popen([*SF, "view", "by_g", SQL, *common],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        s_v = shard_of(data, "by_g")
        seen_in: list[tuple[int, float]] = []  # (upper, first seen)
        seen_v: list[tuple[int, float]] = []
        t_start = time.monotonic()
        end = t_start + a.warmup + a.seconds
        while time.monotonic() < end:
            now = time.time()
            for s, seen in ((s_in, seen_in), (s_v, seen_v)):
                u = client.state(s).upper.time
                if u is not None and (not seen or u > seen[-1][0]):
                    seen.append((u, now))
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"a process ended early: {p.args}\n{p.communicate()[1].decode()[-3000:]}")
            time.sleep(a.poll)
        client.close()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=120) for p in procs]
        shutil.rmtree(d, ignore_errors=True)
    for o in outs:
        print("  " + o[0].decode().strip())
    warm_from = t_start + a.warmup - time.monotonic() + time.time()
    lags: list[float] = []
    j = 0
    for u, w in seen_in:
        while j < len(seen_v) and seen_v[j][0] < u:
            j += 1
        if j == len(seen_v):
            break
        if w >= warm_from:
            lags.append((seen_v[j][1] - w) * 1000)
    if not lags:
        print("no input commit was covered by a view commit")
        return 1
    p99 = pct(lags, 0.99)
    print(f"view commit - input commit over {len(lags)} input commits ({len(seen_v)} view commits seen): "
          f"p50 {pct(lags, 0.5):.0f} ms, p99 {p99:.0f} ms, max {max(lags):.0f} ms; tick {a.tick * 1000:.0f} ms")
    print(f"target p99 <= 2 x tick ({2000 * a.tick:.0f} ms): {'OK' if p99 <= 2000 * a.tick else 'ABOVE'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run every bench in bench/ once, at sizes that fit `make bench` in under 15 minutes on 2 cores.

Each bench runs as its own process with the arguments below (smaller than its
defaults where the default takes minutes; every bench still alternates
baseline and subject and prints its median and spread). Prints each bench's
output, its wall time, and a summary table; exits non-zero if any bench failed
or ran past its timeout. `--full` runs every bench with its own defaults (the
figures in bench/RESULTS.md; far longer than 15 minutes).

    make bench                                # = .venv/bin/python bench/all.py
    .venv/bin/python bench/all.py --only ingest,sink_memory
    .venv/bin/python bench/all.py --full
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: bench -> arguments for the quick run (`make bench`). Sizes chosen so the whole set takes
#: about 10 minutes on a loaded 2-core machine; the full sizes are each bench's defaults.
QUICK: dict[str, list[str]] = {
    "append": ["--rows", "2000000", "--repeat", "3"],
    "append_latency": ["--at", "300", "--rounds", "11"],
    "listen_poll": ["--rounds", "31"],
    "compaction": ["--appends", "300"],
    "snapshot": ["--rows", "2000000", "--batches", "100", "--repeat", "3"],
    "query": ["--rows", "2000000", "--batches", "100", "--repeat", "3"],
    "ingest": ["--quick"],
    "sink_memory": [],  # the 10M-row target itself: about a minute
    "freshness": ["--seconds", "5"],
    "csv_parse": ["--rows", "1000000", "--rounds", "3"],
    "file_ingest_scaling": ["--files", "4", "--rows", "200000", "--rounds", "2"],
    "soak": ["--minutes", "1", "--every", "15"],
    "whole_job": ["--rows", "1000000", "--reps", "2"],
    "views": ["--rows", "200000", "--ticks", "3"],
    "view_memory": ["--rows", "1000000"],
    "view_freshness": ["--seconds", "10", "--warmup", "2"],
    "view_invertible": ["1000000"],
    "nexmark": ["--quick"],
    "kafka": ["--records", "200000", "--rounds", "3"],
    "kafka_upsert_memory": ["--keys", "1000000"],
    "webhook": ["--seconds", "3", "--rounds", "2"],
}
#: Benches that `make bench` does not run, and why.
SKIP = {
    "query_confined": "compares two checkouts: needs OLD=<a checkout of the old code>",
}
#: Seconds after which a quick bench is stopped and counted as failed.
TIMEOUT = 240.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="each bench's default sizes (long)")
    ap.add_argument("--only", default=None, help="comma-separated bench names")
    a = ap.parse_args()
    names = list(QUICK)
    if a.only:
        names = [n.strip() for n in a.only.split(",")]
        unknown = [n for n in names if n not in QUICK]
        if unknown:
            raise SystemExit(f"unknown bench {unknown}; known: {', '.join(QUICK)}")
    missing = sorted(
        f[:-3] for f in os.listdir(HERE)
        if f.endswith(".py") and not f.startswith("_") and f[:-3] not in QUICK
        and f[:-3] not in SKIP and f not in ("all.py", "soak_flow.py", "view_freshness_flow.py")
    )
    if missing:
        raise SystemExit(f"bench/all.py does not know {missing}: add them to QUICK")
    for n, why in SKIP.items():
        print(f"skipping {n}: {why}")
    results: list[tuple[str, float, str]] = []
    t_all = time.perf_counter()
    for n in names:
        args = [] if a.full else QUICK[n]
        cmd = [sys.executable, os.path.join(HERE, f"{n}.py"), *args]
        print(f"\n=== {n}: {' '.join(['bench/' + n + '.py', *args])}", flush=True)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, timeout=None if a.full else TIMEOUT)
            status = "ok" if r.returncode == 0 else f"exit {r.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout ({TIMEOUT:.0f} s)"
        el = time.perf_counter() - t0
        results.append((n, el, status))
        print(f"=== {n}: {status} in {el:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    print("\n| bench | seconds | status |\n|---|---|---|")
    for n, el, status in results:
        print(f"| {n} | {el:.0f} | {status} |")
    print(f"total {total / 60:.1f} min")
    if any(s != "ok" for _, _, s in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Soak: a continuous job over a constant-size collection must stay flat, and stop fast.

Starts `shardflow run bench/soak_flow.py --mode continuous` as a user would (the
COUNTER generator at `--rate` ticks/s, at most 1,000 live rows, default
retention), samples every `--every` seconds:

- parts: Parquet part files under `DATA/blob`;
- cons rows: rows in the consensus table (state versions of every shard);
- cons MB: consensus.sqlite + its -wal file;
- RSS MB: the job's resident set size;

then sends SIGINT and times the stop (and checks the exit code is 0).

    .venv/bin/python bench/soak.py --minutes 30 --every 60
    .venv/bin/python bench/soak.py --minutes 1.5 --every 10      # quick

Prints one markdown table, then a `stop:` line. With `--json FILE`, also writes
the samples there. Exits 1 if the job died or did not exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
FLOW = os.path.join(HERE, "soak_flow.py")


def count_parts(data: str) -> int:
    n = 0
    for _dir, _subdirs, files in os.walk(os.path.join(data, "blob")):
        n += sum(1 for f in files if f.endswith(".parquet"))
    return n


def consensus_rows(data: str) -> int:
    path = os.path.join(data, "consensus.sqlite")
    if not os.path.exists(path):
        return 0
    # Read-only, never blocks the job's writers (WAL).
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return int(con.execute("SELECT count(*) FROM consensus").fetchone()[0])
    finally:
        con.close()


def consensus_mb(data: str) -> float:
    total = 0
    for suffix in ("", "-wal"):
        p = os.path.join(data, "consensus.sqlite" + suffix)
        if os.path.exists(p):
            total += os.path.getsize(p)
    return total / 2**20


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def sample(data: str, pid: int, t0: float) -> dict[str, Any]:
    return {
        "t_s": round(time.monotonic() - t0),
        "parts": count_parts(data),
        "cons_rows": consensus_rows(data),
        "cons_mb": round(consensus_mb(data), 1),
        "rss_mb": round(rss_mb(pid), 1),
    }


def committed_ticks(data: str) -> int | None:
    """Rows in the counter collection's latest state would need storage; the upper is enough."""
    try:
        import storage

        with storage.open(data) as c:
            for shard in c.list_shards():
                info = c.inspect(shard)
                if "counter" in info["schema"]:
                    return info["upper"]
    except Exception:  # noqa: BLE001 - informational only
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the job runs (default: %(default)s)")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between samples (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=100.0, help="generator ticks per second (default: %(default)s)")
    ap.add_argument("--data", default=None, help="data directory (default: a fresh temporary one, removed after)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the samples as JSON")
    args = ap.parse_args(argv)

    data = args.data or tempfile.mkdtemp(prefix="shardflow-soak-")
    env = dict(os.environ, SOAK_RATE=str(args.rate))
    cmd = [sys.executable, "-m", "flows.cli", "run", FLOW, "--data", data, "--mode", "continuous", "--no-progress"]
    print(f"# {' '.join(cmd)}  (rate {args.rate:g} ticks/s, {args.minutes:g} min)", flush=True)
    log = open(os.path.join(tempfile.gettempdir(), f"shardflow-soak-{os.getpid()}.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    samples: list[dict[str, Any]] = []
    print("| t (s) | parts | cons rows | cons MB | RSS MB |")
    print("|---:|---:|---:|---:|---:|", flush=True)
    ok = True
    try:
        end = t0 + args.minutes * 60
        nxt = t0 + args.every
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                print(f"job died early: exit {proc.returncode} (log {log.name})")
                ok = False
                break
            if now >= nxt or now >= end:
                s = sample(data, proc.pid, t0)
                samples.append(s)
                print(f"| {s['t_s']} | {s['parts']} | {s['cons_rows']} | {s['cons_mb']} | {s['rss_mb']} |", flush=True)
                nxt += args.every
            if now >= end:
                break
            time.sleep(min(1.0, max(0.0, min(nxt, end) - now)))
        if ok:
            t_stop = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            stop_s = time.monotonic() - t_stop
            after = sample(data, proc.pid, t0)
            print(
                f"stop: {stop_s:.1f} s after SIGINT, exit {rc}; after the stop: {after['parts']} parts, "
                f"{after['cons_rows']} consensus rows, {after['cons_mb']} MB consensus; upper {committed_ticks(data)}"
            )
            samples.append({"stop_s": round(stop_s, 2), "exit": rc, **after})
            ok = rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(samples, f, indent=1)
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

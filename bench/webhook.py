"""Webhook throughput: signed POSTs per second with 32 concurrent keep-alive clients.

Two sides, alternated round by round under the same load:

- `store`: `shardflow webhook bench --secret-env ...`, a separate process appending
  each request to a collection through the controller's appender (every 200 is durable);
- `null`: the same `WebhookServer` in a separate process with a no-op `on_batch`, i.e.
  the HTTP, signature and replay-cache cost alone (the baseline).

The clients are `--procs` processes of `--clients / --procs` threads, each thread with
one keep-alive connection, each request signed (`t=..,v1=..`) with an idempotency key.
After the run, the `store` side's collection is counted: it must hold every 200.

    .venv/bin/python bench/webhook.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECRET = "bench-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not start")


def sign(secret: str, body: bytes) -> str:
    """`connectors.webhook.sign`, inline: the client processes import nothing heavy."""
    t = str(int(time.time()))
    return f"t={t},v1=" + hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()


def _client_proc(port: int, threads: int, start_at: float, seconds: float, out: mp.Queue) -> None:
    counts = [0] * threads
    errors = [0] * threads
    time.sleep(max(0.0, start_at - time.time()))
    end = time.monotonic() + seconds

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = 0
        while time.monotonic() < end:
            body = f'{{"client": {i}, "n": {n}, "pad": "{uuid.uuid4().hex}"}}'.encode()
            n += 1
            hdr = {"X-Signature": sign(SECRET, body), "Idempotency-Key": uuid.uuid4().hex}
            try:
                conn.request("POST", "/", body=body, headers=hdr)
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    counts[i] += 1
                else:
                    errors[i] += 1
            except OSError:
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((sum(counts), sum(errors)))


def _drive(port: int, clients: int, procs: int, seconds: float) -> tuple[float, int, int]:
    q: mp.Queue = mp.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.0  # all client processes start together, after their start-up
    ps = [mp.Process(target=_client_proc, args=(port, n, start_at, seconds, q)) for n in per if n]
    for p in ps:
        p.start()
    got = [q.get() for _ in ps]
    for p in ps:
        p.join()
    wall = seconds
    ok = sum(g[0] for g in got)
    bad = sum(g[1] for g in got)
    return ok / wall, ok, bad


def _serve_null(port: int) -> None:
    import signal

    from connectors.webhook import WebhookServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    with WebhookServer(port=port, on_batch=lambda t: None, secret=SECRET):
        while not stop.wait(0.2):
            pass


def _count(data: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "query", "--data", data, "SELECT count(*) AS n FROM bench", "--format", "csv"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def _side(side: str, args: argparse.Namespace, data: str) -> tuple[float, int, int]:
    port = _free_port()
    env = dict(os.environ, BENCH_SECRET=SECRET, PYTHONPATH=ROOT)
    if side == "store":
        cmd = [sys.executable, "-m", "flows.cli", "webhook", "bench", "--data", data,
               "--secret-env", "BENCH_SECRET", "--port", str(port), "--batch-ms", str(args.batch_ms)]
    else:
        cmd = [sys.executable, __file__, "--serve-null", str(port)]
    srv = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        _wait_port(port)
        return _drive(port, args.clients, args.procs, args.seconds)
    finally:
        srv.terminate()
        srv.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--procs", type=int, default=4, help="client processes (the clients are split over them)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-ms", type=int, default=5, help="the store side's `shardflow webhook --batch-ms`")
    ap.add_argument("--serve-null", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_null is not None:
        _serve_null(args.serve_null)
        return
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} cores")
    data = tempfile.mkdtemp(prefix="bench-webhook-")
    stored = 0
    rates: dict[str, list[float]] = {"store": [], "null": []}
    for r in range(args.rounds):
        for side in ("store", "null") if r % 2 == 0 else ("null", "store"):
            rate, ok, bad = _side(side, args, data)
            rates[side].append(rate)
            if side == "store":
                stored += ok
            print(f"round {r} {side:5s}: {rate:7.0f} req/s ({ok} ok, {bad} not 2xx)", flush=True)
    ratios = [s / n for s, n in zip(rates["store"], rates["null"], strict=True)]
    n = _count(data)
    print(
        f"store: median {statistics.median(rates['store']):.0f} req/s "
        f"(min {min(rates['store']):.0f}, max {max(rates['store']):.0f}); "
        f"null: median {statistics.median(rates['null']):.0f} req/s; "
        f"store/null median ratio {statistics.median(ratios):.2f} (spread {min(ratios):.2f}-{max(ratios):.2f}); "
        f"collection rows {n} (acknowledged {stored})"
    )
    if n != stored:
        raise SystemExit(f"FAIL: {stored} requests acknowledged, {n} rows stored")


if __name__ == "__main__":
    main()

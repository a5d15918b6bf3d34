"""HTTP webhook -> append-only collection `events` (a server, not a flow).

    python examples/webhook_events.py --data ./data --port 8080 --secret s3cret
    BODY='{"kind": "signup"}'; T=$(date +%s)
    SIG=$(printf '%s.%s' "$T" "$BODY" | openssl dgst -sha256 -hmac s3cret -r | cut -d' ' -f1)
    curl -X POST localhost:8080 -d "$BODY" -H "X-Signature: t=$T,v1=$SIG" -H "Idempotency-Key: signup-1"
    shardflow query --data ./data "SELECT body FROM events"

(`shardflow webhook events --secret-env VAR` does the same without this file.)

Each accepted request is one row, appended through the storage controller's
monotonic appender before the server answers 200. Unsigned, wrongly signed or
stale requests get 401 and oversized ones 413; neither writes anything. A replayed
request (same signature or Idempotency-Key within the window) is stored once.
"""

from __future__ import annotations

import argparse
import signal
import threading

import storage
from connectors.webhook import WebhookServer, webhook_schema
from storage.controller import CollectionDesc, StorageController


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="./data")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--secret", default=None)
    p.add_argument("--headers", action="store_true", help="also store the request headers")
    args = p.parse_args()

    client = storage.open(args.data)
    stop = threading.Event()
    # A long-running server: the controller's own thread ticks the upper forward, applies
    # the read policy and compacts. fence=False: flows run next to it do not fence it. If
    # someone takes over for real (a fencing open), stop instead of answering 500s.
    ctl = StorageController.open(client, fence=False, on_fenced=lambda e: (print(f"fenced: {e}", flush=True), stop.set()))
    ctl.create_collections([CollectionDesc("events", webhook_schema(args.headers), data_source="webhook")])
    appender = ctl.monotonic_appender("events")
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with WebhookServer(port=args.port, on_batch=appender.append, secret=args.secret,
                       include_headers=args.headers) as srv:
        print(f"listening on {srv.url} (Ctrl-C to stop)", flush=True)
        stop.wait()
    ctl.close()
    client.close()


if __name__ == "__main__":
    main()

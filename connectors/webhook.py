"""`WebhookServer`: an HTTP endpoint that appends each request to an append-only collection.

Each accepted `POST` becomes one row, `body` (the request body as UTF-8 text)
and, with `include_headers=True`, `headers` (a JSON object of the lower-cased
header names to values), handed as a one-row `pyarrow.Table` to `on_batch`:

- a callable `on_batch(table)`, e.g. the storage controller's
  `ctl.monotonic_appender(name)` or a function of your own; or
- anything with `monotonic_append(rows, at_least)`, e.g. a `storage.WriteHandle`
  of the collection's shard; rows are then written at
  `max(upper, now in milliseconds)`.

Delivery: **at-least-once** end to end, exactly-once per acknowledged request:
the server answers `200` only after `on_batch` returned (the rows are durable),
and answers `500` (nothing acknowledged) if it raised. A client that retries
after a lost `200` may write the same body twice: webhooks carry no offsets, so
deduplicate on an id in the body if that matters.

Rejections write nothing:

- `401` when a `secret` is set and the request is unsigned or wrongly signed.
  The signature is `X-Signature: sha256=<hex HMAC-SHA256 of the raw body>`.
- `413` when the body is larger than `max_body` (checked on Content-Length,
  before reading the body).
- `411` without a Content-Length, `400` when the body is not UTF-8, `405` for
  methods other than POST.

The server binds `127.0.0.1` by default: put a reverse proxy in front of it to
expose it. It runs in a background thread; use it as a context manager.

Example:
    >>> import urllib.request
    >>> got = []
    >>> with WebhookServer(on_batch=got.append) as srv:
    ...     req = urllib.request.Request(srv.url, data=b'{"a": 1}', method="POST")
    ...     urllib.request.urlopen(req).status
    200
    >>> got[0].to_pylist()
    [{'body': '{"a": 1}'}]
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pyarrow as pa

from storage.errors import InvalidInput

from .errors import WebhookError

__all__ = ["SIGNATURE_HEADER", "WebhookServer", "sign", "webhook_schema"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signature"
_SIG_PREFIX = "sha256="


def webhook_schema(include_headers: bool = False) -> pa.Schema:
    """The row schema of a webhook collection: `body` (and `headers`, a JSON object)."""
    fields = [pa.field("body", pa.string(), nullable=False)]
    if include_headers:
        fields.append(pa.field("headers", pa.string(), nullable=False))
    return pa.schema(fields)


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Signature` header value for `body`: `"sha256=<hex>"`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return _SIG_PREFIX + hmac.new(key, body, hashlib.sha256).hexdigest()


class WebhookServer:
    """An HTTP endpoint appending each request body to a collection (see the module docstring).

    Args:
        host: Interface to bind; `127.0.0.1` by default.
        port: TCP port; 0 picks a free one (see `.port` / `.url`).
        on_batch: Where rows go: a callable taking a `pyarrow.Table`, or an
            object with `monotonic_append(rows, at_least)`.
        secret: HMAC-SHA256 key; when set, unsigned or wrongly signed requests get 401.
        include_headers: Add a `headers` column (JSON object).
        max_body: Largest accepted body in bytes (default 1 MiB); larger gets 413.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_batch: Callable[[pa.Table], Any] | Any,
        secret: str | bytes | None = None,
        include_headers: bool = False,
        max_body: int = 1 << 20,
    ) -> None:
        if not callable(on_batch) and not hasattr(on_batch, "monotonic_append"):
            raise InvalidInput(
                f"WebhookServer: on_batch must be callable or have monotonic_append(), got {type(on_batch).__name__}"
            )
        if max_body < 0:
            raise InvalidInput(f"WebhookServer: max_body must be >= 0 bytes, got {max_body}")
        self.host = host
        self.on_batch = on_batch
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.include_headers = include_headers
        self.max_body = max_body
        self.schema = webhook_schema(include_headers)
        self.accepted = 0
        self.rejected = 0
        self._lock = threading.Lock()
        try:
            self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        except OSError as e:
            raise WebhookError(f"WebhookServer: cannot listen on {host}:{port}: {e}") from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> WebhookServer:
        """Serve in a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"webhook-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until `stop()` (from another thread) or Ctrl-C."""
        self._httpd.serve_forever()

    # ---- request handling ----
    def _deliver(self, table: pa.Table) -> None:
        with self._lock:  # SUBTLE: appenders need not be thread-safe; requests run in threads
            if hasattr(self.on_batch, "monotonic_append"):
                self.on_batch.monotonic_append(table, int(time.time() * 1000))
            else:
                self.on_batch(table)

    def _handle(self, method: str, headers: Any, read: Callable[[int], bytes]) -> tuple[int, str]:
        """Decide on one request: returns (status, message). Writes only on 200."""
        if method != "POST":
            return 405, "only POST is accepted"
        if headers.get("Transfer-Encoding") or headers.get("Content-Length") is None:
            return 411, "a Content-Length header is required"
        raw = headers["Content-Length"]
        # Strict: int() would also take "+5", " 5 " or "1_000".
        if not raw.isascii() or not raw.isdigit():
            return 400, f"bad Content-Length {raw!r}"
        length = int(raw)
        if length > self.max_body:
            return 413, f"body of {length} bytes is larger than the limit of {self.max_body} bytes"
        body = read(length)
        if self.secret is not None:
            got = headers.get(SIGNATURE_HEADER)
            if got is None:
                return 401, f"missing {SIGNATURE_HEADER} header (expected {_SIG_PREFIX}<hex HMAC-SHA256 of the body>)"
            if not hmac.compare_digest(got.strip().encode(), sign(self.secret, body).encode()):
                return 401, f"wrong {SIGNATURE_HEADER}"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return 400, f"body is not UTF-8 (byte {e.start})"
        cols: dict[str, Any] = {"body": [text]}
        if self.include_headers:
            cols["headers"] = [json.dumps({k.lower(): v for k, v in headers.items()}, sort_keys=True)]
        table = pa.table(cols, schema=self.schema)
        try:
            self._deliver(table)
        except Exception as e:  # noqa: BLE001 - reported to the client, nothing acknowledged
            log.exception("webhook: delivering a request failed")
            return 500, f"append failed: {type(e).__name__}: {e}"
        return 200, "ok"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # A client that stalls mid-request (slowloris) must not hold a thread forever.
            timeout = 10

            def _respond(self) -> None:
                status, msg = server._handle(self.command, self.headers, self.rfile.read)
                if status == 200:
                    server.accepted += 1
                else:
                    server.rejected += 1
                    # Unread bodies (413, 411) would be parsed as the next request.
                    self.close_connection = True
                data = (json.dumps({"status": status, "message": msg}) + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _respond

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("webhook %s: " + format, self.address_string(), *args)

        return Handler

"""`WebhookServer`: an HTTP endpoint that appends each request to an append-only collection.

Each accepted `POST` becomes one row, `body` (the request body as UTF-8 text)
and, with `include_headers=True`, `headers` (a JSON object of the lower-cased
header names to values), handed as a one-row `pyarrow.Table` to `on_batch`:

- a callable `on_batch(table)`, e.g. the storage controller's
  `ctl.monotonic_appender(name)` or a function of your own. It is called from
  the request threads **concurrently** (so that the appender batches the
  requests in flight into one commit): it must be thread-safe, as the
  controller's appender is; or
- anything with `monotonic_append(rows, at_least)`, e.g. a `storage.WriteHandle`
  of the collection's shard; rows are then written at
  `max(upper, now in milliseconds)`, one request at a time (one commit each).

Delivery: the server answers `200` only after `on_batch` returned (the rows are
durable), and answers `500` (nothing acknowledged) if it raised. A client that
retries after a lost `200` is stored once if it resends the same signed request
or the same `Idempotency-Key` within the replay window (see below); later, or
after a restart of the server, it may be stored twice.

Signing (when a `secret` is set): `X-Signature: t=<unix seconds>,v1=<hex>`,
where `<hex>` is the HMAC-SHA256 of `"<t>." + raw body` under the secret
(several `v1=` entries are accepted, for key rotation; see `sign`). A request
whose `t` is more than `tolerance_s` (default 300) seconds away from the
server's clock is refused, and a signature already accepted is not stored
again: each signature and each `Idempotency-Key` value is remembered, in the
server process, for twice the tolerance; a duplicate gets `200` with
`"duplicate": true` and writes nothing.

Rejections write nothing:

- `401` when a `secret` is set and the request is unsigned, wrongly signed or
  outside the tolerance window.
- `413` when the body is larger than `max_body` (checked on Content-Length,
  before reading the body).
- `411` without a Content-Length; `400` for a bad or repeated Content-Length,
  a body shorter than its Content-Length, or a body that is not UTF-8; `405`
  for methods other than POST; `409` while a request with the same signature
  or idempotency key is still being stored; `503` when `max_connections`
  connections are open already (the connection is closed at once).
- A request not read in full within `request_timeout_s` of waiting for it
  (slowloris) is dropped without an answer.

Set-ups refused with `InvalidInput`: an empty secret, and a bind address other
than loopback without a secret. The server binds `127.0.0.1` by default. It
runs in a background thread; use it as a context manager. `stop()` is
graceful: it stops accepting, lets the requests being handled finish (up to
`grace_s`), then closes the idle connections.

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
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pyarrow as pa

from storage.errors import InvalidInput

from .errors import WebhookError

__all__ = ["IDEMPOTENCY_HEADER", "SIGNATURE_HEADER", "WebhookServer", "sign", "webhook_schema"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_MAX_KEY = 256  # longest accepted idempotency key, in characters


def webhook_schema(include_headers: bool = False) -> pa.Schema:
    """The row schema of a webhook collection: `body` (and `headers`, a JSON object)."""
    fields = [pa.field("body", pa.string(), nullable=False)]
    if include_headers:
        fields.append(pa.field("headers", pa.string(), nullable=False))
    return pa.schema(fields)


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _mac(key: bytes, t: str, body: bytes) -> str:
    return hmac.new(key, t.encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The `X-Signature` header value for `body`: `"t=<unix seconds>,v1=<hex>"`.

    `<hex>` is the HMAC-SHA256, under `secret`, of `"<t>." + body`; `timestamp`
    defaults to now.

    >>> sign("s3cret", b'{"a": 1}', timestamp=1700000000)
    't=1700000000,v1=82fc0b8ba35d4f5b38af534e00d41a2de7d21fa3bae904bd50a8f0c3a7afb835'
    """
    t = str(int(time.time()) if timestamp is None else int(timestamp))
    return f"t={t},v1={_mac(_key(secret), t, body)}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Seen:
    """Signatures and idempotency keys accepted recently, each remembered for `keep_s` seconds.

    A key is `pending` while its request is being stored (a concurrent
    duplicate gets 409), then `done` (a duplicate gets 200 and writes nothing);
    a failed store forgets it, so the retry may succeed.
    """

    def __init__(self, keep_s: float, max_keys: int):
        self.keep_s = keep_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        # key -> (expires at, monotonic; done). Insertion order is expiry order:
        # every entry gets now + keep_s, and a key made done moves to the end.
        self._keys: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    def claim(self, keys: list[str]) -> str | None:
        """None (the keys are now pending), or why not: "duplicate", "pending" or "full"."""
        now = time.monotonic()
        with self._lock:
            while self._keys:
                k, (exp, _) = next(iter(self._keys.items()))
                if exp > now:
                    break
                self._keys.popitem(last=False)
            for k in keys:
                got = self._keys.get(k)
                if got is not None:
                    return "duplicate" if got[1] else "pending"
            if len(self._keys) + len(keys) > self.max_keys:
                return "full"
            for k in keys:
                self._keys[k] = (now + self.keep_s, False)
            return None

    def done(self, keys: list[str]) -> None:
        exp = time.monotonic() + self.keep_s
        with self._lock:
            for k in keys:
                self._keys[k] = (exp, True)
                self._keys.move_to_end(k)

    def forget(self, keys: list[str]) -> None:
        with self._lock:
            for k in keys:
                self._keys.pop(k, None)


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each bounded by what is left of one deadline (a dripping client cannot extend it)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not read within the request timeout")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once; tracks connections for a graceful stop."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], handler: Any, max_connections: int):
        self.max_connections = max_connections
        self.cond = threading.Condition()
        self.open_socks: set[socket.socket] = set()
        self.busy = 0  # requests being handled (between their request line and their answer)
        self.closing = False
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.cond:
            full = len(self.open_socks) >= self.max_connections or self.closing
            if not full:
                self.open_socks.add(request)
        if full:
            try:
                request.settimeout(0.5)
                msg = b'{"status": 503, "message": "too many open connections"}\n'
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(msg)).encode() + b"\r\n\r\n" + msg
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.cond:
                self.open_socks.discard(request)
                self.cond.notify_all()


class WebhookServer:
    """An HTTP endpoint appending each request body to a collection (see the module docstring).

    Args:
        host: Interface to bind; `127.0.0.1` by default. Any other than loopback
            needs a `secret`.
        port: TCP port; 0 picks a free one (see `.port` / `.url`).
        on_batch: Where rows go: a thread-safe callable taking a `pyarrow.Table`,
            or an object with `monotonic_append(rows, at_least)`.
        secret: HMAC-SHA256 key (not empty); when set, requests must carry a
            valid `X-Signature` (see `sign`) within `tolerance_s`, else 401.
        include_headers: Add a `headers` column (JSON object).
        max_body: Largest accepted body in bytes (default 1 MiB); larger gets 413.
        tolerance_s: How far a signature's timestamp may be from now; signatures
            and idempotency keys are remembered for twice this.
        max_connections: Open connections at most; more are answered 503 and closed.
        request_timeout_s: Time to receive a whole request (headers and body),
            counted from when the server starts waiting for it.
        max_remembered: Signatures and idempotency keys remembered at most; past
            it new requests get 503 until old ones expire.
        grace_s: How long `stop()` waits for the requests being handled.
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
        tolerance_s: float = 300.0,
        max_connections: int = 256,
        request_timeout_s: float = 10.0,
        max_remembered: int = 1_000_000,
        grace_s: float = 10.0,
    ) -> None:
        if not callable(on_batch) and not hasattr(on_batch, "monotonic_append"):
            raise InvalidInput(
                f"WebhookServer: on_batch must be callable or have monotonic_append(), got {type(on_batch).__name__}"
            )
        if max_body < 0:
            raise InvalidInput(f"WebhookServer: max_body must be >= 0 bytes, got {max_body}")
        if secret is not None and len(secret) == 0:
            raise InvalidInput("WebhookServer: the secret is empty; give a real secret or none")
        if secret is None and not _is_loopback(host):
            raise InvalidInput(
                f"WebhookServer: refusing to listen on {host!r} without a secret: anyone who can reach it "
                "could write; set a secret, or bind a loopback address behind a reverse proxy"
            )
        for what, v in (
            ("tolerance_s", tolerance_s),
            ("max_connections", max_connections),
            ("request_timeout_s", request_timeout_s),
            ("max_remembered", max_remembered),
        ):
            if not v > 0:
                raise InvalidInput(f"WebhookServer: {what} must be > 0, got {v}")
        self.host = host
        self.on_batch = on_batch
        self.secret = _key(secret) if secret is not None else None
        self.include_headers = include_headers
        self.max_body = max_body
        self.tolerance_s = tolerance_s
        self.request_timeout_s = request_timeout_s
        self.grace_s = grace_s
        self.schema = webhook_schema(include_headers)
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self._count_lock = threading.Lock()
        self._seen = _Seen(2 * tolerance_s, max_remembered)
        # SUBTLE: only a `monotonic_append` object (a WriteHandle: not thread-safe, one
        # commit per call anyway) is called under a lock; a callable is called concurrently,
        # so that the controller's appender commits all requests in flight at once.
        self._handle_lock = threading.Lock()
        try:
            self._httpd = _HTTPServer((host, port), self._handler_class(), max_connections)
        except OSError as e:
            raise WebhookError(f"WebhookServer: cannot listen on {host}:{port}: {e}") from None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> WebhookServer:
        """Serve in a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"webhook-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, let the requests being handled finish (up to `grace_s`), close all. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        httpd = self._httpd
        if self._thread is not None:
            httpd.shutdown()
            self._thread.join()
            self._thread = None
        httpd.server_close()
        deadline = time.monotonic() + self.grace_s
        with httpd.cond:
            httpd.closing = True
            while httpd.busy and time.monotonic() < deadline:
                httpd.cond.wait(deadline - time.monotonic())
            socks = list(httpd.open_socks)
        for s in socks:  # idle keep-alive connections (or requests past the grace): cut them
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with httpd.cond:
            while httpd.open_socks and time.monotonic() < deadline + 1.0:
                httpd.cond.wait(0.05)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until `stop()` (from another thread) or Ctrl-C."""
        self._httpd.serve_forever()

    # ---- request handling ----
    def _deliver(self, table: pa.Table) -> None:
        if hasattr(self.on_batch, "monotonic_append"):
            with self._handle_lock:
                self.on_batch.monotonic_append(table, int(time.time() * 1000))
        else:
            self.on_batch(table)

    def _check_signature(self, headers: Any, body: bytes) -> tuple[int, str] | str:
        """The accepted v1 signature, or (401, why)."""
        assert self.secret is not None
        got = headers.get_all(SIGNATURE_HEADER) or []
        if len(got) != 1:
            what = "missing" if not got else "repeated"
            return 401, f"{what} {SIGNATURE_HEADER} header (expected t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.' + body>)"
        t: str | None = None
        v1: list[str] = []
        for part in got[0].split(","):
            k, _, v = part.strip().partition("=")
            if k == "t":
                t = v
            elif k == "v1":
                v1.append(v)
        if t is None or not t.isascii() or not t.isdigit() or len(t) > 12 or not v1:
            return 401, f"malformed {SIGNATURE_HEADER} (expected t=<unix seconds>,v1=<hex>)"
        skew = time.time() - int(t)
        if abs(skew) > self.tolerance_s:
            return 401, f"{SIGNATURE_HEADER} timestamp is {abs(skew):.0f} s off the server's clock (tolerance {self.tolerance_s:g} s)"
        want = _mac(self.secret, t, body)
        for v in v1:
            if hmac.compare_digest(v.encode(), want.encode()):
                return want
        return 401, f"wrong {SIGNATURE_HEADER}"

    def _handle(self, method: str, headers: Any, read: Callable[[int], bytes]) -> tuple[int, dict[str, Any]]:
        """Decide on one request: returns (status, response fields). Writes only on a non-duplicate 200."""
        if method != "POST":
            return 405, {"message": "only POST is accepted"}
        lengths = headers.get_all("Content-Length") or []
        if headers.get("Transfer-Encoding") or not lengths:
            return 411, {"message": "a Content-Length header is required"}
        if len(lengths) > 1:
            return 400, {"message": f"{len(lengths)} Content-Length headers; exactly one is allowed"}
        raw = lengths[0]
        # Strict: int() would also take "+5", " 5 " or "1_000".
        if not raw.isascii() or not raw.isdigit():
            return 400, {"message": f"bad Content-Length {raw!r}"}
        length = int(raw)
        if length > self.max_body:
            return 413, {"message": f"body of {length} bytes is larger than the limit of {self.max_body} bytes"}
        body = read(length)
        if len(body) < length:
            return 400, {"message": f"body ended after {len(body)} of its Content-Length {length} bytes"}
        keys: list[str] = []
        if self.secret is not None:
            sig = self._check_signature(headers, body)
            if isinstance(sig, tuple):
                return sig[0], {"message": sig[1]}
            keys.append("sig:" + sig)
        idem = headers.get_all(IDEMPOTENCY_HEADER) or []
        if len(idem) > 1:
            return 400, {"message": f"repeated {IDEMPOTENCY_HEADER} header"}
        if idem:
            if not 0 < len(idem[0]) <= _MAX_KEY:
                return 400, {"message": f"{IDEMPOTENCY_HEADER} must be 1 to {_MAX_KEY} characters"}
            keys.append("key:" + idem[0])
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return 400, {"message": f"body is not UTF-8 (byte {e.start})"}
        cols: dict[str, Any] = {"body": [text]}
        if self.include_headers:
            cols["headers"] = [json.dumps({k.lower(): v for k, v in headers.items()}, sort_keys=True)]
        table = pa.table(cols, schema=self.schema)
        if keys:
            why = self._seen.claim(keys)
            if why == "duplicate":
                return 200, {"message": "duplicate: already stored", "duplicate": True}
            if why == "pending":
                return 409, {"message": "the same request is being stored; retry"}
            if why == "full":
                return 503, {"message": "too many requests remembered for replay protection; retry later"}
        try:
            self._deliver(table)
        except Exception as e:  # noqa: BLE001 - reported to the client, nothing acknowledged
            self._seen.forget(keys)
            log.exception("webhook: delivering a request failed")
            return 500, {"message": f"append failed: {type(e).__name__}: {e}"}
        self._seen.done(keys)
        return 200, {"message": "ok"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = server.request_timeout_s  # writes; reads are bounded by the deadline

            def setup(self) -> None:
                super().setup()
                self.rfile.close()
                self._raw = _DeadlineReader(self.connection)
                self.rfile = io.BufferedReader(self._raw)

            def handle_one_request(self) -> None:
                # SUBTLE: one deadline for waiting for, and reading, the whole request:
                # a per-read timeout would let a client dripping a byte at a time hold
                # its thread forever (slowloris).
                self._raw.deadline = time.monotonic() + server.request_timeout_s
                super().handle_one_request()

            def _respond(self) -> None:
                httpd = server._httpd
                with httpd.cond:
                    httpd.busy += 1
                try:
                    status, fields = server._handle(self.command, self.headers, self.rfile.read)
                    self._answer(status, fields)
                finally:
                    with httpd.cond:
                        httpd.busy -= 1
                        httpd.cond.notify_all()

            def _answer(self, status: int, fields: dict[str, Any]) -> None:
                with server._count_lock:
                    if status != 200:
                        server.rejected += 1
                    elif fields.get("duplicate"):
                        server.duplicates += 1
                    else:
                        server.accepted += 1
                if status != 200 or server._httpd.closing:
                    # Unread bodies (413, 411) would be parsed as the next request.
                    self.close_connection = True
                data = (json.dumps({"status": status, **fields}) + "\n").encode()
                self.connection.settimeout(server.request_timeout_s)
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

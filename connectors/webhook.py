"""`WebhookServer`: an HTTP endpoint that appends each request to an append-only collection.

Each accepted `POST` becomes one row, `body` (the request body as UTF-8 text)
and, with `include_headers=True`, `headers` (a JSON object of the lower-cased
header names to values), handed as a one-row `pyarrow.Table` to `on_batch`:

- the storage controller's `ctl.monotonic_appender(name)`: requests in flight are
  queued on it without a thread each and committed together (one commit per
  batch of requests, "group commit");
- a callable `on_batch(table)` of your own. It is called from a pool of threads
  **concurrently**: it must be thread-safe; or
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
than loopback without a secret. The server binds `127.0.0.1` by default.

It is uvicorn (an asyncio HTTP server, httptools parser) running this module's
ASGI app in a background thread; use it as a context manager. `stop()` is
graceful: it stops accepting, closes idle connections, lets the requests being
handled finish (up to `grace_s`), then returns.

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

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from storage.controller import MonotonicAppender
from storage.errors import InvalidInput

from .errors import WebhookError

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
    a failed store forgets it, so the retry may succeed. Each key costs about
    150 bytes (a 16-byte digest and a float in an ordered dict).
    """

    def __init__(self, keep_s: float, max_keys: int):
        self.keep_s = keep_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        # digest -> expiry (time.monotonic()), negated while pending. Insertion order is
        # expiry order: every entry gets now + keep_s, and a key made done moves to the end.
        self._keys: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _digests(keys: list[str]) -> list[bytes]:
        return [hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest() for k in keys]

    def claim(self, keys: list[str]) -> str | None:
        """None (the keys are now pending), or why not: "duplicate", "pending" or "full"."""
        ds = self._digests(keys)
        now = time.monotonic()
        with self._lock:
            while self._keys:
                exp = next(iter(self._keys.values()))
                if abs(exp) > now:
                    break
                self._keys.popitem(last=False)
            for d in ds:
                got = self._keys.get(d)
                if got is not None:
                    return "duplicate" if got > 0 else "pending"
            if len(self._keys) + len(ds) > self.max_keys:
                return "full"
            for d in ds:
                self._keys[d] = -(now + self.keep_s)
            return None

    def done(self, keys: list[str]) -> None:
        ds = self._digests(keys)
        exp = time.monotonic() + self.keep_s
        with self._lock:
            for d in ds:
                self._keys[d] = exp
                self._keys.move_to_end(d)

    def forget(self, keys: list[str]) -> None:
        ds = self._digests(keys)
        with self._lock:
            for d in ds:
                self._keys.pop(d, None)

    def __len__(self) -> int:
        return len(self._keys)


class _Headers:
    """A request's headers (ASGI: lower-cased names, bytes), looked up by name."""

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]):
        self.raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.raw if k == name]

    def get(self, name: str) -> str | None:
        got = self.get_all(name)
        return got[0] if got else None

    def items(self) -> list[tuple[str, str]]:
        return self.raw


_TOO_MANY = b'{"status": 503, "message": "too many open connections"}\n'
_TOO_MANY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TOO_MANY)).encode() + b"\r\n\r\n" + _TOO_MANY
)


def _protocol_class(server: WebhookServer) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, bounded: connections at most, a deadline per request, EOF mid-body."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Protocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > server.max_connections:
                transport.write(_TOO_MANY_RESPONSE)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            # SUBTLE: one deadline for waiting for, and reading, the whole request (headers
            # and body): a client dripping a byte at a time cannot extend it (slowloris).
            self._disarm()
            self._deadline = self.loop.call_later(server.request_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()  # connection_lost tells a waiting app "http.disconnect"

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol's contract
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return None  # idle, or headers not complete: close
            # SUBTLE: the client stopped sending while a request is open. Keep the socket
            # open for the answer (a half-close is legal), and if the body was still
            # coming, end it here: the app sees a body shorter than its Content-Length
            # and answers 400 (uvicorn alone would wait for the rest, then drop the answer).
            cycle.keep_alive = False
            if cycle.more_body:
                cycle.more_body = False
                cycle.message_event.set()
            return True

    return Protocol


class WebhookServer:
    """An HTTP endpoint appending each request body to a collection (see the module docstring).

    Args:
        host: Interface to bind; `127.0.0.1` by default. Any other than loopback
            needs a `secret`.
        port: TCP port; 0 picks a free one (see `.port` / `.url`).
        on_batch: Where rows go: the controller's `MonotonicAppender`, a
            thread-safe callable taking a `pyarrow.Table`, or an object with
            `monotonic_append(rows, at_least)`.
        secret: HMAC-SHA256 key (not empty); when set, requests must carry a
            valid `X-Signature` (see `sign`) within `tolerance_s`, else 401.
        include_headers: Add a `headers` column (JSON object).
        max_body: Largest accepted body in bytes (default 1 MiB); larger gets 413.
        tolerance_s: How far a signature's timestamp may be from now; signatures
            and idempotency keys are remembered for twice this.
        max_connections: Open connections at most; more are answered 503 and closed.
        request_timeout_s: Time to receive a whole request (headers and body),
            counted from its first byte (from the connection, for the first one);
            an idle kept-alive connection is closed after 5 s.
        max_remembered: Signatures and idempotency keys remembered at most (about
            150 bytes each: 2M, the default, is about 300 MB, i.e. 1,600 requests/s
            with a key each for a 300 s tolerance); past it new requests get 503
            until old ones expire.
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
        max_remembered: int = 2_000_000,
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
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.grace_s = grace_s
        self.schema = webhook_schema(include_headers)
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self._seen = _Seen(2 * tolerance_s, max_remembered)
        # The controller's appender (also as its bound `append`): queued from the event
        # loop, awaited as a future; no thread per request, one commit per batch.
        target = getattr(on_batch, "__self__", None) if getattr(on_batch, "__name__", "") == "append" else on_batch
        self._appender = target if isinstance(target, MonotonicAppender) else None
        # Anything else runs in a pool of threads; a `monotonic_append` object (a
        # WriteHandle: not thread-safe, and one commit per call anyway) under a lock.
        self._pool = ThreadPoolExecutor(max_workers=min(32, max_connections), thread_name_prefix="webhook-deliver")
        self._handle_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # SUBTLE: proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only
        # then, and without it a response's second write waits for the client's delayed ACK
        # (about 40 ms per request).
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(1024)
        except OSError as e:
            self._sock.close()
            raise WebhookError(f"WebhookServer: cannot listen on {host}:{port}: {e}") from None
        self._sock.setblocking(False)
        import uvicorn  # imported here: `import connectors` stays light for the CLI

        config = uvicorn.Config(
            self._app,
            http=_protocol_class(self),
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            log_config=None,  # a library: leave the logging set-up to the application
            access_log=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._server.server_state.connections)

    def start(self) -> WebhookServer:
        """Serve in a background thread; returns self once it accepts connections."""
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name=f"webhook-{self.port}", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 30
            while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            if not self._server.started:
                raise WebhookError(f"WebhookServer: the server on {self.url} did not start")
        return self

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def stop(self) -> None:
        """Stop accepting, close idle connections, let the requests in flight finish (up to
        `grace_s`), then close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._closing = True
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.grace_s + 10)
            self._thread = None
        self._sock.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until `stop()` (from another thread) or, in the main thread, SIGINT/SIGTERM."""
        self._server.run(sockets=[self._sock])

    # ---- request handling ----
    async def _deliver(self, table: pa.Table) -> None:
        if self._appender is not None and self._appender.commits_in_background:
            await asyncio.wrap_future(self._appender.append(table, wait=False))
            return
        loop = asyncio.get_running_loop()
        if hasattr(self.on_batch, "monotonic_append"):
            await loop.run_in_executor(self._pool, self._monotonic_append, table)
        else:
            await loop.run_in_executor(self._pool, self.on_batch, table)

    def _monotonic_append(self, table: pa.Table) -> None:
        target: Any = self.on_batch
        with self._handle_lock:
            target.monotonic_append(table, int(time.time() * 1000))

    def _check_signature(self, headers: _Headers, body: bytes) -> tuple[int, str] | str:
        """The accepted v1 signature, or (401, why)."""
        assert self.secret is not None
        got = headers.get_all(SIGNATURE_HEADER)
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

    def _check_length(self, method: str, headers: _Headers) -> tuple[int, dict[str, Any]] | int:
        """The body's length, or (status, response fields)."""
        if method != "POST":
            return 405, {"message": "only POST is accepted"}
        lengths = headers.get_all("Content-Length")
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
        return length

    async def _handle(self, method: str, headers: _Headers, receive: Any) -> tuple[int, dict[str, Any]] | None:
        """Decide on one request: (status, response fields), or None if the client left.
        Writes only on a non-duplicate 200."""
        length = self._check_length(method, headers)
        if isinstance(length, tuple):
            return length
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None  # gone (or too slow): nothing stored, nobody to answer
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        if len(body) != length:
            return 400, {"message": f"body ended after {len(body)} of its Content-Length {length} bytes"}
        keys: list[str] = []
        if self.secret is not None:
            sig = self._check_signature(headers, body)
            if isinstance(sig, tuple):
                return sig[0], {"message": sig[1]}
            keys.append("sig:" + sig)
        idem = headers.get_all(IDEMPOTENCY_HEADER)
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
            cols["headers"] = [json.dumps(dict(headers.items()), sort_keys=True)]
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
            await self._deliver(table)
        except Exception as e:  # noqa: BLE001 - reported to the client, nothing acknowledged
            self._seen.forget(keys)
            log.exception("webhook: delivering a request failed")
            return 500, {"message": f"append failed: {type(e).__name__}: {e}"}
        except asyncio.CancelledError:
            self._seen.forget(keys)  # stopped past the grace period: not acknowledged
            raise
        self._seen.done(keys)
        return 200, {"message": "ok"}

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        got = await self._handle(scope["method"], _Headers(scope["headers"]), receive)
        if got is None:
            self.rejected += 1
            return
        status, fields = got
        if status != 200:
            self.rejected += 1
        elif fields.get("duplicate"):
            self.duplicates += 1
        else:
            self.accepted += 1
        data = (json.dumps({"status": status, **fields}) + "\n").encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if status != 200 or self._closing:
            # Unread bodies (413, 411) would be parsed as the next request.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

"""connectors.webhook under hostile or unlucky clients (issue 14, items 3-6).

Truncated and ambiguous bodies, replayed and retried deliveries, unsafe set-ups,
slow and too many connections, concurrent delivery (the appender's batching), and
`shardflow webhook` killed with SIGKILL right after its last acknowledgement.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from connectors.webhook import WebhookServer, sign
from storage.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]


def post(srv: WebhookServer | int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    port = srv if isinstance(srv, int) else srv.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


# ---- item 3: truncated and ambiguous bodies ----


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_a_body_shorter_than_its_content_length_is_400_and_stored_nowhere(secret: str | None) -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append, secret=secret) as srv:
        sig = f"X-Signature: {sign(secret, b'hello')}\r\n" if secret else ""
        resp = raw_exchange(
            srv.port, f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n{sig}\r\nhello".encode()
        )
        assert status_of(resp) == 400 and b"body ended after 5 of its Content-Length 20 bytes" in resp
    assert got == []


def test_two_content_length_headers_are_400() -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append) as srv:
        resp = raw_exchange(
            srv.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert status_of(resp) == 400  # refused by the HTTP parser already
        resp = raw_exchange(
            srv.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert status_of(resp) == 400
    assert got == []


# ---- item 4: replay ----


def test_a_replayed_signed_request_is_stored_once() -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append, secret="s3cret") as srv:
        body = b'{"event": "paid"}'
        hdr = {"X-Signature": sign("s3cret", body)}
        assert post(srv, body, hdr)[0] == 200
        status, msg = post(srv, body, hdr)  # the attacker's (or a retrying client's) replay
        assert status == 200 and msg["duplicate"] is True
        assert (srv.accepted, srv.duplicates) == (1, 1)
    assert len(got) == 1


def test_signatures_outside_the_tolerance_window_are_refused() -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append, secret="s3cret", tolerance_s=60) as srv:
        body = b"{}"
        old = sign("s3cret", body, timestamp=int(time.time()) - 3600)
        status, msg = post(srv, body, {"X-Signature": old})
        assert status == 401 and "off the server's clock" in msg["message"]
        future = sign("s3cret", body, timestamp=int(time.time()) + 3600)
        assert post(srv, body, {"X-Signature": future})[0] == 401
        # The old scheme (HMAC of the body alone) is replayable forever: refused.
        legacy = "sha256=" + sign("s3cret", body).split("v1=")[1]
        assert post(srv, body, {"X-Signature": legacy})[0] == 401
        # Rotation: several v1 entries, one of them right.
        t = int(time.time())
        good = sign("s3cret", body, timestamp=t).split("v1=")[1]
        bad = sign("old-secret", body, timestamp=t).split("v1=")[1]
        assert post(srv, body, {"X-Signature": f"t={t},v1={bad},v1={good}"})[0] == 200
    assert len(got) == 1


def test_a_retried_delivery_with_an_idempotency_key_is_stored_once() -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append, secret="s3cret") as srv:
        body = b'{"order": 7}'
        first = sign("s3cret", body, timestamp=int(time.time()) - 5)
        retry = sign("s3cret", body)  # re-signed on retry: another signature, the same key
        assert first != retry
        assert post(srv, body, {"X-Signature": first, "Idempotency-Key": "order-7"})[0] == 200
        status, msg = post(srv, body, {"X-Signature": retry, "Idempotency-Key": "order-7"})
        assert status == 200 and msg.get("duplicate") is True
        # A replay of the first request under a new key is still the same signature.
        assert post(srv, body, {"X-Signature": first, "Idempotency-Key": "other"})[1].get("duplicate") is True
        assert post(srv, b'{"order": 8}', {"X-Signature": sign("s3cret", b'{"order": 8}'), "Idempotency-Key": "order-8"})[0] == 200
    assert [t.to_pylist()[0]["body"] for t in got] == ['{"order": 7}', '{"order": 8}']


def test_a_failed_delivery_can_be_retried_with_the_same_key() -> None:
    calls: list[pa.Table] = []

    def flaky(t: pa.Table) -> None:
        calls.append(t)
        if len(calls) == 1:
            raise OSError("disk full")

    with WebhookServer(on_batch=flaky) as srv:
        assert post(srv, b"x", {"Idempotency-Key": "k"})[0] == 500
        status, msg = post(srv, b"x", {"Idempotency-Key": "k"})
        assert status == 200 and not msg.get("duplicate")
        assert post(srv, b"x", {"Idempotency-Key": "k"})[1].get("duplicate") is True
    assert len(calls) == 2


def test_the_replay_memory_is_bounded() -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append, max_remembered=2) as srv:
        assert post(srv, b"1", {"Idempotency-Key": "k1"})[0] == 200
        assert post(srv, b"2", {"Idempotency-Key": "k2"})[0] == 200
        status, msg = post(srv, b"3", {"Idempotency-Key": "k3"})
        assert status == 503 and "replay protection" in msg["message"]
        assert post(srv, b"1", {"Idempotency-Key": "k1"})[1].get("duplicate") is True
        assert post(srv, b"4")[0] == 200, "requests without a key are not remembered"
    assert len(got) == 3


# ---- item 5: unsafe set-ups, connection and time bounds ----


def test_unsafe_set_ups_are_refused() -> None:
    with pytest.raises(InvalidInput, match="secret is empty"):
        WebhookServer(on_batch=lambda t: None, secret="")
    with pytest.raises(InvalidInput, match="secret is empty"):
        WebhookServer(on_batch=lambda t: None, secret=b"")
    with pytest.raises(InvalidInput, match="refusing to listen on '0.0.0.0' without a secret"):
        WebhookServer("0.0.0.0", on_batch=lambda t: None)
    with pytest.raises(InvalidInput, match="without a secret"):
        WebhookServer("", on_batch=lambda t: None)
    WebhookServer("0.0.0.0", on_batch=lambda t: None, secret="s").stop()
    WebhookServer("::1" if socket.has_ipv6 else "127.0.0.2", on_batch=lambda t: None).stop()


def test_a_dripping_client_is_cut_off_at_the_request_timeout() -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append, request_timeout_s=0.5) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
        closed = False
        try:
            for b in request:  # one byte every 0.1 s: each read is quick, the request is not
                s.sendall(bytes([b]))
                time.sleep(0.1)
        except OSError:
            closed = True
        if not closed:
            s.settimeout(10)
            try:
                closed = s.recv(100) == b""
            except ConnectionResetError:
                closed = True
        s.close()
        assert closed, "the server still holds the dripping connection"
    assert got == []


def test_connections_past_the_limit_are_turned_away() -> None:
    with WebhookServer(on_batch=lambda t: None, max_connections=2) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        try:
            deadline = time.monotonic() + 10
            while srv.open_connections < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            # The answer comes on accept (sending first could race with the close into a reset).
            resp = raw_exchange(srv.port, b"", half_close=False)
            assert status_of(resp) == 503 and b"too many open connections" in resp
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while srv.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert post(srv, b"x")[0] == 200


# ---- item 6: concurrency and durability ----


def test_requests_are_delivered_concurrently() -> None:
    """Four requests in flight reach `on_batch` together (a lock per append would serialise them,
    defeating the appender's group commit)."""
    barrier = threading.Barrier(4, timeout=10)

    def sink(t: pa.Table) -> None:
        barrier.wait()

    with WebhookServer(on_batch=sink) as srv:
        results: list[int] = []
        ts = [threading.Thread(target=lambda i=i: results.append(post(srv, f"{i}".encode())[0])) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert results == [200] * 4


def _start_cli(data: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "webhook", "hooks", "--data", str(data), "--port", str(port), *extra],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bodies(data: Path) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "query", "--data", str(data), "--format", "json", "SELECT body FROM hooks"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return [row["body"] for row in json.loads(r.stdout)] if r.stdout.strip().startswith("[") else [
        json.loads(line)["body"] for line in r.stdout.splitlines() if line.strip()
    ]


def test_cli_webhook_every_acknowledged_request_survives_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    p = _start_cli(data, port, "--secret-env", "HOOK_SECRET", env={"HOOK_SECRET": "s3cret"})
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert f"listening on http://127.0.0.1:{port}/" in line, line + (p.stderr.read() if p.stderr else "")
        acked: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for n in range(15):
                body = json.dumps({"client": i, "n": n}).encode()
                conn.request("POST", "/", body=body, headers={"X-Signature": sign("s3cret", body)})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    with lock:
                        acked.append(body.decode())
            conn.close()

        ts = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        os.kill(p.pid, signal.SIGKILL)  # right after the last acknowledgement
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    assert len(acked) == 120
    assert sorted(_bodies(data)) == sorted(acked)


def test_cli_webhook_stops_gracefully(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    p = _start_cli(data, port)
    assert p.stdout is not None
    assert "listening" in p.stdout.readline()
    assert post(port, b"one")[0] == 200
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "1 stored" in out
    assert _bodies(data) == ["one"]


@pytest.mark.parametrize(
    "extra, env, msg",
    [
        (["--host", "0.0.0.0"], {}, "without a secret"),
        (["--secret-env", "NOPE_UNSET_VAR"], {}, "NOPE_UNSET_VAR: the environment variable is not set"),
        (["--secret-env", "HOOK_SECRET"], {"HOOK_SECRET": ""}, "the secret is empty"),
    ],
)
def test_cli_webhook_refuses_unsafe_set_ups(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    env: dict[str, str],
    msg: str,
) -> None:
    from flows.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(["webhook", "hooks", "--data", str(tmp_path / "data"), "--port", "0", *extra])
    err = capsys.readouterr().err
    assert rc != 0 and msg in err, err

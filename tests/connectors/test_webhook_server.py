"""connectors.webhook: good, unsigned, wrongly signed and oversized requests; appends into a shard."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from connectors.webhook import WebhookServer, sign, webhook_schema


def post(srv: WebhookServer, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request("POST", "/hook", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_binds_loopback_by_default() -> None:
    with WebhookServer(on_batch=lambda t: None) as srv:
        assert srv._sock.getsockname()[0] == "127.0.0.1"
        assert srv.url == f"http://127.0.0.1:{srv.port}/"


def test_signed_unsigned_wrong_and_oversized() -> None:
    got: list[pa.Table] = []
    with WebhookServer(on_batch=got.append, secret="s3cret", include_headers=True, max_body=64) as srv:
        body = b'{"event": "paid", "id": 7}'
        status, _ = post(srv, body, {"X-Signature": sign("s3cret", body), "X-Request-Id": "r1"})
        assert status == 200
        status, msg = post(srv, body)
        assert status == 401 and "missing X-Signature" in msg["message"]
        status, _ = post(srv, body, {"X-Signature": sign("other", body)})
        assert status == 401
        status, _ = post(srv, body + b" ", {"X-Signature": sign("s3cret", body)})  # body tampered with
        assert status == 401
        big = b"x" * 65
        status, msg = post(srv, big, {"X-Signature": sign("s3cret", big)})
        assert status == 413 and "limit of 64 bytes" in msg["message"]
        status, _ = post(srv, b"\xff\xfe", {"X-Signature": sign("s3cret", b"\xff\xfe")})
        assert status == 400
        assert (srv.accepted, srv.rejected) == (1, 5)
    assert len(got) == 1, "rejected requests write nothing"
    row = got[0].to_pylist()[0]
    assert row["body"] == body.decode()
    assert json.loads(row["headers"])["x-request-id"] == "r1"
    assert got[0].schema == webhook_schema(include_headers=True)


def test_appends_to_a_shard_and_reports_failures(tmp_path: Path) -> None:
    client = storage.open(tmp_path)
    shard = storage.ShardId.new()
    w = client.open_writer(shard, schema=webhook_schema())
    with WebhookServer(on_batch=w) as srv:
        for i in range(3):
            assert post(srv, f"body {i}".encode())[0] == 200
    upper = w.upper.time
    assert upper is not None and upper > 1_600_000_000_000, "rows are written at wall-clock milliseconds"
    with client.open_leased_reader(shard) as r:
        assert sorted(x["body"] for x in r.snapshot(upper - 1).to_pylist()) == ["body 0", "body 1", "body 2"]

    def broken(t: pa.Table) -> None:
        raise OSError("disk full")

    with WebhookServer(on_batch=broken) as srv:
        status, msg = post(srv, b"x")
        assert status == 500 and "disk full" in msg["message"]


def test_rejects_bad_on_batch() -> None:
    with pytest.raises(ValueError, match="on_batch must be callable"):
        WebhookServer(on_batch=42)

"""PostgresConsensus under connection faults: a lost COMMIT reply, a dropped connection.

A real TCP proxy (threads, sockets) sits between the client and a real
PostgreSQL server and cuts the connection at a chosen moment:

- `cut_after_commit`: COMMIT reaches the server, which commits, but its reply
  never reaches the client. The outcome is unknown to the client; the CAS must
  be recognised as committed (not applied twice, not reported as lost).
- `cut_before_insert`: the connection dies before the INSERT reaches the
  server. Nothing committed; the CAS must be retried and succeed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from storage.consensus import PostgresConsensus, VersionedData
from storage.errors import ConsensusUnavailable

pytestmark = pytest.mark.postgres


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the server; `arm(mode)` cuts the next matching connection once."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.mode: str | None = None
        self.cuts = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str) -> None:
        with self._lock:
            self.mode = mode

    def _take(self, data: bytes) -> str | None:
        with self._lock:
            mode = self.mode
            if mode == "cut_after_commit" and b"COMMIT" in data:
                self.mode = None
                return mode
            if mode == "cut_before_insert" and b"INSERT" in data:
                self.mode = None
                return mode
        return None

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._open += [client, server]
            muted = threading.Event()  # set: replies of this connection are dropped
            threading.Thread(target=self._up, args=(client, server, muted), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, muted), daemon=True).start()

    def _kill(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _up(self, client: socket.socket, server: socket.socket, muted: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                cut = self._take(data)
                if cut == "cut_before_insert":
                    self.cuts += 1
                    self._kill(client, server)
                    return
                if cut == "cut_after_commit":
                    # Let the server commit, and make sure its reply is lost.
                    muted.set()
                    server.sendall(data)
                    time.sleep(0.3)  # the server has processed COMMIT by now
                    self.cuts += 1
                    self._kill(client, server)
                    return
                server.sendall(data)
        except OSError:
            pass
        self._kill(client, server)

    def _down(self, server: socket.socket, client: socket.socket, muted: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if muted.is_set():
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        with self._lock:
            socks, self._open = self._open, []
        self._kill(*socks)


@pytest.fixture
def proxied(pg_server, pg_dsn: str) -> Iterator[tuple[CuttingProxy, str]]:  # noqa: ANN001
    proxy = CuttingProxy(pg_server.port)
    dsn = pg_dsn.replace(f":{pg_server.port}/", f":{proxy.port}/") + "?sslmode=disable"
    yield proxy, dsn
    proxy.close()


def test_lost_commit_reply_is_recognised_as_committed(proxied) -> None:  # noqa: ANN001
    proxy, dsn = proxied
    c = PostgresConsensus(dsn, timeout=20)
    try:
        assert c.compare_and_set("k", None, VersionedData(0, b"v0"))
        proxy.arm("cut_after_commit")
        # The server committed v1, the client never heard: it must still say True.
        assert c.compare_and_set("k", 0, VersionedData(1, b"v1")) is True
        assert proxy.cuts == 1
        assert [(v.seqno, v.data) for v in c.scan("k", 0)] == [(0, b"v0"), (1, b"v1")]
        # And a CAS that did not commit before the cut is simply retried.
        proxy.arm("cut_before_insert")
        assert c.compare_and_set("k", 1, VersionedData(2, b"v2")) is True
        assert proxy.cuts == 2
        assert [(v.seqno, v.data) for v in c.scan("k", 0)] == [(0, b"v0"), (1, b"v1"), (2, b"v2")]
        # A stale expectation is still a lost CAS, cut or not.
        proxy.arm("cut_before_insert")
        assert c.compare_and_set("k", 1, VersionedData(2, b"other")) is False
    finally:
        c.close()


def test_append_with_lost_commit_reply_lands_once(proxied, tmp_path: Path) -> None:  # noqa: ANN001
    proxy, dsn = proxied
    client = storage.open(tmp_path / "s", consensus=PostgresConsensus(dsn, timeout=20), fsync=False)
    try:
        schema = pa.schema([("k", pa.string())])
        shard = storage.ShardId.new()
        w = client.open_writer(shard, schema, compact=False)

        def upd(keys: list[str], t: int) -> pa.Table:
            n = len(keys)
            return pa.table({"k": keys, "_time": pa.array([t] * n, pa.int64()), "_diff": pa.array([1] * n, pa.int64())})

        w.compare_and_append(upd(["a", "b"], 0), 0, 1)
        # Without a token, a naive retry would see upper 2 and raise UpperMismatch for an
        # append that did land; the caller would then write it again.
        proxy.arm("cut_after_commit")
        out = w.compare_and_append(upd(["c"], 1), 1, 2)
        assert proxy.cuts == 1
        assert isinstance(out, storage.Appended), out  # committed once, and reported so
        proxy.arm("cut_after_commit")
        out = w.compare_and_append(upd(["d"], 2), 2, 3, token="t-3")
        assert proxy.cuts == 2
        assert isinstance(out, storage.Appended), out
        proxy.arm("cut_before_insert")
        w.compare_and_append(upd(["e"], 3), 3, 4)
        assert proxy.cuts == 3
        r = client.open_leased_reader(shard, heartbeat=False)
        got = sorted(r.snapshot(3).column("k").to_pylist())
        assert got == ["a", "b", "c", "d", "e"]  # nothing lost, nothing doubled
        assert w.upper == storage.Frontier(4)
        r.expire()
    finally:
        client.close()


def test_database_down_is_one_clear_error(pg_server, tmp_path: Path) -> None:  # noqa: ANN001
    # Nothing listens on this port: bounded retries, then the database is named.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises(ConsensusUnavailable) as e:
        PostgresConsensus(f"postgresql://postgres@127.0.0.1:{port}/nowhere", timeout=1.5)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert msg.startswith(f"postgres consensus postgresql://127.0.0.1:{port}/nowhere: connect failed for ")
    assert "\n" not in msg


def test_commit_still_in_flight_after_the_cut_is_not_reported_lost(proxied, pg_dsn: str) -> None:  # noqa: ANN001
    """The reply is lost while the server is still committing (a deferred trigger sleeps).

    The retry first does not see the row, then its own INSERT waits for the
    in-flight commit and collides with it: that must read as "committed", not
    as a lost CAS.
    """
    import psycopg

    proxy, dsn = proxied
    c = PostgresConsensus(dsn, timeout=20)
    try:
        assert c.compare_and_set("k", None, VersionedData(0, b"v0"))
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.data = 'slow'::bytea THEN PERFORM pg_sleep(1.5); END IF; RETURN NULL; END $$"
            )
            admin.execute(
                "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON consensus "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
            )
        proxy.arm("cut_after_commit")
        assert c.compare_and_set("k", 0, VersionedData(1, b"slow")) is True
        assert proxy.cuts == 1
        assert [(v.seqno, v.data) for v in c.scan("k", 0)] == [(0, b"v0"), (1, b"slow")]
    finally:
        c.close()

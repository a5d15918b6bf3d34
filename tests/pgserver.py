"""A throwaway PostgreSQL server for tests, built from the machine's own initdb/pg_ctl.

No pytest dependency: usable from test fixtures, benchmarks and scripts alike::

    from tests.pgserver import PgServer, pg_available

    if pg_available():
        with PgServer() as pg:
            dsn = pg.create_database("demo")  # postgresql://postgres@127.0.0.1:PORT/demo

The cluster lives in a fresh temporary folder, listens on 127.0.0.1 only (on a free
port, plus a Unix socket inside the folder), runs with ``wal_level=logical`` so CDC
tests can create replication slots, and is stopped (``pg_ctl -m immediate``) and
deleted when the ``with`` block exits, even on error.

When running as root, initdb/pg_ctl are run as an unprivileged user (``postgres``,
created with ``useradd`` if it does not exist) because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PgServer", "PgServerError", "find_pg_bin", "pg_available"]

#: Unprivileged OS user that owns the cluster when the tests run as root.
SERVICE_USER = "postgres"
#: Database superuser created by initdb (``-U``).
SUPERUSER = "postgres"

_LOG_TAIL_CHARS = 4000
_START_ATTEMPTS = 3


class PgServerError(RuntimeError):
    """initdb/pg_ctl failed; the message carries the command output and server log."""


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin/<tool>
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_pg_bin(name: str) -> str | None:
    """Path of a PostgreSQL tool (``initdb``, ``pg_ctl``...): PATH first, else the
    highest version under /usr/lib/postgresql/*/bin. ``None`` if not found."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [
        p
        for p in glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
        if os.path.isfile(p) and os.access(p, os.X_OK)
    ]
    if not candidates:
        return None
    return max(candidates, key=_version_key)


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _service_user_exists() -> bool:
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return False
    return True


def pg_available() -> bool:
    """True if a throwaway server can be started here: initdb and pg_ctl are found and,
    when running as root, an unprivileged user exists or can be created."""
    if find_pg_bin("initdb") is None or find_pg_bin("pg_ctl") is None:
        return False
    if _running_as_root() and not _service_user_exists():
        return shutil.which("useradd") is not None
    return True


def _ensure_service_user() -> pwd.struct_passwd:
    """The unprivileged user to run PostgreSQL as (root only); created if missing."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    if not _running_as_root():  # pragma: no cover - only called as root
        raise PgServerError(f"user {SERVICE_USER!r} does not exist and we are not root")
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PgServerError(
            f"running as root, user {SERVICE_USER!r} does not exist and useradd is not available"
        )
    nologin = shutil.which("nologin") or "/bin/false"
    proc = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", nologin, SERVICE_USER],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and not _service_user_exists():
        raise PgServerError(f"useradd {SERVICE_USER} failed: {proc.stderr.strip()}")
    return pwd.getpwnam(SERVICE_USER)


def _is_postgres_process(pid: int) -> bool:
    """Guard against a stale postmaster.pid naming an unrelated, reused pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"postgres" in cmdline


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PgServer:
    """A throwaway PostgreSQL cluster; use as a context manager.

    Attributes (valid inside the ``with`` block):
      ``port``: TCP port on 127.0.0.1; ``dsn``: DSN of the ``postgres`` database;
      ``host``: ``"127.0.0.1"``; ``user``: ``"postgres"``;
      ``base_dir``: the temporary folder (data dir, Unix socket and log live here);
      ``data_dir``; ``log_path``.
    """

    host = "127.0.0.1"
    user = SUPERUSER

    def __init__(self, *, start_timeout: float = 30.0, settings: dict[str, str] | None = None):
        """``settings`` adds/overrides server GUCs (``-c name=value``)."""
        self.start_timeout = start_timeout
        self.settings: dict[str, str] = {
            "fsync": "off",
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            "max_connections": "100",
        }
        if settings:
            self.settings.update(settings)
        self.initdb = find_pg_bin("initdb")
        self.pg_ctl = find_pg_bin("pg_ctl")
        self.base_dir: Path | None = None
        self._port: int | None = None
        self._started = False
        self._run_as: pwd.struct_passwd | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None or not self._started:
            raise PgServerError("PgServer is not running (use it as a context manager)")
        return self._port

    @property
    def dsn(self) -> str:
        """DSN of the server's ``postgres`` database."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        """DSN of database ``dbname`` on this server (the database need not exist)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def log_path(self) -> Path:
        return self._base() / "server.log"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its DSN."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def start(self) -> PgServer:
        """Create the cluster and start the server; cleans up after itself on failure."""
        if self._started:
            return self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (immediate mode) and delete the folder. Idempotent."""
        try:
            if self.base_dir is not None and (self.data_dir / "postmaster.pid").exists():
                self._stop_server()
        finally:
            self._started = False
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._started else "stopped"
        return f"<PgServer {state} dir={self.base_dir}>"

    # -- internals --------------------------------------------------------------------

    def _base(self) -> Path:
        if self.base_dir is None:
            raise PgServerError("PgServer has no folder (not started)")
        return self.base_dir

    def _start(self) -> None:
        if self.initdb is None or self.pg_ctl is None:
            raise PgServerError(
                "PostgreSQL not found: need initdb and pg_ctl on PATH or under "
                "/usr/lib/postgresql/*/bin"
            )
        if _running_as_root():
            self._run_as = _ensure_service_user()
        self.base_dir = self._make_base_dir()
        self._initdb()
        last_error: PgServerError | None = None
        for _ in range(_START_ATTEMPTS):
            self._port = _free_port()
            try:
                self._pg_ctl_start()
            except PgServerError as err:
                # Someone else may have grabbed the port between probe and bind: retry.
                last_error = err
                if "already in use" not in str(err) and "could not bind" not in str(err):
                    raise
                continue
            self._started = True
            return
        assert last_error is not None
        raise last_error

    def _make_base_dir(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="shardflow-pg-"))
        if self._run_as is None:
            return base
        os.chown(base, self._run_as.pw_uid, self._run_as.pw_gid)
        if self._run(["test", "-w", str(base), "-a", "-x", str(base)])[0] == 0:
            return base
        # TMPDIR is not reachable by the unprivileged user (e.g. under /root): use /tmp.
        shutil.rmtree(base, ignore_errors=True)
        base = Path(tempfile.mkdtemp(prefix="shardflow-pg-", dir="/tmp"))
        os.chown(base, self._run_as.pw_uid, self._run_as.pw_gid)
        return base

    def _initdb(self) -> None:
        assert self.initdb is not None
        cmd = [
            self.initdb,
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        rc, out = self._run(cmd)
        if rc != 0:
            raise PgServerError(f"initdb failed (exit {rc}): {shlex.join(cmd)}\n{out}")

    def _server_options(self) -> str:
        opts = [
            "-c",
            f"listen_addresses={self.host}",
            "-p",
            str(self._port),
            "-k",
            str(self._base()),
        ]
        for name, value in self.settings.items():
            opts += ["-c", f"{name}={value}"]
        return shlex.join(opts)

    def _pg_ctl_start(self) -> None:
        assert self.pg_ctl is not None
        cmd = [
            self.pg_ctl,
            "-w",
            "-t",
            str(max(1, int(self.start_timeout))),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            self._server_options(),
            "start",
        ]
        rc, out = self._run(cmd)
        if rc != 0:
            log = self._log_tail()
            # Make sure a half-started postmaster does not outlive us.
            if (self.data_dir / "postmaster.pid").exists():
                self._stop_server()
            raise PgServerError(
                f"pg_ctl start failed (exit {rc}): {shlex.join(cmd)}\n{out}\n"
                f"--- server log ({self.log_path}) ---\n{log}"
            )

    def _stop_server(self) -> None:
        assert self.pg_ctl is not None
        rc, _ = self._run(
            [self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "-t", "30", "stop"]
        )
        if rc == 0:
            return
        # pg_ctl could not stop it: kill the postmaster directly.
        pid = self._postmaster_pid()
        if pid is None or not _is_postgres_process(pid):
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, ValueError, IndexError):
            return None

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as err:
            return f"(no log: {err})"
        return text[-_LOG_TAIL_CHARS:]

    def _run(self, cmd: list[str]) -> tuple[int, str]:
        """Run a command (as the unprivileged user when root); return (rc, stdout+stderr)."""
        env = dict(os.environ)
        # Keep the client environment from steering the tools elsewhere.
        for var in ("PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGOPTIONS"):
            env.pop(var, None)
        run_as = self._run_as
        if run_as is not None:
            env.update(HOME=run_as.pw_dir, USER=run_as.pw_name, LOGNAME=run_as.pw_name)
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(self.base_dir) if self.base_dir is not None else "/",
            check=False,
            user=run_as.pw_uid if run_as is not None else None,
            group=run_as.pw_gid if run_as is not None else None,
            extra_groups=[] if run_as is not None else None,
        )
        return proc.returncode, proc.stdout

"""Shared fixtures. PostgreSQL: ``pg_server`` (one throwaway server per session) and
``pg_dsn`` (a fresh database per test); mark such tests ``@pytest.mark.postgres``."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import uuid
from collections.abc import Iterator

import pytest

try:
    from pgserver import PgServer, pg_available
except ImportError:  # tests/ imported as a package
    from tests.pgserver import PgServer, pg_available

_PG_FIXTURES = {"pg_server", "pg_dsn"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that use the PostgreSQL fixtures are "postgres" tests even if unmarked.
    for item in items:
        if _PG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A started throwaway PostgreSQL server (127.0.0.1, wal_level=logical)."""
    if not pg_available():
        reason = (
            "PostgreSQL not available: initdb/pg_ctl not on PATH nor in "
            "/usr/lib/postgresql/*/bin (or root without a postgres user and no useradd)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (required when CI=true)", pytrace=False)
        pytest.skip(reason)
    with PgServer() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """DSN of a fresh, empty database on ``pg_server``, dropped after the test."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    dsn = pg_server.create_database(name)
    yield dsn
    # Best effort: the whole cluster is deleted at session end anyway.
    with contextlib.suppress(Exception):
        pg_server.drop_database(name)


# ---------------------------------------------------------------------------------------
# Exit without interpreter teardown once pytest has printed its summary.
#
# SUBTLE: DuckDB 2.0's bindings (nanobind) print pages of "leaked instance" warnings when
# DuckDB objects are still alive during interpreter teardown (e.g. held by daemon threads
# of a test that ended). Those lines would follow pytest's closing summary, which is the
# line CI reads. storage/ closes its own connections at exit; this covers the rest.
_SESSION_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_STATUS and os.environ.get("SHARDFLOW_TEST_TEARDOWN") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])

"""The throwaway PostgreSQL server used by the connector/CDC tests."""

from __future__ import annotations

import socket

import psycopg
import pytest

try:
    from pgserver import PgServer, PgServerError, port_is_open
except ImportError:  # tests/ imported as a package
    from tests.pgserver import PgServer, PgServerError, port_is_open

pytestmark = pytest.mark.postgres


def _scalar(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_accepts_tcp_connection_on_loopback(pg_server: PgServer) -> None:
    assert pg_server.dsn == f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres"
    with psycopg.connect(pg_server.dsn, connect_timeout=5) as conn:
        addr, user, one = conn.execute(
            "SELECT host(inet_server_addr()), current_user, 1"
        ).fetchone()  # type: ignore[misc]
    assert (addr, user, one) == ("127.0.0.1", "postgres", 1)


def test_settings(pg_server: PgServer) -> None:
    assert _scalar(pg_server.dsn, "SHOW wal_level") == "logical"
    assert _scalar(pg_server.dsn, "SHOW listen_addresses") == "127.0.0.1"
    assert _scalar(pg_server.dsn, "SHOW fsync") == "off"
    assert int(str(_scalar(pg_server.dsn, "SHOW max_replication_slots"))) >= 10
    assert _scalar(pg_server.dsn, "SHOW server_encoding") == "UTF8"


def test_binds_127_0_0_1_only(pg_server: PgServer) -> None:
    # Bound to 0.0.0.0 it would also answer on 127.0.0.2 (same loopback interface).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.2", pg_server.port)) != 0


def test_databases_are_isolated(pg_server: PgServer) -> None:
    dsn_a = pg_server.create_database("iso_a")
    dsn_b = pg_server.create_database("iso_b")
    try:
        assert dsn_a.endswith(f":{pg_server.port}/iso_a")
        with psycopg.connect(dsn_a) as conn:
            conn.execute("CREATE TABLE only_in_a (x int)")
            conn.execute("INSERT INTO only_in_a VALUES (1)")
        assert _scalar(dsn_a, "SELECT count(*) FROM only_in_a") == 1
        assert _scalar(dsn_b, "SELECT to_regclass('only_in_a') IS NULL") is True
        assert _scalar(dsn_b, "SELECT current_database()") == "iso_b"
    finally:
        pg_server.drop_database("iso_a")
        pg_server.drop_database("iso_b")


def test_pg_dsn_is_a_fresh_database(pg_dsn: str, pg_server: PgServer) -> None:
    name = _scalar(pg_dsn, "SELECT current_database()")
    assert name != "postgres" and pg_dsn.endswith(f"/{name}")
    assert _scalar(pg_dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    # Logical replication slots work (what CDC tests need).
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('t_slot', 'test_decoding')")
        conn.execute("SELECT pg_drop_replication_slot('t_slot')")


def test_context_exit_stops_server_and_removes_folder(pg_server: PgServer) -> None:
    with PgServer() as pg:
        port, folder = pg.port, pg.base_dir
        assert folder is not None and (folder / "data" / "PG_VERSION").is_file()
        assert port != pg_server.port
        assert port_is_open(port)
        assert _scalar(pg.dsn, "SELECT 1") == 1
    assert not port_is_open(port)
    assert not folder.exists()
    with pytest.raises(PgServerError):
        pg.port  # noqa: B018


def test_cleans_up_when_the_body_raises(pg_server: PgServer) -> None:
    with pytest.raises(ZeroDivisionError), PgServer() as pg:
        port, folder = pg.port, pg.base_dir
        1 / 0  # noqa: B018
    assert not port_is_open(port)
    assert folder is not None and not folder.exists()


def test_start_failure_reports_server_log(pg_server: PgServer) -> None:
    pg = PgServer(settings={"max_connections": "not-a-number"})
    with pytest.raises(PgServerError) as info:
        pg.__enter__()
    message = str(info.value)
    assert "server log" in message and "max_connections" in message
    assert pg.base_dir is None

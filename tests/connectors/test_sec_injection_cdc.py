"""PostgreSQL CDC with hostile column names (issue 14, item 1).

Whoever owns the source table controls its column names, and the source carries them
into the collection's schema: quotes, backslashes, `;`, `--`, newlines and unicode
must come through snapshot and streaming into `shardflow query` as plain names.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from connectors.base import reset_stop
from flows.cli import main

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ["a'", 'b"', "c\\", "d;", "e--", "f\nx", "ü€ 名", "g', read_csv('/etc/passwd')) --", "h\"); DROP TABLE t; --"]


def pq(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def test_cdc_hostile_column_names_to_query(pg_dsn, tmp_path, monkeypatch, capsys):
    reset_stop()
    cols = ", ".join(f"{pq(n)} text" for n in HOSTILE)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"CREATE TABLE t (id int PRIMARY KEY, {cols})")
        c.execute("ALTER TABLE t REPLICA IDENTITY FULL")
        c.execute("CREATE PUBLICATION t_pub FOR TABLE t")
        ins = ", ".join(["%s"] * (len(HOSTILE) + 1))
        c.execute(f"INSERT INTO t VALUES ({ins})", [1, *[f"v1{i}'" for i in range(len(HOSTILE))]])
    monkeypatch.setenv("PG_DSN", pg_dsn)
    monkeypatch.setenv("PG_TABLE", "t")
    d = ["--data", str(tmp_path / "data")]

    def cli(*argv: str) -> str:
        capsys.readouterr()
        rc = main(list(argv))
        out, err = capsys.readouterr()
        assert rc == 0, err
        return out

    cli("run", str(ROOT / "examples" / "postgres_cdc.py"), *d, "--no-progress")
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"INSERT INTO t (id, {pq(HOSTILE[0])}) VALUES (2, 'two')")
        c.execute(f"UPDATE t SET {pq(HOSTILE[5])} = 'new\\nline' WHERE id = 1")
        c.execute("DELETE FROM t WHERE id = 2")
        c.execute(f"INSERT INTO t (id, {pq(HOSTILE[8])}) VALUES (3, 'three')")
    reset_stop()
    cli("run", str(ROOT / "examples" / "postgres_cdc.py"), *d, "--no-progress")
    out = cli("query", *d, "--format", "json", "SELECT * FROM t ORDER BY id")
    rows = [json.loads(x) for x in out.splitlines()]
    assert [list(r) for r in rows] == [["id", *HOSTILE]] * 2
    assert rows[0] == {"id": 1, **{n: f"v1{i}'" for i, n in enumerate(HOSTILE)}, HOSTILE[5]: "new\\nline"}
    assert rows[1] == {"id": 3, **{n: None for n in HOSTILE}, HOSTILE[8]: "three"}
    for n in HOSTILE:
        got = cli("query", *d, "--format", "csv", f"SELECT count({pq(n)}) AS c FROM t")
        assert got == f'"c"\n{1 + (n == HOSTILE[8])}\n', n

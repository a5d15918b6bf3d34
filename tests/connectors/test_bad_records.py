"""Bad records are never taken in silence (issue 14, item 10).

A `.parquet` file that is not Parquet in continuous mode, two JSON objects on one
JSON Lines line, a CDC column whose type changed, and a file glob matching nothing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.base import reset_stop
from connectors.errors import FileSourceError, PostgresCdcError
from connectors.files import ALLOW_EMPTY_ENV, ErrorBatch, FileSource
from connectors.postgres import PostgresSource
from storage import UpdateBatch

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def drain(src: FileSource, polls: int = 6) -> list[Any]:
    """Poll partition 0 a few times, as a flow would (continuous mode never ends on its own)."""
    part = src.build_partition(src.list_parts()[0], None)
    items: list[Any] = []
    for _ in range(polls):
        try:
            items.extend(part.next_batch())
        except StopIteration:
            break
    return items


def errors_of(items: list[Any]) -> list[dict[str, Any]]:
    return [r for x in items if isinstance(x, ErrorBatch) for r in x.table.to_pylist()]


def data_of(items: list[Any]) -> list[dict[str, Any]]:
    return [
        {k: r[k] for k in SCHEMA.names}
        for x in items
        if isinstance(x, UpdateBatch) and not isinstance(x, ErrorBatch)
        for r in x.table.to_pylist()
    ]


# ---- Parquet in continuous mode ----


def test_continuous_a_parquet_file_that_is_not_parquet_goes_to_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1], "name": ["a"]}, schema=SCHEMA), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_text("id,name\n2,b\n")  # CSV under a .parquet name
    src = FileSource(str(tmp_path / "*.parquet"), format="parquet", schema=SCHEMA, mode="continuous", on_error="collect")
    items = drain(src)
    assert data_of(items) == [{"id": 1, "name": "a"}]
    errs = errors_of(items)
    assert len(errs) == 1 and errs[0]["file"] == str(tmp_path / "b.parquet")
    assert "not a Parquet file" in errs[0]["error"]
    with pytest.raises(FileSourceError, match=r"b\.parquet: not a Parquet file"):
        drain(FileSource(str(tmp_path / "*.parquet"), format="parquet", schema=SCHEMA, mode="continuous"))


def test_continuous_a_parquet_file_that_never_gets_its_footer_goes_to_errors(tmp_path: Path) -> None:
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"id": [1], "name": ["a"]}, schema=SCHEMA), whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[:-20])  # starts as Parquet, no footer
    src = FileSource(str(cut), format="parquet", schema=SCHEMA, mode="continuous", on_error="collect")
    assert errors_of(drain(src, 3)) == [], "a file being written (recent) is waited for"
    old = time.time() - 3600
    os.utime(cut, (old, old))
    src = FileSource(str(cut), format="parquet", schema=SCHEMA, mode="continuous", on_error="collect")
    errs = errors_of(drain(src, 3))
    assert len(errs) == 1 and "no footer" in errs[0]["error"]


# ---- JSON Lines ----


def test_two_json_objects_on_one_line_are_an_error_row(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": 1, "name": "a"}\n{"id": 2, "name": "b"}{"id": 3, "name": "c"}\n\n  \n{"id": 4, "name": "d"}\n')
    src = FileSource(str(f), format="jsonl", schema=SCHEMA, on_error="collect")
    items = drain(src)
    assert data_of(items) == [{"id": 1, "name": "a"}, {"id": 4, "name": "d"}]
    errs = errors_of(items)
    assert [(e["line"], e["record"]) for e in errs] == [(2, '{"id": 2, "name": "b"}{"id": 3, "name": "c"}')]
    assert "one object on its own line" in errs[0]["error"]
    with pytest.raises(FileSourceError, match=r"x\.jsonl: line 2 \(byte 23\): 2 JSON values on 1 line"):
        drain(FileSource(str(f), format="jsonl", schema=SCHEMA))


def test_blank_lines_alone_are_still_fine(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text('\n{"id": 1, "name": "a"}\n\r\n\t\n{"id": 2, "name": "b"}')
    assert data_of(drain(FileSource(str(f), format="jsonl", schema=SCHEMA))) == [
        {"id": 1, "name": "a"},
        {"id": 2, "name": "b"},
    ]


# ---- a glob matching nothing ----


def test_a_glob_matching_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(ALLOW_EMPTY_ENV, raising=False)
    glob = str(tmp_path / "nope*.csv")
    with pytest.raises(FileSourceError, match=r"the glob '.*nope\*\.csv' matches no file.*--allow-empty"):
        FileSource(glob, format="csv", schema=SCHEMA)
    with caplog.at_level(logging.WARNING, logger="connectors.files"):
        FileSource(glob, format="csv", schema=SCHEMA, allow_empty=True)
        FileSource(glob, format="csv", schema=SCHEMA, mode="continuous")
    assert [r.getMessage().endswith(("reading nothing", "waiting for files)")) for r in caplog.records] == [True, True]
    monkeypatch.setenv(ALLOW_EMPTY_ENV, "1")
    FileSource(glob, format="csv", schema=SCHEMA)


def test_cli_run_fails_on_an_empty_glob_unless_allow_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    monkeypatch.delenv(ALLOW_EMPTY_ENV, raising=False)
    monkeypatch.setenv("ORDERS_GLOB", str(tmp_path / "none*.csv"))
    flow = str(ROOT / "examples" / "files_orders.py")
    rc = main(["run", flow, "--data", str(tmp_path / "data"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "matches no file" in err and "--allow-empty" in err, err
    rc = main(["run", flow, "--data", str(tmp_path / "data"), "--no-progress", "--allow-empty"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert ALLOW_EMPTY_ENV not in os.environ, "the flag does not leak into the process"


# ---- PostgreSQL CDC: a column's type changed ----


@pytest.mark.postgres
def test_cdc_column_type_change_is_a_schema_change_error(pg_dsn: str) -> None:
    reset_stop()
    conn = psycopg.connect(pg_dsn, autocommit=True)
    conn.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int); ALTER TABLE t REPLICA IDENTITY FULL; "
        "CREATE PUBLICATION t_pub FOR TABLE t; INSERT INTO t VALUES (1, 10)"
    )
    src = PostgresSource(pg_dsn, "t", publication="t_pub", pipeline_id="p1")
    part = src.build_part("pg.in", src.key, None)
    try:
        for _ in range(3):
            part.next_batch()
        conn.execute("INSERT INTO t VALUES (2, 20)")
        conn.execute("ALTER TABLE t ALTER COLUMN v TYPE text")
        conn.execute("INSERT INTO t VALUES (3, '42')")  # would cast back to int: still a schema change
        with pytest.raises(PostgresCdcError, match=r"column 'v' changed type from integer \(int32\) to text \(string\)"):
            for _ in range(20):
                part.next_batch()
                time.sleep(0.05)
    finally:
        part.close()
        conn.close()

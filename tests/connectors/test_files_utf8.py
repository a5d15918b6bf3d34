"""connectors.files: a record with invalid UTF-8 in a string goes to `<name>_errors`, never into the collection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bytewax.operators as op
import pyarrow as pa
import pyarrow.parquet as pq
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main

from connectors.files import ErrorBatch, FileSource
from storage import UpdateBatch

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "tests" / "connectors" / "files_flow.py"
SHARDFLOW = [sys.executable, "-m", "flows.cli"]


def shardflow(
    data: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*SHARDFLOW, *argv, "--data", str(data)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr
    return r


def query(data: Path, sql: str) -> list[dict]:
    return [
        json.loads(x)
        for x in shardflow(data, "query", sql, "--format", "json").stdout.splitlines()
        if x.strip()
    ]


def test_jsonl_invalid_utf8_goes_to_errors_through_the_cli(tmp_path: Path) -> None:
    src, data = tmp_path / "in", tmp_path / "d"
    src.mkdir()
    good = b'{"id": 1, "name": "a"}\n'
    bad = b'{"id": 2, "name": "b\xff\xfe"}\n'
    (src / "e.jsonl").write_bytes(good + bad + b'{"id": 3, "name": "c\xc3\xa9"}\n')
    env = {"FILES_GLOB": str(src / "*.jsonl"), "FILES_FORMAT": "jsonl"}
    shardflow(data, "run", str(FLOW), env=env)
    # Every query still works, and the bad record is only in the errors collection.
    assert query(data, "SELECT id, name FROM rows ORDER BY id") == [
        {"id": 1, "name": "a"},
        {"id": 3, "name": "c\u00e9"},
    ]
    errs = query(data, 'SELECT file, line, "offset", error FROM rows_errors')
    assert errs == [
        {
            "file": str(src / "e.jsonl"),
            "line": 2,
            "offset": len(good),
            "error": "column 'name': invalid UTF-8 in a string",
        }
    ]


def test_csv_and_parquet_invalid_utf8_are_bad_records(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
    (tmp_path / "c.csv").write_bytes(b"id,name\n1,a\n2,b\xff\n")
    # A Parquet file with a binary column holding invalid UTF-8, read under a string schema.
    pq.write_table(
        pa.table({"id": [5], "name": pa.array([b"x\xff"], pa.binary())}), tmp_path / "p.parquet"
    )
    for glob, fmt, want_ids in [("*.csv", "csv", [1]), ("*.parquet", "parquet", [])]:
        flow, out = Dataflow("u"), []
        src = FileSource(str(tmp_path / glob), format=fmt, schema=schema, on_error="collect")
        op.output("out", op.input("in", flow, src), TestingSink(out))
        run_main(flow)
        got = [i for x in out if type(x) is UpdateBatch for i in x.table.column("id").to_pylist()]
        errs = [r for x in out if isinstance(x, ErrorBatch) for r in x.table.to_pylist()]
        assert got == want_ids and len(errs) == 1, (fmt, got, errs)
        assert "UTF" in errs[0]["error"] or "utf" in errs[0]["error"].lower(), errs

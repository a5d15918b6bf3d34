"""connectors.files: rotation (rename + recreate), copytruncate, unexplained shrink, offsets without fingerprints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main

from connectors.files import FileSource, FileSourceError
from storage import UpdateBatch

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "tests" / "connectors" / "files_flow.py"
SHARDFLOW = [sys.executable, "-m", "flows.cli"]
SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def lines(ids: range) -> str:
    return "".join(f"{i},n{i}\n" for i in ids)


def csv(ids: range) -> str:
    return "id,name\n" + lines(ids)


def run(src: FileSource) -> list[Any]:
    flow, out = Dataflow("rot"), []
    op.output("out", op.input("in", flow, src), TestingSink(out))
    run_main(flow)
    return out


def ids_and_offsets(out: list[Any]) -> tuple[list[int], dict[str, Any]]:
    batches = [x for x in out if type(x) is UpdateBatch]
    ids = [i for b in batches for i in b.table.column("id").to_pylist()]
    return ids, batches[-1].offsets if batches else {}


def shardflow(data: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHARDFLOW, *argv, "--data", str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def query(data: Path, sql: str) -> list[list[Any]]:
    import json

    r = shardflow(data, "query", sql, "--format", "json")
    assert r.returncode == 0, r.stderr
    return [list(json.loads(x).values()) for x in r.stdout.splitlines() if x.strip()]


def test_rotation_by_rename_through_the_cli(tmp_path: Path) -> None:
    """Rows written before a rename are finished from the old file; the new file is read from byte 0."""
    d, logs = tmp_path / "d", tmp_path / "logs"
    logs.mkdir()
    x = logs / "x.csv"
    x.write_text(csv(range(1, 11)))
    env = {"FILES_GLOB": str(logs / "*.csv")}
    assert shardflow(d, "run", str(FLOW), **env).returncode == 0
    with open(x, "a") as f:
        f.write(lines(range(11, 14)))  # written, then rotated before the source saw it
    os.rename(x, logs / "x.csv.1")
    x.write_text(csv(range(21, 41)))  # already longer than the old offset
    r = shardflow(d, "run", str(FLOW), **env)
    assert r.returncode == 0, r.stderr
    got = [row[0] for row in query(d, "SELECT id FROM rows ORDER BY id")]
    assert got == [*range(1, 14), *range(21, 41)], "nothing lost, nothing doubled"
    assert query(d, "SELECT count(*) FROM rows_errors") == [[0]]
    # A third run adds nothing.
    assert shardflow(d, "run", str(FLOW), **env).returncode == 0
    assert query(d, "SELECT count(*), count(DISTINCT id) FROM rows") == [[33, 33]]


def test_copytruncate_finishes_the_copy_then_reads_the_new_content(tmp_path: Path) -> None:
    x = tmp_path / "x.csv"
    x.write_text(csv(range(1, 11)))
    src = lambda **kw: FileSource(str(tmp_path / "*.csv"), format="csv", schema=SCHEMA, **kw)  # noqa: E731
    ids, offs = ids_and_offsets(run(src()))
    assert ids == list(range(1, 11))
    with open(x, "a") as f:
        f.write(lines(range(11, 14)))
    shutil.copy(x, tmp_path / "x.csv.1")  # logrotate copytruncate: copy, then truncate in place
    ino = os.stat(x).st_ino
    with open(x, "r+") as f:
        f.truncate(0)
        f.write(csv(range(21, 41)))
    assert os.stat(x).st_ino == ino and os.path.getsize(x) > offs["files/0"][str(x)]["off"]
    out = run(src(resume=offs))
    ids2, offs2 = ids_and_offsets(out)
    assert ids2 == [*range(11, 14), *range(21, 41)]
    assert not [x for x in out if type(x) is not UpdateBatch and hasattr(x, "table")], "no error rows"
    assert ids_and_offsets(run(src(resume=offs2)))[0] == [], "the next run adds nothing"


def test_rotation_while_tailing_in_continuous_mode(tmp_path: Path) -> None:
    from connectors.base import request_stop, reset_stop

    reset_stop()
    x = tmp_path / "x.csv"
    x.write_text(csv(range(1, 4)))
    src = FileSource(str(tmp_path / "*.csv"), format="csv", schema=SCHEMA, mode="continuous", poll_interval=0.01)
    part = src.build_part("s", "files/0", None)
    got: list[Any] = []
    try:
        for _ in range(3):
            got.extend(part.next_batch())
        with open(x, "a") as f:
            f.write(lines(range(4, 6)) + "6,n")  # a partial last line, then rotated
        os.rename(x, tmp_path / "x.csv.1")
        x.write_text(csv(range(21, 31)))
        for _ in range(6):
            got.extend(part.next_batch())
        ids = [i for b in got if type(b) is UpdateBatch for i in b.table.column("id").to_pylist()]
        assert ids == [1, 2, 3, 4, 5, 6, *range(21, 31)], "the rotated file is finished, its last line included"
    finally:
        request_stop()
        reset_stop()


def test_unexplained_shrink_is_one_error_naming_the_file(tmp_path: Path) -> None:
    x = tmp_path / "x.csv"
    x.write_text(csv(range(1, 100)))
    src = lambda **kw: FileSource(str(x), format="csv", schema=SCHEMA, **kw)  # noqa: E731
    _, offs = ids_and_offsets(run(src()))
    with open(x, "r+") as f:
        f.truncate(100)  # same inode, same first bytes, shorter
    with pytest.raises(Exception) as ei:
        run(src(resume=offs))
    e = ei.value
    while e.__cause__ is not None:
        e = e.__cause__
    assert isinstance(e, FileSourceError) and e.path == str(x)
    assert "shrank to 100 bytes below the committed offset" in str(e) and "not a copytruncate" in str(e)
    assert "\n" not in str(e)


def test_offsets_without_fingerprint_resume(tmp_path: Path) -> None:
    """Offsets from before fingerprints (`{path: byte offset}`) resume at the offset, or stop with one line."""
    x = tmp_path / "x.csv"
    x.write_text(csv(range(1, 11)))
    head = len(csv(range(1, 6)))
    src = lambda **kw: FileSource(str(x), format="csv", schema=SCHEMA, **kw)  # noqa: E731
    ids, offs = ids_and_offsets(run(src(resume={"files/0": {str(x): head}})))
    assert ids == list(range(6, 11))
    assert offs["files/0"][str(x)]["off"] == os.path.getsize(x), "upgraded to a fingerprinted entry"
    with pytest.raises(Exception) as ei:
        run(src(resume={"files/0": {str(x): 9999}}))
    e = ei.value
    while e.__cause__ is not None:
        e = e.__cause__
    assert isinstance(e, FileSourceError) and "below the committed offset 9999" in str(e) and "older shardflow" in str(e)

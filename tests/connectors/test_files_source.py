"""connectors.files: batch/continuous reads, offsets and byte-clock times, malformed records, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main

from connectors.base import request_stop, reset_stop
from connectors.files import ERRORS_SCHEMA, ErrorBatch, FileSource, FileSourceError, split_errors
from storage import Frontier, Progress, UpdateBatch

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def run(src: FileSource) -> list[Any]:
    flow, out = Dataflow("files"), []
    op.output("out", op.input("in", flow, src), TestingSink(out))
    run_main(flow)
    return out


def rows(items: list[Any]) -> list[dict[str, Any]]:
    return [r for x in items if type(x) is UpdateBatch for r in x.table.to_pylist()]


def write(p: Path, text: str, mode: str = "w") -> None:
    with open(p, mode) as f:
        f.write(text)


def test_batch_csv_offsets_and_byte_clock(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", "id,name\n1,x\n2,y\n")
    write(tmp_path / "b.csv", "id,name\n3,z\n")
    src = lambda **kw: FileSource(str(tmp_path / "*.csv"), format="csv", schema=SCHEMA, **kw)  # noqa: E731
    out = run(src())
    assert [(r["id"], r["_time"]) for r in rows(out)] == [(1, 0), (2, 0), (3, 16)]
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    last = [x.offsets for x in out if isinstance(x, UpdateBatch)][-1]["files/0"]
    assert {k: v["off"] for k, v in last.items()} == {a: 16, b: 12}
    assert last[a]["ino"] == os.stat(a).st_ino and last[a]["hlen"] == 16, "offsets carry a fingerprint"
    assert out[0] == Progress(Frontier(0), partition="files/0", partitions=("files/0",)), "initial progress"
    assert out[-1] == Progress(Frontier(28), partition="files/0", partitions=("files/0",))
    assert [repr(x) for x in run(src())] == [repr(x) for x in out], "replay is deterministic"
    # Resume after the committed offsets: only appended bytes, at times after the upper.
    write(tmp_path / "a.csv", "4,w\n", "a")
    out2 = run(src(resume={"files/0": last}))
    assert [(r["id"], r["_time"]) for r in rows(out2)] == [(4, 28)]
    assert out2[-1].frontier == Frontier(32)


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    write(tmp_path / "e.jsonl", '{"id": 1, "name": "a", "extra": true}\n\n{"id": 2}\n')
    assert [(r["id"], r["name"]) for r in rows(run(FileSource(str(tmp_path / "*.jsonl"), format="jsonl", schema=SCHEMA)))] == [
        (1, "a"),
        (2, None),
    ]
    pq.write_table(pa.table({"name": ["p", "q"], "id": [7, 8], "junk": [0, 0]}), tmp_path / "x.parquet")
    out = run(FileSource(str(tmp_path / "*.parquet"), format="parquet", schema=SCHEMA))
    assert [(r["id"], r["name"]) for r in rows(out)] == [(7, "p"), (8, "q")]
    assert out[1].offsets["files/0"][str(tmp_path / "x.parquet")]["off"] == os.path.getsize(tmp_path / "x.parquet")


def test_malformed_raises_naming_file_line_and_problem(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    write(p, "id,name\n1,a\n2,b\nthree,c\n4,d\n")
    with pytest.raises(Exception) as ei:
        run(FileSource(str(p), format="csv", schema=SCHEMA))
    e = ei.value
    while e.__cause__ is not None and not isinstance(e, FileSourceError):
        e = e.__cause__
    assert isinstance(e, FileSourceError)
    assert (e.path, e.line, e.offset) == (str(p), 4, 16)
    assert str(e).startswith(f"{p}: line 4 (byte 16):") and "three" in str(e)

    j = tmp_path / "bad.jsonl"
    write(j, '{"id": 1}\n{"id": 2,,}\n')
    part = FileSource(str(j), format="jsonl", schema=SCHEMA).build_part("s", "files/0", None)
    assert [type(x) for x in part.next_batch()] == [Progress]  # the initial progress
    with pytest.raises(FileSourceError, match=r"bad.jsonl: line 2 \(byte 10\): .*"):
        part.next_batch()

    h = tmp_path / "hdr.csv"
    write(h, "id,nom\n1,a\n")
    part = FileSource(str(h), format="csv", schema=SCHEMA).build_part("s", "files/0", None)
    part.next_batch()
    with pytest.raises(FileSourceError, match=r"line 1 .*header names columns \['id', 'nom'\]"):
        part.next_batch()


def test_collect_mode_routes_bad_records_to_errors(tmp_path: Path) -> None:
    p = tmp_path / "mixed.csv"
    write(p, "id,name\n1,a\nx,b\n3,c\n4\n5,e\n")
    src = FileSource(str(p), format="csv", schema=SCHEMA, on_error="collect", name="orders")
    assert src.errors_collection == "orders_errors"
    flow, data, errors = Dataflow("split"), [], []
    s = split_errors("split", op.input("in", flow, src))
    op.output("data", s.data, TestingSink(data))
    op.output("errors", s.errors, TestingSink(errors))
    run_main(flow)
    assert [r["id"] for r in rows(data)] == [1, 3, 5]
    errs = [x for x in errors if isinstance(x, UpdateBatch)]
    assert len(errs) == 1 and not isinstance(errs[0], ErrorBatch)
    assert errs[0].table.schema.names == ERRORS_SCHEMA.names + ["_time", "_diff"]
    got = [(r["line"], r["offset"], r["record"]) for r in errs[0].table.to_pylist()]
    assert got == [(3, 12, "x,b"), (5, 20, "4")]
    assert "Expected 2 columns" in errs[0].table.column("error")[1].as_py()
    assert errs[0].offsets == [x for x in data if isinstance(x, UpdateBatch)][0].offsets
    assert [x.frontier for x in errors if isinstance(x, Progress)] == [x.frontier for x in data if isinstance(x, Progress)]


def test_continuous_tails_growing_files_and_waits_for_partial_lines(tmp_path: Path) -> None:
    reset_stop()
    p = tmp_path / "log.jsonl"
    write(p, '{"id": 1, "name": "a"}\n{"id": 2, "na')
    src = FileSource(str(tmp_path / "*.jsonl"), format="jsonl", schema=SCHEMA, mode="continuous", poll_interval=0.01)
    part = src.build_part("s", "files/0", None)
    got: list[Any] = []

    def poll(n: int = 3) -> None:
        for _ in range(n):
            got.extend(part.next_batch())

    poll()
    assert [r["id"] for r in rows(got)] == [1]
    assert part.snapshot()[str(p)]["off"] == 23, "the partial line is not consumed"
    write(p, 'me": "b"}\n', "a")
    write(tmp_path / "new.jsonl", '{"id": 3, "name": "c"}\n')
    poll()
    assert [r["id"] for r in rows(got)] == [1, 2, 3]
    times = [r["_time"] for r in rows(got)]
    assert times == sorted(times) and len(set(times)) == 3
    frontiers = [x.frontier.time for x in got if isinstance(x, Progress)]
    assert frontiers == sorted(frontiers) and frontiers[-1] > times[-1]
    request_stop()
    try:
        last = part.next_batch()  # the final Progress, unless it already went out
        assert all(isinstance(x, Progress) for x in last)
        with pytest.raises(StopIteration):
            part.next_batch()
    finally:
        reset_stop()


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {root!r})
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import run_main
    import pyarrow as pa
    from connectors.files import FileSource
    from storage import UpdateBatch

    class Printer(StatelessSinkPartition):
        def write_batch(self, items):
            for x in items:
                if isinstance(x, UpdateBatch):
                    # One line per batch = the data and its offsets, committed together.
                    print(json.dumps({{"ids": x.table.column("id").to_pylist(), "offsets": x.offsets}}), flush=True)
                    time.sleep(0.01)

    class PrintSink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):
            return Printer()

    resume = json.loads(sys.argv[2])
    schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
    src = FileSource(sys.argv[1], format="csv", schema=schema, block_size=2048, resume=resume)
    flow = Dataflow("kill")
    op.output("out", op.input("in", flow, src), PrintSink())
    run_main(flow)
    """
)


def test_resume_after_sigkill_in_the_middle_of_a_file(tmp_path: Path) -> None:
    n = 20_000
    data = tmp_path / "big.csv"
    write(data, "id,name\n" + "".join(f"{i},name{i}\n" for i in range(n)))
    script = tmp_path / "reader.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))

    proc = subprocess.Popen([sys.executable, str(script), str(data), "null"], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    while len(lines) < 15:
        line = proc.stdout.readline()
        assert line, "reader ended before it was killed"
        lines.append(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines += proc.stdout.read().splitlines(keepends=True)
    committed = []
    for line in lines:
        try:
            committed.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the kill was never committed
    assert 15 <= len(committed) < 100, "killed in the middle of the file"
    first_ids = [i for c in committed for i in c["ids"]]
    offset = committed[-1]["offsets"]
    assert 0 < offset["files/0"][str(data)]["off"] < os.path.getsize(data)

    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(script), str(data), json.dumps(offset)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rest = [json.loads(x) for x in res.stdout.splitlines()]
    ids = first_ids + [i for c in rest for i in c["ids"]]
    assert ids == list(range(n)), "no gaps, no duplicates"
    assert rest[-1]["offsets"]["files/0"][str(data)]["off"] == os.path.getsize(data)
    assert time.monotonic() - t0 < 60

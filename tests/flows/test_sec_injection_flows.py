"""Names and paths are data, never SQL (issue 14, item 1): through flows and the CLI.

A CSV header of hostile column names goes through `shardflow run`, `query` and
incremental views (group-by state, min/max, the generic path); the self-correcting
sink's DuckDB spills to a temp directory whose path holds a quote (it was pasted
into `SET temp_directory='...'`, so a `'` in $TMPDIR broke every correction).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import bytewax.operators as op
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from flowtest_util import upd

import storage
from flows.cli import main
from flows.operators import consolidate
from flows.sinks import persist_sink
from storage import Frontier, Progress, UpdateBatch

# A newline inside a CSV header is refused (the reader is line-oriented); PostgreSQL CDC covers it.
HOSTILE = ["a'", 'b"', "c\\", "d;", "e--", "ü€", "g', read_csv('/etc/passwd')) --", "h\"); SELECT 1; --"]

FLOW = '''
import bytewax.operators as op, pyarrow as pa
from bytewax.dataflow import Dataflow
from connectors.files import ERRORS_SCHEMA, FileSource, split_errors
from flows.operators import consolidate
SCHEMA = pa.schema([(n, pa.string()) for n in {names!r}] + [("v", pa.int64())])
def build(ctx):
    ctx.collection("t", SCHEMA)
    ctx.collection("t_errors", ERRORS_SCHEMA)
    src = FileSource({glob!r}, format="csv", schema=SCHEMA, mode=ctx.mode, on_error="collect", name="t",
                     resume=ctx.resume_offsets("t"), resume_upper=ctx.upper("t"))
    flow = Dataflow("f")
    split = split_errors("split", op.input("files", flow, src))
    ctx.persist_split("s", consolidate("c", split.data), consolidate("ce", split.errors), "t")
    return flow
'''


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _csv_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[Path, Path, list[str]]:
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*HOSTILE, "v"])
        w.writerows([["1"] * len(HOSTILE) + ["1"], ["2"] * len(HOSTILE) + ["x"], ["3"] * len(HOSTILE) + ["3"]])
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW.format(names=HOSTILE, glob=str(src)))
    d = ["--data", str(tmp_path / "data")]
    cli(capsys, "run", str(flow), *d, "--no-progress")
    return src, flow, d


def test_csv_header_to_query_and_a_view(capsys, tmp_path):
    _, _, d = _csv_run(capsys, tmp_path)
    out = cli(capsys, "query", *d, "--format", "csv", "SELECT * FROM t ORDER BY v")
    assert out.splitlines() == [",".join(q(n) for n in [*HOSTILE, "v"]), *[",".join([f'"{i}"'] * len(HOSTILE) + [str(i)]) for i in (1, 3)]]
    sql = f"SELECT {q(HOSTILE[0])}, {q(HOSTILE[6])}, sum(v) AS s FROM t GROUP BY ALL"
    cli(capsys, "view", "v_sum", sql, *d, "--no-progress")
    assert cli(capsys, "query", *d, "--format", "csv", "SELECT * FROM v_sum ORDER BY ALL").splitlines()[1:] == \
        ['"1","1",1', '"3","3",3']


@pytest.mark.slow
def test_csv_header_to_incremental_views(capsys, tmp_path):
    src, flow, d = _csv_run(capsys, tmp_path)
    a, g = q(HOSTILE[0]), q(HOSTILE[6])
    views = {
        "v_sum": f"SELECT {a}, {q(HOSTILE[2])}, sum(v) AS s, count(*) AS n FROM t GROUP BY ALL",
        "v_max": f"SELECT {g}, max(v) AS m FROM t GROUP BY ALL",
        "v_all": "SELECT * FROM t",
        "v_named": f"SELECT v AS {q(chr(39) + '; DROP TABLE t; --')}, {q(HOSTILE[7])} FROM t",
    }
    for name, sql in views.items():
        cli(capsys, "view", name, sql, *d, "--no-progress")
    # More input: the views step incrementally over it.
    with open(src, "a", newline="") as f:
        csv.writer(f).writerows([["1"] * len(HOSTILE) + ["5"], ["4"] * len(HOSTILE) + ["4"]])
    cli(capsys, "run", str(flow), *d, "--no-progress")
    for name, sql in views.items():
        cli(capsys, "view", name, sql, *d, "--no-progress")
    got = {n: cli(capsys, "query", *d, "--format", "csv", f"SELECT * FROM {n} ORDER BY ALL") for n in views}
    want = {n: cli(capsys, "query", *d, "--format", "csv", f"SELECT * FROM ({sql}) ORDER BY ALL") for n, sql in views.items()}
    assert got == want
    assert got["v_sum"].splitlines()[1:] == ['"1","1",6,2', '"3","3",3,1', '"4","4",4,1']
    assert got["v_named"].splitlines()[0] == '"\'; DROP TABLE t; --","h""); SELECT 1; --"'
    out = cli(capsys, "query", *d, "--format", "csv", "SELECT line, error FROM t_errors")
    assert out.splitlines()[1].startswith("3,")


def test_sink_corrections_with_a_quote_in_the_temp_directory(tmp_path, monkeypatch):
    odd = tmp_path / "it's"
    odd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(odd))
    client = storage.open(tmp_path / "data", fsync=False)
    shard = str(storage.ShardId.new())
    schema = pa.schema([("k", pa.string())])
    # Foreign contents: the sink must correct them, which it does in its own DuckDB.
    client.open_writer(shard, schema).compare_and_append(upd([("junk", 0, 1), ("k0", 1, 2)]), 0, 4)
    items = [UpdateBatch(upd([("k0", 0, 1), ("k1", 2, 1)]), offsets={"src/0": 0}), Progress(Frontier(10), "src/0", ("src/0",))]
    flow, out = Dataflow("p"), []
    s = consolidate("cons", op.input("in", flow, TestingSource(items)))
    op.output("out", persist_sink("sink", s, client, shard, schema=schema), TestingSink(out))
    run_main(flow)
    with client.open_leased_reader(shard) as r:
        assert sorted(r.snapshot(9).to_pylist(), key=str) == [{"k": "k0", "_diff": 1}, {"k": "k1", "_diff": 1}]
    client.close()

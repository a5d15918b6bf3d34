"""connectors.files: CSV chunks parse on threads, block by block; rows, offsets and error lines stay exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main

from connectors.files import ErrorBatch, FileSource
from storage import UpdateBatch

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])
ROWS = 60_000  # about 1.1 MB: each 512 KB chunk is several parse blocks (connectors.files.CSV_BLOCK_MIN)
BAD = 47_531  # a bad line deep in a late block


def run(src: FileSource) -> list[Any]:
    flow, out = Dataflow("files"), []
    op.output("out", op.input("in", flow, src), TestingSink(out))
    run_main(flow)
    return out


def write_csv(p: Path) -> list[int]:
    """`id,name` rows 0..ROWS-1 with varying line lengths; line BAD has a non-integer id."""
    lines = ["id,name"]
    for i in range(ROWS):
        lines.append(f"x{i},bad" if i == BAD else f"{i},{'n' * (i % 37)}")
    p.write_text("\n".join(lines) + "\n")
    return [i for i in range(ROWS) if i != BAD]


def test_threaded_parse_keeps_order_offsets_and_error_lines(tmp_path: Path) -> None:
    p = tmp_path / "big.csv"
    ids = write_csv(p)
    text = p.read_bytes()
    src = lambda **kw: FileSource(str(p), format="csv", schema=SCHEMA, on_error="collect", block_size=1 << 19, **kw)  # noqa: E731
    out = run(src())
    batches = [x for x in out if type(x) is UpdateBatch]
    assert len(batches) >= 3, "several chunks"
    assert [r for b in batches for r in b.table.column("id").to_pylist()] == ids, "every row once, in file order"
    # Each chunk ends on a line boundary and its offset is where the next chunk starts.
    offs = [b.offsets["files/0"][str(p)]["off"] for b in batches]
    assert offs[-1] == len(text) and all(text[o - 1 : o] == b"\n" for o in offs)
    errs = [r for x in out if isinstance(x, ErrorBatch) for r in x.table.to_pylist()]
    assert [(e["line"], e["offset"], e["record"]) for e in errs] == [(BAD + 2, text.index(b"\nx47531,") + 1, "x47531,bad")]
    # Resume after the second chunk: exactly the rows after its offset, still in order.
    resumed = run(src(resume={"files/0": batches[1].offsets["files/0"]}))
    rest = [r for x in resumed if type(x) is UpdateBatch for r in x.table.column("id").to_pylist()]
    done = sum(b.table.num_rows for b in batches[:2])
    assert rest == ids[done:]

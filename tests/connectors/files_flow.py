"""A `shardflow run` flow over `FileSource`, configured by environment variables (used by the file source tests).

    FILES_GLOB        the glob (required)
    FILES_FORMAT      csv (default), jsonl or parquet
    FILES_PARTITIONS  FileSource partitions (default 1)
    FILES_SINK        persist (default) or append
    FILES_BLOCK       block_size in bytes (default 16 MiB)

Rows `(id int64, name string)` go to collection `rows`, bad records to `rows_errors`.
"""

from __future__ import annotations

import os

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.files import ERRORS_SCHEMA, FileSource, split_errors
from flows.operators import consolidate

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def build(ctx):  # type: ignore[no-untyped-def]
    ctx.collection("rows", SCHEMA)
    ctx.collection("rows_errors", ERRORS_SCHEMA)
    sink = os.environ.get("FILES_SINK", "persist")
    src = FileSource(
        os.environ["FILES_GLOB"],
        format=os.environ.get("FILES_FORMAT", "csv"),
        schema=SCHEMA,
        mode=ctx.mode,
        on_error="collect",
        name="rows",
        partitions=int(os.environ.get("FILES_PARTITIONS", "1")),
        block_size=int(os.environ.get("FILES_BLOCK", str(16 << 20))),
        poll_interval=0.05,
        resume=ctx.resume_offsets("rows"),
        resume_upper=ctx.upper("rows"),
    )
    flow = Dataflow("files_flow")
    split = split_errors("split", op.input("files", flow, src))
    if sink == "append":
        ctx.append("rows_sink", consolidate("rows_cons", split.data), "rows", batch_duration=0.2)
        ctx.append("errors_sink", consolidate("errors_cons", split.errors), "rows_errors", batch_duration=0.2)
    else:
        ctx.persist_split(
            "rows_sink", consolidate("rows_cons", split.data), consolidate("errors_cons", split.errors), "rows"
        )
    return flow

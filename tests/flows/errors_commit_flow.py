"""A files flow whose data or errors sink is held back (loaded by path; not a test module).

    ERRS_GLOB    the CSV glob (required)
    ERRS_STALL   "errors" or "data": merge that stream with a stalled partition whose
                 frontier stops at `ERRS_STALL_AT` (default 30), so its sink commits
                 only below it this run: the state a SIGKILL between the two sinks'
                 commits leaves behind. Unset: nothing is held back.

Rows `(id int64, name string)` go to `rows`, bad lines to `rows_errors`.
"""

from __future__ import annotations

import os

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.files import ERRORS_SCHEMA, FileSource, split_errors
from connectors.loadgen import Counter
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate
from storage import Progress

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def build(ctx):  # type: ignore[no-untyped-def]
    ctx.collection("rows", SCHEMA)
    ctx.collection("rows_errors", ERRORS_SCHEMA)
    src = FileSource(
        os.environ["ERRS_GLOB"], format="csv", schema=SCHEMA, mode=ctx.mode, on_error="collect", name="rows",
        block_size=8, resume=ctx.resume_offsets("rows"), resume_upper=ctx.upper("rows"),
    )
    flow = Dataflow("errors_commit")
    split = split_errors("split", op.input("files", flow, src))
    data, errors = consolidate("rows_cons", split.data), consolidate("errors_cons", split.errors)
    stall = os.environ.get("ERRS_STALL")
    if stall:
        # One tick at `at - 1`: the partition's last progress is `at` (and it never closes).
        at = int(os.environ.get("ERRS_STALL_AT", "30"))
        gen = Counter(seed=0, rows_per_tick=1, start_time=at - 1, tick_ms=1)
        lg = op.input("stall", flow, LoadgenSource(gen, "counter", ticks=1, name="stall"))
        held = op.filter("progress_only", lg, lambda x: isinstance(x, Progress))
        if stall == "data":
            data = op.merge("hold_data", data, held)
        else:
            errors = op.merge("hold_errors", errors, held)
    ctx.persist_split("rows_sink", data, errors, "rows")
    return flow

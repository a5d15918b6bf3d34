"""CSV files -> collection `orders`; malformed lines -> `orders_errors`.

    shardflow run examples/files_orders.py --data ./data                         # read the glob once
    shardflow run examples/files_orders.py --data ./data --mode continuous       # tail new files and lines
    shardflow query --data ./data "SELECT * FROM orders_errors"

The glob is `$ORDERS_GLOB` (default `examples/data/orders*.csv`). The sample file
has one bad line (line 5), which lands in `orders_errors` with its file, line
and what was wrong. Offsets are `{file: byte offset + fingerprint}`: a rerun reads
only new bytes, and a file rotated under the same name (renamed to `orders.csv.1`
or copy-truncated) is finished from the old copy, then read from its start.
`$ORDERS_PARTITIONS` (default 1) splits the files over partitions, which the
workers (`-w`) and processes (`-p`) share.
"""

from __future__ import annotations

import os

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.files import ERRORS_SCHEMA, FileSource, split_errors
from flows.operators import consolidate

SCHEMA = pa.schema([("id", pa.int64()), ("customer", pa.string()), ("amount", pa.float64())])


def build(ctx):  # type: ignore[no-untyped-def]
    ctx.collection("orders", SCHEMA)
    ctx.collection("orders_errors", ERRORS_SCHEMA)
    src = FileSource(
        os.environ.get("ORDERS_GLOB", "examples/data/orders*.csv"),
        format="csv",
        schema=SCHEMA,
        mode=ctx.mode,
        on_error="collect",
        name="orders",
        partitions=int(os.environ.get("ORDERS_PARTITIONS", "1")),
        resume=ctx.resume_offsets("orders"),
        resume_upper=ctx.upper("orders"),
    )
    flow = Dataflow("files_orders")
    split = split_errors("split", op.input("files", flow, src))
    # Both collections, the errors committed first (a kill in between loses no error row).
    ctx.persist_split(
        "orders_sink", consolidate("orders_cons", split.data), consolidate("errors_cons", split.errors), "orders"
    )
    return flow

"""CSV files -> collection `orders` -> view `orders_by_customer`, in one `shardflow run`.

    shardflow run examples/csv_groupby_view.py --data ./data                     # ingest, then the view is exact
    shardflow run examples/csv_groupby_view.py --data ./data --mode continuous   # tail files, keep the view fresh
    shardflow query --data ./data "SELECT * FROM orders_by_customer ORDER BY customer"

The glob is `$ORDERS_GLOB` (default `examples/data/orders*.csv`; malformed lines
raise, set `$ORDERS_ON_ERROR=collect` to skip them into `orders_errors`); `$ORDERS_VIEW`
replaces the view's SQL (empty: no view, ingest only) (a view with other SQL under the same name needs `shardflow view --replace`). The view
reads `orders` from the sink's commits (`ctx.view` after `ctx.persist` into its
input), so it sees exactly what became durable, and a rerun after a crash (even a
SIGKILL between the two commits) resumes both exactly.
"""

from __future__ import annotations

import os

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.files import ERRORS_SCHEMA, FileSource, split_errors
from flows.operators import consolidate

#: `amount` is DECIMAL: a sum of DOUBLEs depends on the order DuckDB's threads add them in,
#: so two evaluations of the same group can differ in the last bit (and a view's retraction
#: of its old row would then miss); a DECIMAL sum is exact (and takes the invertible path).
SCHEMA = pa.schema([("id", pa.int64()), ("customer", pa.string()), ("amount", pa.decimal128(18, 2))])
VIEW = "SELECT customer, count(*) AS orders, sum(amount) AS total, max(amount) AS top FROM orders GROUP BY customer"


def build(ctx):  # type: ignore[no-untyped-def]
    on_error = os.environ.get("ORDERS_ON_ERROR", "raise")
    ctx.collection("orders", SCHEMA)
    src = FileSource(
        os.environ.get("ORDERS_GLOB", "examples/data/orders*.csv"),
        format="csv",
        schema=SCHEMA,
        mode=ctx.mode,
        on_error=on_error,
        name="orders",
        resume=ctx.resume_offsets("orders"),
        resume_upper=ctx.upper("orders"),
    )
    flow = Dataflow("csv_groupby_view")
    data = op.input("files", flow, src)
    if on_error == "collect":
        ctx.collection("orders_errors", ERRORS_SCHEMA)
        split = split_errors("split", data)
        # Both collections, the errors committed first (a kill in between loses no error row).
        ctx.persist_split(
            "orders_sink", consolidate("orders_cons", split.data), consolidate("errors_cons", split.errors), "orders"
        )
    else:
        ctx.persist("orders_sink", consolidate("orders_cons", data), "orders")
    sql = os.environ.get("ORDERS_VIEW", VIEW)
    if sql:  # ORDERS_VIEW="" ingests only
        ctx.view(flow, "orders_by_customer", sql)
    return flow

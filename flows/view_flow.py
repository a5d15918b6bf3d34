"""The flow `shardflow view NAME "SQL"` runs: one incremental view (`FlowContext.view`).

Not for direct use: the command passes the view through the environment
(`SHARDFLOW_VIEW_NAME`, `SHARDFLOW_VIEW_SQL`, `SHARDFLOW_VIEW_REPLACE`), so the
processes of a `-p N` run build the same flow.
"""

from __future__ import annotations

import os
import re
from typing import Any

from bytewax.dataflow import Dataflow

from storage.errors import InvalidInput


def build(ctx: Any) -> Dataflow:
    name = os.environ.get("SHARDFLOW_VIEW_NAME")
    sql = os.environ.get("SHARDFLOW_VIEW_SQL")
    if not name or not sql:
        raise InvalidInput("flows/view_flow.py is run by `shardflow view NAME SQL`, not directly")
    # The collection name is checked by the controller; the flow id only needs to be one bytewax takes.
    flow = Dataflow("view_" + re.sub(r"[^A-Za-z0-9_]", "_", name))
    ctx.view(flow, name, sql, replace=os.environ.get("SHARDFLOW_VIEW_REPLACE") == "1" and ctx.process_id == 0)
    return flow

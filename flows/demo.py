"""The built-in demo: auctions and bids from the load generator, through a flow, into ./data.

`shardflow demo` (and `make demo`) runs this flow file in batch mode, then
maintains two incremental views over what it wrote, `top_bids` (the top bid
per auction, a join and a group-by) and `bids_per_band`, and prints them.
Running it again resumes from the committed offsets and adds nothing:
ingestion is exactly-once, and each view resumes where it stopped.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.loadgen import Auction
from connectors.loadgen_source import LoadgenSource
from flows.operators import consolidate, sql

if TYPE_CHECKING:
    from flows.job import FlowContext

TICKS = int(os.environ.get("SHARDFLOW_DEMO_TICKS", "200"))
SEED = int(os.environ.get("SHARDFLOW_DEMO_SEED", "1"))

BIDS_SQL = """
SELECT id, auction_id, buyer, amount,
       CASE WHEN amount >= 750 THEN 'high' WHEN amount >= 250 THEN 'mid' ELSE 'low' END AS band,
       _time, _diff
FROM updates
"""

#: The views the demo maintains (`shardflow view --list` shows them).
VIEWS = {
    "top_bids": (
        "SELECT a.id AS auction, a.item, max(b.amount) AS top_bid, "
        "arg_max(b.band, (b.amount, b.id)) AS band, arg_max(b.buyer, (b.amount, b.id)) AS buyer, count(*) AS bids "
        "FROM auctions a JOIN bids b ON b.auction_id = a.id GROUP BY a.id, a.item"
    ),
    "bids_per_band": "SELECT band, count(*) AS bids, max(amount) AS top FROM bids GROUP BY band",
}

TOP_BIDS = """
SELECT t.auction, t.item, t.top_bid, t.band, u.name AS buyer, t.bids
FROM top_bids t JOIN users u ON u.id = t.buyer
ORDER BY top_bid DESC, auction
LIMIT 8
"""


def build(ctx: FlowContext) -> Dataflow:
    """auctions, users: loadgen -> consolidate -> persist; bids: loadgen -> consolidate -> sql -> persist.

    With `ctx.demo_views` set (the demo's second run): the views instead.
    """
    from storage.controller import ValidFrom

    if getattr(ctx, "demo_views", False):
        flow = Dataflow("auction_demo_views")
        for name, sql_text in VIEWS.items():
            ctx.view(flow, name, sql_text)
        return flow
    gen = Auction(seed=SEED)
    flow = Dataflow("auction_demo")
    schemas = gen.schemas()
    # The demo's times are synthetic (tick i is at i * 1000), so the default read policy
    # (one second behind the upper) would compact away all history. Keep it all, so that
    # `--as-of` and `changes()` can go back in time.
    keep_history = ValidFrom(0)
    for name in ("auctions", "users"):
        ctx.collection(name, schemas[name])
        ctx.controller.set_read_policy({name: keep_history})
        src = LoadgenSource(gen, name, ticks=TICKS, resume=ctx.resume_offsets(name))
        ctx.persist(f"{name}_sink", consolidate(f"{name}_cons", op.input(name, flow, src)), name)


    bids_schema = schemas["bids"].remove(schemas["bids"].get_field_index("bid_time")).append(pa.field("band", pa.string()))
    bids_schema = pa.schema([bids_schema.field(n) for n in ("id", "auction_id", "buyer", "amount", "band")])
    ctx.collection("bids", bids_schema)
    ctx.controller.set_read_policy({"bids": keep_history})
    src = LoadgenSource(gen, "bids", ticks=TICKS, resume=ctx.resume_offsets("bids"))
    bids = sql("bids_sql", consolidate("bids_cons", op.input("bids", flow, src)), BIDS_SQL, schema=schemas["bids"])
    ctx.persist("bids_sink", bids, "bids")
    return flow


def run_demo(data: str, *, ticks: int = TICKS, seed: int = SEED, consensus: str | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    import storage
    from flows.job import open_controller, run_flow

    os.environ["SHARDFLOW_DEMO_TICKS"] = str(ticks)
    os.environ["SHARDFLOW_DEMO_SEED"] = str(seed)
    global TICKS, SEED
    TICKS, SEED = ticks, seed
    console = Console()
    client = storage.open(data, consensus=consensus)
    console.print(f"[bold]shardflow demo[/]: auction load generator (seed {seed}, {ticks} ticks) -> flow -> {data}")
    t0 = time.monotonic()
    summary = run_flow(__file__, data, mode="batch", client=client)
    console.print(f"committed {summary.rows:,} rows in {summary.batches} batches in {time.monotonic() - t0:.1f}s; "
                  + ", ".join(f"{n} upper {f}" for n, f in sorted(summary.frontiers.items())))
    t0 = time.monotonic()
    views = run_flow(__file__, data, mode="batch", client=client, configure=lambda c: setattr(c, "demo_views", True))
    console.print(f"views {', '.join(VIEWS)}: {views.rows:,} changes in {time.monotonic() - t0:.1f}s; "
                  + ", ".join(f"{n} upper {views.frontiers[n]}" for n in VIEWS))
    ctl = open_controller(client, read_only=True, role="demo")
    try:
        cat = {n: m.shard_id for n, m in ctl.collections().items()}
    finally:
        ctl.close()
    with storage.query.connect(client, cat) as con:
        table = con.sql(TOP_BIDS).to_arrow_table()
        bands = con.sql("SELECT * FROM bids_per_band ORDER BY top DESC").to_arrow_table()
        counts = con.sql("SELECT (SELECT count(*) FROM auctions), (SELECT count(*) FROM bids), (SELECT count(*) FROM users)").fetchall()[0]
    for title, tbl in (("view top_bids: the top bid per auction", table),
                       ("view bids_per_band", bands)):
        t = Table(title=title)
        for c in tbl.schema.names:
            t.add_column(c, justify="right" if pa.types.is_integer(tbl.schema.field(c).type) else "left")
        for row in tbl.to_pylist():
            t.add_row(*[str(v) for v in row.values()])
        console.print(t)
    client.close()
    prog = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0].endswith("shardflow") else "shardflow"
    if prog.startswith(".."):
        prog = "shardflow"
    console.print(f"{counts[0]:,} auctions, {counts[1]:,} bids, {counts[2]:,} users. "
                  f"Query it yourself: [bold]{prog} query --data {data} \"SELECT band, count(*) FROM bids GROUP BY band\"[/]")
    return 0

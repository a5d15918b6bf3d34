"""The `shardflow` command line.

    shardflow demo                      run the built-in auction demo into ./data and query it
    shardflow run FLOW.py               run a flow (batch or continuous)
    shardflow query "SQL"               query every collection with DuckDB
    shardflow tail NAME                 print updates as they commit (like SUBSCRIBE)
    shardflow inspect [NAME]            shards, since, upper, batches, sizes, lag
    shardflow holds list|release        who holds each collection's history readable; release one
    shardflow compact [--full] [NAME]   merge batches now (--full: into one consolidated batch)
    shardflow gc [NAME]                 delete unreferenced parts and old state versions
    shardflow fsck [NAME]               check each collection reads back (parts, sha256, UTF-8, counts)
    shardflow webhook NAME              serve signed HTTP POSTs into collection NAME

Errors print one line and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.job import JobStats

EXIT_ERROR = 1
EXIT_USAGE = 2


def _data_default() -> str:
    return os.environ.get("SHARDFLOW_DATA", "./data")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data",
        default=_data_default(),
        metavar="DIR",
        help="data directory: consensus.sqlite and blob/ (default: %(default)s, or $SHARDFLOW_DATA)",
    )
    common.add_argument(
        "--consensus",
        default=os.environ.get("SHARDFLOW_CONSENSUS"),
        metavar="URL",
        help="consensus URL, e.g. postgresql://user@127.0.0.1:5432/db (default: SQLite under --data); "
        "waits on it are bounded by $SHARDFLOW_CONSENSUS_TIMEOUT seconds",
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    p = argparse.ArgumentParser(
        prog="shardflow",
        description="Incremental, exactly-once data pipelines: bytewax flows into Parquet shards, queried with DuckDB.",
        epilog="Run `shardflow COMMAND --help` for a command's options. Start with `shardflow demo`.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser(
        "demo",
        parents=[common],
        help="run the auction demo flow into --data and print a query",
        description="Generate auctions and bids (deterministic load generator), run them through a flow "
        "with a SQL step into collections under --data, maintain the views top_bids (the top bid per "
        "auction) and bids_per_band over them, and print both.",
    )
    d.add_argument(
        "--ticks", type=int, default=200, help="load generator ticks to run (default: %(default)s)"
    )
    d.add_argument("--seed", type=int, default=1, help="load generator seed (default: %(default)s)")

    # What `run` and `view` share: how a flow runs.
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--mode", choices=["batch", "continuous"], default="batch", help="default: %(default)s")
    running.add_argument(
        "-w", "--workers", type=int, default=1, help="bytewax worker threads per process (default: 1)"
    )
    running.add_argument(
        "-p",
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="bytewax processes on this machine, talking over 127.0.0.1 (default: 1). This process is "
        "process 0: it creates the collections and does the housekeeping; the others only run the flow",
    )
    running.add_argument(
        "--tick",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="continuous mode: tick idle uppers forward this often (default: %(default)s)",
    )
    running.add_argument("--no-progress", action="store_true", help="no live progress line")

    r = sub.add_parser(
        "run",
        parents=[common, running],
        help="run a flow file",
        description="Run a flow defined in a Python file (see examples/). Batch mode exits when the "
        "sources are exhausted; continuous mode runs until SIGINT/SIGTERM, then flushes and exits 0.",
    )
    r.add_argument("flow", metavar="FLOW.py", help="a Python file that defines the flow")
    r.add_argument(
        "--allow-empty",
        action="store_true",
        help="batch mode: a file source whose glob matches no file reads nothing instead of failing",
    )
    # A child of a multi-process run (`-p N` starts them; not for direct use: process 0 must build first).
    r.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--addresses", default=None, help=argparse.SUPPRESS)
    r.add_argument("--summary-file", default=None, help=argparse.SUPPRESS)

    w = sub.add_parser(
        "webhook",
        parents=[common],
        help="serve HTTP POSTs into an append-only collection",
        description="Serve an HTTP endpoint that appends each POST body to collection NAME (created "
        "if missing, data_source 'webhook'). A 200 is sent once the body is durable. With --secret-env, "
        "requests must be signed: X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.' + body> "
        "(see README). Runs until SIGINT/SIGTERM, then finishes the requests in flight and exits 0.",
    )
    w.add_argument("name", help="the collection to append to")
    w.add_argument("--secret-env", metavar="VAR", default=None, help="environment variable holding the signing secret")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; others need a secret)")
    w.add_argument("--port", type=int, default=8080, help="TCP port (default: %(default)s; 0 picks one)")
    w.add_argument("--include-headers", action="store_true", help="also store the request headers (JSON)")
    w.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES", help="largest body (default: %(default)s)")
    w.add_argument("--tolerance", type=float, default=300.0, metavar="S", help="signature timestamp tolerance in seconds (default: %(default)s)")
    w.add_argument("--max-connections", type=int, default=256, help="open connections at most (default: %(default)s)")
    w.add_argument(
        "--batch-ms",
        type=int,
        default=5,
        metavar="MS",
        help="after a commit, gather requests this long before the next one (default: %(default)s)",
    )

    v = sub.add_parser(
        "view",
        parents=[common, running],
        help="maintain an incremental SQL view over collections",
        description="Maintain collection NAME as the SQL over other collections, incrementally: each "
        "change of an input costs work in proportion to the keys it touches, not to the inputs' size. "
        "At every time the view equals the SQL evaluated over its inputs at that time (query it with "
        "`shardflow query`, at the latest time or --as-of). Covered: projections and filters; GROUP BY "
        "with any aggregate and HAVING; inner, left and full outer equi-joins; DISTINCT; UNION ALL; "
        "top-k per group (QUALIFY row_number() OVER (PARTITION BY g ORDER BY ...) <= k); views over "
        "views. Anything else is refused with a message naming it. Batch mode catches up to the "
        "inputs' uppers and exits; continuous mode keeps the view fresh until SIGINT/SIGTERM. The "
        "definition is stored: running NAME again resumes it exactly where it stopped.",
        epilog='example: shardflow view top_bids "SELECT auction_id, max(amount) AS top FROM bids GROUP BY auction_id"',
    )
    v.add_argument("name", nargs="?", help="the view's collection name")
    v.add_argument("sql", nargs="?", help="a DuckDB SELECT over collections")
    v.add_argument("--replace", action="store_true", help="NAME exists with other SQL: drop it and rebuild it from the inputs")
    v.add_argument("--list", action="store_true", help="list the views and their definitions, then exit")
    v.add_argument("--drop", action="store_true", help="drop view NAME (its collection and its holds on its inputs)")

    q = sub.add_parser(
        "query",
        parents=[common],
        help="run SQL over every collection",
        description="Every collection the SQL mentions is a view of its snapshot, all at ONE time "
        "(--as-of, or the latest time every one of them can read); introspection collections are "
        "in schema sys. A row with a negative count makes every query over its collection fail, "
        "however filtered. The table function changes(name, from, to) returns the raw updates, "
        "with _time and _diff, where from < _time <= to. from defaults to -1, so changes('x') and "
        "changes('x', -1, T) include time 0, changes('x', 0, T) leaves it out; to defaults to the "
        "query's as-of, and a later to is an error (those updates are not part of the query). "
        "from must be >= since once since is past 0.",
    )
    q.add_argument("sql", help="a DuckDB SQL query")
    q.add_argument(
        "--as-of",
        type=int,
        default=None,
        metavar="T",
        help="read every collection at time T (default: the latest time all of them can read)",
    )
    q.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for a readable time: --as-of T past an upper, or no time readable in "
        "every collection yet (default: %(default)s)",
    )
    q.add_argument(
        "--format",
        choices=["table", "csv", "json", "parquet"],
        default="table",
        help="default: %(default)s",
    )
    q.add_argument("-o", "--output", metavar="FILE", help="write to FILE (required for parquet)")

    t = sub.add_parser(
        "tail",
        parents=[common],
        help="print a collection's updates as they commit",
        description="Print the snapshot at --as-of (default: latest) as updates, then every update "
        "as it commits, like Materialize's SUBSCRIBE. Stops on Ctrl-C or after --timeout idle seconds.",
    )
    t.add_argument("name", help="collection name")
    t.add_argument("--as-of", type=int, default=None, metavar="T")
    t.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long with no progress",
    )
    t.add_argument("--no-snapshot", action="store_true", help="only updates after --as-of")

    i = sub.add_parser(
        "inspect",
        parents=[common],
        help="show collections: shard, since, upper, batches, sizes, lag, holds",
        description="Show each collection's shard, since, upper, lag, batches and sizes, then the "
        "holds on it (see `shardflow holds --help`): who holds it, at what time, since when.",
    )
    i.add_argument("name", nargs="?", help="one collection (default: all)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument(
        "--system", action="store_true", help="include the introspection collections (system.*)"
    )

    h = sub.add_parser(
        "holds",
        help="list or release the holds that keep collections readable",
        description=HOLDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hsub = h.add_subparsers(dest="holds_command", metavar="ACTION")
    hsub.required = True
    hl = hsub.add_parser(
        "list",
        parents=[common],
        help="a table of every hold: collection, holder, kind, since, registered, state",
        description="List the holds on each collection (default: all but system.*): the holder, its "
        "kind, the time it holds (since), when it was registered (UTC), and whether it is durable, "
        "leased or expired.",
    )
    hl.add_argument("names", nargs="*", metavar="COLLECTION", help="collections (default: all)")
    hl.add_argument("--json", action="store_true", help="print JSON: collection -> list of holds")
    hl.add_argument(
        "--system", action="store_true", help="include the introspection collections (system.*)"
    )
    hr = hsub.add_parser(
        "release",
        parents=[common],
        help="remove one hold (a durable handle or a lease) from a collection",
        description="Remove HOLDER's handle from COLLECTION, so its since may move on. The holder "
        "is not told: a dependent whose dependency hold is released may fail with ReadBeforeSince "
        "on its next run; a live process whose lease is released fails on its next heartbeat or "
        "read. The `controller` handle of a live collection cannot be released (the next writer "
        "re-registers it); change the read policy or drop the collection instead. "
        "Refusals print one line and exit 2.",
    )
    hr.add_argument("collection", metavar="COLLECTION", help="collection name")
    hr.add_argument(
        "holder", metavar="HOLDER", help="the holder id, as `shardflow holds list` prints it"
    )

    c = sub.add_parser(
        "compact",
        parents=[common],
        help="compact collections now",
        description="Merge each collection's batches now: by size tiers (what the background compactor "
        "does), or with --full into one consolidated batch (one rewrite of the whole collection: updates "
        "at or before its since are advanced to since and summed per row, the cheapest state to query).",
    )
    c.add_argument("name", nargs="?", help="one collection (default: all)")
    c.add_argument("--full", action="store_true", help="merge every batch of each collection into one")
    g = sub.add_parser(
        "gc", parents=[common], help="delete unreferenced parts and old state versions"
    )
    g.add_argument("name", nargs="?", help="one collection (default: all)")
    f = sub.add_parser(
        "fsck", parents=[common],
        help="check that every collection reads back: invariants, parts (sha256, Parquet, UTF-8), counts",
    )
    f.add_argument("name", nargs="?", help="one collection (default: all, system.* included)")
    return p


HOLDS_HELP = """\
A hold keeps a collection's history readable: the collection's since (the
earliest time it can be read at; compaction forgets what is before it) never
passes any hold on it. Every hold is a handle on the collection's shard:

  policy      `controller` (durable): the collection's read policy, e.g. one
              second behind its upper; moved on by the writers.
  dependency  `dep:<shard>` (durable): a dependent collection (a flow's export,
              a view) holds its input at its own since; released when the
              dependent is dropped.
  process     `hold:<role>:<pid>@<host>:<nonce>` (leased): a running process's
              read holds; they expire by themselves when the process dies.
  reader      any other id (leased): a sink's sync point, a source, a query.

When to release one: a durable hold outlives its process. A job that crashed
or was abandoned without dropping its collections leaves its dependency holds
behind, and they pin its inputs' history (since stops; the shards grow). List
the holds with `shardflow holds list`, then `shardflow holds release COLLECTION
HOLDER`. Releasing is for holders that are gone: a dependent whose hold is
released may fail with ReadBeforeSince on its next run. Leases need no
release; they expire on their own.
"""


class UsageError(Exception):
    """A refused request: one line on stderr, exit code 2 (EXIT_USAGE)."""


# ---------------------------------------------------------------- helpers

# Every storage client a command opened; main() closes them. SUBTLE: a client's
# background compactor still inside DuckDB when the interpreter exits aborts the
# process (SIGABRT); close() waits for it.
_CLIENTS: list[Any] = []


def _storage_open(args: argparse.Namespace, *, read_only: bool = False) -> Any:
    import storage

    if not read_only and not args.consensus and os.path.isdir(args.data) and not _writable(args.data):
        raise storage.errors.ReadOnly(
            f"--data {args.data}: this process cannot write there (a read-only directory?), and "
            f"`shardflow {args.command}` writes; query, tail, inspect, holds list and fsck read it as it is"
        )
    client = storage.open(args.data, consensus=args.consensus, read_only=read_only)
    _CLIENTS.append(client)
    return client


def _writable(data: str) -> bool:
    """Can this process write the store under `data` (a read-only mount or another user's store cannot)?"""
    cons = os.path.join(data, "consensus.sqlite")
    return os.access(data, os.W_OK) and (not os.path.exists(cons) or os.access(cons, os.W_OK))


def _open(args: argparse.Namespace, *, create: bool = False, reads: bool = False) -> Any:
    """The client of `--data`. `reads`: the command only reads, so a store this process
    cannot write is opened read-only (`storage.open(read_only=True)`) instead of failing."""
    import storage

    if (
        not create
        and not os.path.exists(os.path.join(args.data, "consensus.sqlite"))
        and not args.consensus
    ):
        raise storage.errors.InvalidInput(
            f"--data {args.data}: no shardflow data here (run a flow first, e.g. `shardflow demo`)"
        )
    return _storage_open(args, read_only=reads and not args.consensus and not _writable(args.data))


def _controller(client: Any, read_only: bool = True) -> Any:
    from storage.controller import StorageController

    return StorageController.open(client, read_only=read_only, role="cli")


def _catalog(ctl: Any) -> dict[str, str]:
    """Every queryable name -> shard id, introspection included."""
    names = {name: meta.shard_id for name, meta in ctl.collections().items()}
    names.update(ctl.introspection_shards())
    return names


def _resolve(ctl: Any, name: str) -> str:
    cat = _catalog(ctl)
    if name not in cat:
        import storage

        known = ", ".join(sorted(cat)) or "none"
        raise storage.errors.IdentifierMissing(f"collection {name!r} does not exist (known: {known})")
    return cat[name]


def _referenced(catalog: dict[str, str], sql: str) -> dict[str, str]:
    """The collections `sql` mentions (by name, as `sys.x` for `system.x`, or in changes('x', ...)).

    Only those get views: each view holds a reader and an as_of, and `--as-of T`
    must not fail because an unrelated collection cannot be read at T.
    """
    import re

    words = set(re.findall(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?", sql.lower()))
    out = {}
    for name, shard in catalog.items():
        alias = "sys." + name[len("system.") :] if name.startswith("system.") else name
        if name in words or alias in words:
            out[name] = shard
    return out


# C0 and C1 controls, DEL, and the bidirectional overrides and isolates ("Trojan source"):
# shown as escapes, so data can neither drive the terminal nor reorder what is shown.
_VISIBLE = {c: repr(chr(c))[1:-1] for c in [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def _visible(v: Any) -> Any:
    """`v` as a table cell: a `rich` Text (never read as markup), control characters escaped (`\\x1b`, `\\n`)."""
    from rich.text import Text

    return Text("NULL" if v is None else str(v).translate(_VISIBLE))


def _print_table(table: Any, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=None if title is None else _visible(title), show_lines=False)
    for name in table.schema.names:
        t.add_column(_visible(name), overflow="fold")
    # By column: a result may have two columns of one name (`SELECT 1 AS a, 2 AS a`).
    cols = [c.to_pylist() for c in table.columns]  # display only: bounded by the caller's LIMIT
    for row in zip(*cols, strict=True):
        t.add_row(*map(_visible, row))
    Console().print(t)


def _emit(table: Any, fmt: str, output: str | None) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if not output:
            import storage

            raise storage.errors.InvalidInput("--format parquet needs --output FILE")
        pq.write_table(table, output)
        return
    if fmt == "table" and not output:
        _print_table(table)
        return
    out = open(output, "wb") if output else sys.stdout.buffer
    try:
        if fmt == "csv":
            pacsv.write_csv(table, out)
        elif fmt == "json":
            for batch in table.to_batches():
                for row in batch.to_pylist():
                    out.write((json.dumps(row, default=str) + "\n").encode())
        else:  # table into a file: csv is the honest choice
            pacsv.write_csv(table, out)
    finally:
        if output:
            out.close()
        else:
            out.flush()


# ---------------------------------------------------------------- commands


def _refuse_store_path(client: Any, path: str) -> None:
    """`--output` must not land in the store (it would overwrite its files)."""
    import storage

    real = os.path.realpath(path)
    for d in storage.query.store_dirs(client):
        root = os.path.realpath(d)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            raise storage.errors.InvalidInput(f"--output {path}: it is inside the store ({d}); write elsewhere")


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    import storage
    from storage.controller import read_catalog

    client = _open(args, reads=True)
    # The catalog straight from consensus: a query reads, so it needs no controller
    # (opening one sets up every collection and its introspection: most of a small
    # query's time).
    catalog = read_catalog(client)
    cat = _referenced(catalog, args.sql)
    if not args.sql.strip():
        raise storage.errors.InvalidInput("query: empty SQL")
    # Only the collections the SQL mentions are opened: an unrelated collection
    # (a broken part, a since past this as_of) cannot break this query.
    if args.output:
        _refuse_store_path(client, args.output)
    # confine: the SQL can neither write under the data directory nor read its internals
    # (README, Security).
    with storage.query.connect(client, cat, as_of=args.as_of, timeout=args.timeout, confine=True) as con:
        try:
            table = con.sql(args.sql).to_arrow_table()
        except duckdb.PermissionException as e:
            raise storage.errors.InvalidInput(
                f"query: {str(e).splitlines()[0]}: shardflow query keeps the data directory {args.data} out of "
                "reach, and new files directly beside it (README: Security)"
            ) from e
        except duckdb.CatalogException as e:
            # DuckDB names the missing table; say which collections there are.
            known = ", ".join(sorted(n for n in catalog if not n.startswith("system."))) or "none"
            raise storage.errors.IdentifierMissing(
                f"query: {str(e).splitlines()[0]} (collections: {known})"
            ) from e
        _emit(table, args.format, args.output)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    import storage
    from storage import DIFF, TIME

    client = _open(args, reads=True)
    ctl = _controller(client)
    try:
        shard = _resolve(ctl, args.name)
    finally:
        ctl.close()
    with client.open_leased_reader(shard) as r:
        as_of = args.as_of
        if as_of is None:
            up = client.state(shard).upper
            as_of = max((up.time or 1) - 1, 0) if not up.is_empty else storage.MAX_TIME
        # validate: a row whose count goes negative stops the tail with one line (NegativeCount).
        events = (
            r.listen(as_of, timeout=args.timeout, validate=True)
            if args.no_snapshot
            else r.subscribe(as_of, timeout=args.timeout, validate=True)
        )
        out = sys.stdout
        try:
            for ev in events:
                if isinstance(ev, storage.UpdateBatch):
                    t = ev.table.sort_by([(TIME, "ascending")])
                    cols = [c for c in t.schema.names if c not in (TIME, DIFF)]
                    for row in t.to_pylist():
                        vals = " ".join(f"{c}={row[c]!r}" for c in cols)
                        out.write(f"{row[TIME]}\t{row[DIFF]:+d}\t{vals}\n")
                else:
                    out.write(f"# progress {ev.frontier}\n")
                out.flush()
        except KeyboardInterrupt:
            pass
    return 0


def _lag_ms(upper: Any) -> str:
    if upper.is_empty:
        return "closed"
    lag = int(time.time() * 1000) - (upper.time or 0)
    return f"{lag / 1000:.1f}s" if 0 <= lag < 10**10 else "-"


def cmd_inspect(args: argparse.Namespace) -> int:
    client = _open(args, reads=True)
    ctl = _controller(client)
    try:
        cat = _catalog(ctl)
        names = (
            [args.name]
            if args.name
            else sorted(n for n in cat if args.system or not n.startswith("system."))
        )
        if args.name:
            _resolve(ctl, args.name)
        infos = {n: _inspect_one(client, cat[n]) for n in names}
        by_shard = _names_by_shard(ctl)
    finally:
        ctl.close()
    for info in infos.values():
        _name_dependents(info["holds"], by_shard)
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    import storage

    t = Table(title=_visible(f"collections in {args.data}"))
    right = ("since", "upper", "batches", "rows", "updates", "bytes")
    for col in ("collection", "shard", "since", "upper", "lag", "batches", "rows", "updates", "bytes"):
        t.add_column(col, justify="right" if col in right else "left")
    for n, info in infos.items():
        up = storage.Frontier(info["upper"])
        rows = info["rows"]
        t.add_row(*map(
            _visible,
            (n,
            info["shard_id"][:9] + "…",
            str(info["since"]),
            str(info["upper"]),
            _lag_ms(up),
            str(len(info["batches"])),
            f"{rows:,}" if isinstance(rows, int) else str(info.get("rows_error") or "-"),
            f"{info['updates']:,}",
            f"{info['bytes']:,}"),
        ))
    Console().print(t)
    if args.name:
        bt = Table(title=f"batches of {args.name}")
        for col in ("lower", "upper", "since", "parts", "updates", "bytes"):
            bt.add_column(col, justify="right")
        for b in infos[args.name]["batches"]:
            bt.add_row(*[_visible(b[k]) for k in ("lower", "upper", "since", "parts", "updates", "bytes")])
        Console().print(bt)
    print()
    title = f"holds on {args.name}" if args.name else "holds"
    _print_holds(title, [(n, info["holds"]) for n, info in infos.items()])
    return 0


# ---------------------------------------------------------------- holds


def _names_by_shard(ctl: Any) -> dict[str, str]:
    """shard id -> collection name, for every live collection (introspection included)."""
    return {shard: name for name, shard in _catalog(ctl).items()}


def _name_dependents(holds: list[dict[str, Any]], by_shard: dict[str, str]) -> list[dict[str, Any]]:
    """Add `dependent` (the dependent collection's name, None when it was dropped) to dependency holds."""
    for h in holds:
        if h["kind"] == "dependency":
            h["dependent"] = by_shard.get(h["dependent_shard"])
    return holds


def _utc(ms: int | None) -> str:
    """Epoch milliseconds as a UTC ISO timestamp; "-" when unknown."""
    if ms is None:
        return "-"
    from datetime import UTC, datetime

    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "-"


def _hold_kind(h: dict[str, Any]) -> str:
    if h["kind"] == "dependency":
        return f"dependency of {h.get('dependent') or '(dropped)'}"
    if h["kind"] == "process" and h.get("role"):
        return f"process {h['role']} (pid {h['pid']} on {h['host']})"
    return str(h["kind"])


def _hold_state(h: dict[str, Any]) -> str:
    return "expired" if h["expired"] else "durable" if h["durable"] else "leased"


def _print_holds(title: str, per_collection: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """A plain-text table (holder ids are printed whole, to be copied into `holds release`)."""
    header = ("collection", "holder", "kind", "since", "registered", "state")
    rows: list[tuple[str, ...]] = [
        tuple(str(v).translate(_VISIBLE) for v in (
            name,
            h["holder"],
            _hold_kind(h),
            "empty" if h["since"] is None else str(h["since"]),
            _utc(h["registered_ms"]),
            _hold_state(h),
        ))
        for name, holds in per_collection
        for h in holds
    ]
    print(f"{title}:")
    if not rows:
        print("  (none)")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _collection_holds(client: Any, shard: str) -> list[dict[str, Any]]:
    import storage

    try:
        return list(client.inspect(shard)["holds"])
    except storage.errors.ShardNotFound:
        return []  # not written yet: nothing holds it


def cmd_holds(args: argparse.Namespace) -> int:
    return cmd_holds_list(args) if args.holds_command == "list" else cmd_holds_release(args)


def cmd_holds_list(args: argparse.Namespace) -> int:
    client = _open(args, reads=True)
    ctl = _controller(client)
    try:
        cat = _catalog(ctl)
        for n in args.names:
            _resolve(ctl, n)
        names = args.names or sorted(n for n in cat if args.system or not n.startswith("system."))
        by_shard = _names_by_shard(ctl)
    finally:
        ctl.close()
    per = [(n, _name_dependents(_collection_holds(client, cat[n]), by_shard)) for n in names]
    if args.json:
        print(json.dumps(dict(per), indent=2, default=str))
        return 0
    _print_holds(f"holds in {args.data}", per)
    return 0


def cmd_holds_release(args: argparse.Namespace) -> int:
    import storage

    name, holder = args.collection, args.holder
    client = _open(args)
    ctl = _controller(client)
    try:
        cat = _catalog(ctl)
        if name not in cat:
            known = ", ".join(sorted(cat)) or "none"
            raise UsageError(f"holds release: collection {name!r} does not exist (known: {known})")
        shard = cat[name]
        by_shard = _names_by_shard(ctl)
    finally:
        ctl.close()
    holds = {h["holder"]: h for h in _name_dependents(_collection_holds(client, shard), by_shard)}
    h = holds.get(holder)
    if h is None:
        have = ", ".join(holds) or "none"
        raise UsageError(f"holds release: {name!r} has no holder {holder!r} (its holders: {have})")
    if h["kind"] == "policy":
        raise UsageError(
            f"holds release: {holder!r} is the read-policy handle of live collection {name!r}: the "
            "next writer re-registers it, so releasing it is meaningless; drop the collection or "
            "change its read policy instead"
        )
    if h["durable"]:
        gone = not client.release_critical_since(shard, holder)
    else:
        gone = not client.expire_leased_reader(shard, holder)
    if gone:
        raise storage.errors.IdentifierMissing(
            f"holds release: {holder!r} on {name!r} was released by someone else meanwhile"
        )
    was = "empty" if h["since"] is None else h["since"]
    now = client.state(shard).since.time
    now_s = "empty" if now is None else str(now)
    if h["kind"] == "dependency":
        whose = f"{h.get('dependent') or 'a dropped collection'}'s dependency hold"
    elif h["kind"] == "process" and h.get("role"):
        whose = f"the process hold of {h['role']} (pid {h['pid']} on {h['host']})"
    else:
        whose = f"the {h['kind']} hold"
    head = f"released {whose} {holder} on {name!r} (it held {was}; {name}'s since is now {now_s})"
    if h["expired"]:
        means = "its lease had already run out, so it held nothing"
    elif h["kind"] == "dependency" and h.get("dependent"):
        means = (f"{h['dependent']!r} may fail with ReadBeforeSince on its next run if it is behind "
                 f"{name}'s since; a job still maintaining it fails with LeaseExpired when it next moves the hold")
    elif h["kind"] == "dependency":
        means = "its dependent was dropped, so nothing needed it"
    elif h["kind"] == "process":
        means = "if that process is still running, its next heartbeat or read fails with LeaseExpired"
    else:
        means = "if that reader is still in use, its next heartbeat or read fails with LeaseExpired"
    print(f"{head}: {means}")
    return 0


def _name_collection(args: argparse.Namespace, shard: str, msg: str) -> str:
    """Prefix an error about `shard` with its collection's name, when the catalog can tell."""
    try:
        import storage
        from storage.controller import read_catalog

        client = storage.open(args.data, consensus=args.consensus)
        try:
            name = next((n for n, s in read_catalog(client).items() if s == shard), None)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - only words another error
        return msg
    return msg if name is None else f"collection {name!r}: {msg}"


def _inspect_one(client: Any, shard: str) -> dict[str, Any]:
    """`client.inspect(shard)`, with `rows` the live rows and `updates` the stored update records.

    `rows` counts the snapshot at the latest readable time (`upper - 1`), with
    multiplicity: what `SELECT count(*)` answers there. None when nothing is
    readable; then, or for an invalid collection, `rows_error` says why.
    `updates` is the number of `(row, time, diff)` records in the parts; it
    changes when compaction merges records, though the data does not.
    """
    import storage

    info = client.inspect(shard)
    info["updates"] = info.pop("rows")
    for b in info["batches"]:
        b["updates"] = b.pop("rows")
    info["rows"] = None
    up, since = info["upper"], info["since"]
    if info["tombstone"]:
        info["rows_error"] = "finalized"
    elif up is not None and (up == 0 or (since is not None and since >= up)):
        info["rows_error"] = "nothing readable yet"
    else:
        as_of = storage.MAX_TIME if up is None else up - 1
        try:
            with client.open_leased_reader(shard) as r:
                info["rows"] = r.count(as_of, timeout=0)
        except storage.errors.NegativeCount:
            info["rows_error"] = "invalid: a negative count"
        except storage.errors.CorruptPart:
            info["rows_error"] = "corrupt part: run fsck"
        except (storage.errors.NotYetReadable, storage.errors.ReadBeforeSince):
            info["rows_error"] = "nothing readable yet"
    return info


def _each(args: argparse.Namespace) -> tuple[Any, list[tuple[str, str]]]:
    client = _open(args)
    ctl = _controller(client)
    try:
        cat = _catalog(ctl)
        if args.__dict__.get("name"):
            _resolve(ctl, args.name)
            return client, [(args.name, cat[args.name])]
        return client, sorted(cat.items())
    finally:
        ctl.close()


def cmd_compact(args: argparse.Namespace) -> int:
    client, items = _each(args)
    if not args.full:
        for name, shard in items:
            before = len(client.state(shard).batches)
            client.compact(shard)
            print(f"{name}: {before} -> {len(client.state(shard).batches)} batches")
        return 0
    for i, (name, shard) in enumerate(items, 1):
        s = client.state(shard)
        rows, size = sum(b.rows for b in s.batches), sum(b.bytes for b in s.batches)
        # Progress on stderr (a full merge of a large collection takes a while); the result on stdout.
        print(f"[{i}/{len(items)}] {name}: merging {len(s.batches)} batches ({rows:,} updates, "
              f"{size / 1e6:.1f} MB) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        r = client.compact(shard, full=True)
        s = client.state(shard)
        note = "" if r.merges_lost == 0 else f"; a concurrent merge won {r.merges_lost}: run it again"
        print(f"{name}: {r.batches_before} -> {len(s.batches)} batches, {rows:,} -> {sum(b.rows for b in s.batches):,} "
              f"updates, {size / 1e6:.1f} -> {sum(b.bytes for b in s.batches) / 1e6:.1f} MB, since {s.since.time}, "
              f"{time.monotonic() - t0:.1f}s{note}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    client, items = _each(args)
    for name, shard in items:
        r = client.gc(shard)
        print(f"{name}: deleted {r.parts_deleted + r.orphans_deleted} parts ({r.bytes_deleted:,} bytes), "
              f"truncated {r.versions_truncated} state versions; {r.orphans_kept} recent orphans kept")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    """Check each collection on its own; print one line per collection; non-zero if any failed.

    SUBTLE: reads the catalog directly, not through a storage controller, so
    that a broken collection (a system.* one included) cannot stop the check of
    the others. Any error is that collection's result, never the command's.
    """
    import storage
    from storage.controller import read_catalog

    client = _open(args, reads=True)
    try:
        cat = read_catalog(client)
    except Exception as e:  # noqa: BLE001 - a broken catalog is fsck's finding, in one line
        print(f"catalog: FAILED {_one_line(_fsck_msg(e))}")
        return EXIT_ERROR
    items = sorted(cat.items())
    if args.__dict__.get("name"):
        name = _system_name(args.name)
        if name not in cat:
            known = ", ".join(sorted(cat)) or "none"
            raise storage.errors.IdentifierMissing(f"collection {args.name!r} does not exist (known: {known})")
        items = [(name, cat[name])]
    bad = 0
    for name, shard in items:
        try:
            storage.check_invariants(client.state(shard))
            report = client.verify(shard)
            if report.ok:
                # A negative count (a retraction with no insertion) at any readable time
                # makes the collection invalid there; every read would refuse it.
                with client.open_leased_reader(shard) as r:
                    r.validate()
        except storage.errors.ShardNotFound:
            print(f"{name}: ok (not written yet)")
            continue
        except Exception as e:  # noqa: BLE001 - report it as this collection's result and go on
            bad += 1
            print(f"{name}: FAILED {_one_line(_fsck_msg(e))}")
            continue
        if not report.ok:
            # verify() lists every problem instead of stopping at the first.
            bad += 1
            for problem in report.problems:
                print(f"{name}: FAILED {_one_line(str(problem))}")
            continue
        print(f"{name}: ok ({report.batches} batches, {report.parts_checked} parts, "
              f"{report.bytes_checked:,} bytes checked)")
    if bad:
        print(f"fsck: {bad} of {len(items)} collections FAILED", file=sys.stderr)
    return EXIT_ERROR if bad else 0


def _system_name(name: str) -> str:
    """`sys.x` (the DuckDB spelling) -> `system.x`."""
    return "system." + name[len("sys."):] if name.startswith("sys.") else name


def _fsck_msg(e: BaseException) -> str:
    import storage

    if isinstance(e, storage.errors.ShardflowError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, AssertionError):
        return f"invariant violated: {e}"
    return f"{type(e).__name__}: {e}"


_PANIC_HEAD = re.compile(rb"^thread '[^']*' panicked at ")
_PANIC_NOTE = b"note: run with `RUST_BACKTRACE"


@contextlib.contextmanager
def _no_rust_panic_text(debug: bool) -> Iterator[None]:
    """Drop the Rust panic text bytewax prints on stderr when a step raises.

    The error itself is reported in one line by `main`; the panic text
    (`thread '<unnamed>' panicked at src/operators.rs...`, `Box<dyn Any>`, `note:
    run with RUST_BACKTRACE...`) would only bury it. Everything else written to
    stderr passes through as it comes. With --debug nothing is filtered.
    """
    if debug:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        r, w = os.pipe()
    except OSError:
        yield
        return
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        buf, skipping, after = b"", 0, False
        while True:
            chunk = os.read(r, 65536)
            if chunk:
                buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            out = []
            for line in lines:
                if skipping:
                    skipping = 0 if line.startswith(_PANIC_NOTE) else skipping - 1
                    after = not skipping
                elif _PANIC_HEAD.match(line):
                    skipping = 6  # the payload (`Box<dyn Any>`) and the note follow
                elif after and not line.strip():
                    after = False  # the blank line that ends the panic text
                else:
                    after = False
                    out.append(line + b"\n")
            # A partial line is passed on at once (a progress line ends in \r), unless it may
            # be the start of a panic head.
            if buf and not skipping and (not chunk or not b"thread '".startswith(buf[:8])):
                out.append(buf)
                buf = b""
            if out:
                os.write(saved, b"".join(out))
            if not chunk:
                os.close(r)
                return

    t = threading.Thread(target=pump, name="shardflow-stderr", daemon=True)
    t.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes our end of the pipe; the pump drains what is left
        t.join(timeout=5)
        if not t.is_alive():
            os.close(saved)


def cmd_run(args: argparse.Namespace) -> int:
    from connectors.files import ALLOW_EMPTY_ENV

    # The file sources read it (also in the `-p N` children, which inherit the environment).
    before = os.environ.get(ALLOW_EMPTY_ENV)
    if args.allow_empty:
        os.environ[ALLOW_EMPTY_ENV] = "1"
    try:
        return _cmd_run(args)
    finally:
        if before is None:
            os.environ.pop(ALLOW_EMPTY_ENV, None)
        else:
            os.environ[ALLOW_EMPTY_ENV] = before


def _cmd_run(args: argparse.Namespace) -> int:
    import storage
    from flows.cluster import RunSpec, run_child

    if args.workers < 1:
        raise storage.errors.InvalidInput(f"--workers must be >= 1, got {args.workers}")
    if args.processes < 1:
        raise storage.errors.InvalidInput(f"--processes must be >= 1, got {args.processes}")
    if not os.path.isfile(args.flow):
        raise storage.errors.InvalidInput(f"flow file {args.flow!r} does not exist")
    spec = RunSpec(args.flow, args.data, args.mode, args.workers, args.tick, args.consensus, args.debug)
    if args.process_id is not None:
        # A child of a multi-process run (`flows.cluster` starts it).
        if not args.addresses:
            raise storage.errors.InvalidInput("--process-id needs --addresses")
        addresses = args.addresses.split(";")
        if not 0 <= args.process_id < len(addresses):
            raise storage.errors.InvalidInput(
                f"--process-id {args.process_id} is not in 0..{len(addresses) - 1}"
            )
        run_child(
            spec,
            _storage_open(args),
            process_id=args.process_id,
            addresses=addresses,
            summary_file=args.summary_file,
        )
        return 0
    summary = _run_spec(args, spec)
    if args.processes == 1:
        print(f"{args.mode} run of {args.flow}: {summary}")
    else:
        print(f"{args.mode} run of {args.flow} ({args.processes} processes x {args.workers} workers): {summary}")
    return 0


def _run_spec(args: argparse.Namespace, spec: Any) -> Any:
    """Run `spec` as `run` and `view` do: one process, or `-p N` local processes; the live
    progress line in continuous mode on a terminal. Returns the summary."""
    from flows.cluster import run_processes

    client = _storage_open(args)
    show = not args.no_progress and sys.stderr.isatty() and args.mode == "continuous"
    progress = _ProgressLine if show else None
    if args.processes == 1:
        with _no_rust_panic_text(args.debug):
            return spec.run(client, progress=progress)
    return run_processes(spec, client, processes=args.processes, progress=progress)


class _ProgressLine:
    """A live `rich` status line on stderr: rows, rows/s, frontier lag (for millisecond times).

    A `flows.job.ProgressHook`: the job enters it around the running flow and
    feeds `stats`; this only renders them.
    """

    def __init__(self, stats: JobStats):
        self.stats = stats
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def text(self) -> str:
        rows, batches, uppers, secs = self.stats.snapshot()
        rate = rows / secs if secs > 0 else 0.0
        now = int(time.time() * 1000)
        lags = []
        for name, up in sorted(uppers.items()):
            if up.time is not None and up.time > 10**12:  # epoch milliseconds: show the lag
                lags.append(f"{name} lag {max(0, now - up.time) / 1000:.1f}s")
            else:
                lags.append(f"{name} @ {up}")
        return f"{rows:,} rows  {rate:,.0f} rows/s  {batches} batches  " + ("  ".join(lags) or "")

    def __enter__(self) -> _ProgressLine:
        self._thread = threading.Thread(target=self._run, name="shardflow-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from rich.console import Console
        from rich.live import Live

        with Live(self.text(), console=Console(stderr=True), refresh_per_second=4, transient=True) as live:
            while not self._stop.wait(0.25):
                live.update(self.text())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


def _one_line(msg: str) -> str:
    """A multi-line message (bytewax's `... Caused by => ...`) as one line."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    causes = [ln for ln in lines if ln.startswith("Caused by =>")]
    last = causes[-1][len("Caused by =>") :].strip() if causes else lines[-1]
    return f"{lines[0]}: {last}"



def cmd_view(args: argparse.Namespace) -> int:
    import storage
    from flows.cluster import RunSpec

    if args.list:
        client = _open(args)
        ctl = _controller(client)
        try:
            views = {n: m for n, m in ctl.collections().items() if m.data_source == "view"}
        finally:
            ctl.close()
        if not views:
            print("no views")
        for n, m in views.items():
            print(f"{n}  (inputs: {', '.join(m.depends_on)})\n  {m.definition}")
        return 0
    if not args.name:
        raise UsageError("view: NAME is required (or --list)")
    if args.drop:
        client = _open(args)
        from storage.controller import StorageController

        # Joins the running jobs' epoch: dropping a view must not fence them.
        ctl = StorageController.open(client, fence=False, role="cli", tick_interval_ms=None)
        try:
            m = ctl.collection(args.name)
            if m.data_source != "view":
                raise UsageError(f"view --drop: {args.name!r} is a collection, not a view")
            ctl.drop_collections([args.name])
        finally:
            ctl.close()
        print(f"dropped view {args.name}")
        return 0
    if not args.sql:
        raise UsageError(f"view {args.name}: the SQL is required, e.g. shardflow view {args.name} \"SELECT ...\"")
    if args.workers < 1 or args.processes < 1:
        raise storage.errors.InvalidInput("--workers and --processes must be >= 1")
    os.environ["SHARDFLOW_VIEW_NAME"] = args.name
    os.environ["SHARDFLOW_VIEW_SQL"] = args.sql
    os.environ["SHARDFLOW_VIEW_REPLACE"] = "1" if args.replace else "0"
    flow = os.path.join(os.path.dirname(os.path.abspath(__file__)), "view_flow.py")
    spec = RunSpec(flow, args.data, args.mode, args.workers, args.tick, args.consensus, args.debug)
    summary = _run_spec(args, spec)
    print(f"{args.mode} view {args.name}: {summary}")
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    import signal

    from connectors.webhook import WebhookServer, webhook_schema
    from storage.controller import CollectionDesc, StorageController

    secret: str | None = None
    if args.secret_env is not None:
        secret = os.environ.get(args.secret_env)
        if secret is None:
            raise UsageError(f"webhook: --secret-env {args.secret_env}: the environment variable is not set")
        if not secret:
            raise UsageError(f"webhook: --secret-env {args.secret_env}: the secret is empty")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"webhook: --port {args.port} is not a TCP port (0..65535)")
    if args.batch_ms < 0:
        raise UsageError(f"webhook: --batch-ms must be >= 0, got {args.batch_ms}")
    client = _storage_open(args)
    # Joins the running jobs' epoch (fence=False): starting a webhook must not fence them.
    # SUBTLE: --batch-ms (default 5): commit what is queued (almost) as soon as the previous
    # commit is done (group commit). Every request waits for its commit, so with N clients the
    # rate is at most N per commit; a longer gathering only helps when commits cost CPU the
    # requests need (measured in bench/webhook.py: noisy, no clear winner between 0 and 30).
    stop = threading.Event()
    fenced: list[BaseException] = []

    def _fenced(e: BaseException) -> None:  # a real take-over: stop, rather than answer 500s
        fenced.append(e)
        stop.set()

    ctl = StorageController.open(
        client,
        fence=False,
        role=f"webhook:{args.name}",
        batch_duration_ms=args.batch_ms,
        on_fenced=_fenced,
    )
    try:
        ctl.create_collections(
            [CollectionDesc(args.name, webhook_schema(args.include_headers), data_source="webhook")]
        )
        srv = WebhookServer(
            args.host,
            args.port,
            on_batch=ctl.monotonic_appender(args.name),
            secret=secret,
            include_headers=args.include_headers,
            max_body=args.max_body,
            tolerance_s=args.tolerance,
            max_connections=args.max_connections,
        )
        def _stop(signum: int, frame: Any) -> None:
            stop.set()

        old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            srv.start()
            print(f"webhook {args.name}: listening on {srv.url}", flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            srv.stop()
            for sig, h in old.items():
                signal.signal(sig, h)
    finally:
        ctl.close()
    if fenced:
        raise fenced[0]
    print(f"webhook {args.name}: stopped; {srv.accepted} stored, {srv.duplicates} duplicates, {srv.rejected} rejected")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return int(run_demo(args.data, ticks=args.ticks, seed=args.seed, consensus=args.consensus) or 0)


COMMANDS = {
    "demo": cmd_demo,
    "run": cmd_run,
    "view": cmd_view,
    "query": cmd_query,
    "tail": cmd_tail,
    "inspect": cmd_inspect,
    "holds": cmd_holds,
    "compact": cmd_compact,
    "gc": cmd_gc,
    "fsck": cmd_fsck,
    "webhook": cmd_webhook,
}


def _close_clients() -> None:
    while _CLIENTS:
        try:
            _CLIENTS.pop().close()
        except Exception:  # noqa: BLE001 - closing is best effort; the command's outcome stands
            pass


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse, in one line, numbers argparse lets through: a negative --tick was a busy loop."""
    import math

    for flag, low, strict in (("tick", 0.0, True), ("timeout", 0.0, False), ("as_of", 0, False), ("ticks", 0, False)):
        v = getattr(args, flag, None)
        if v is None:
            continue
        bad = math.isnan(v) or v < low or (strict and (v == low or math.isinf(v)))
        if bad:
            want = f"> {low:g} and finite" if strict else f">= {low:g}"
            raise UsageError(f"--{flag.replace('_', '-')} must be {want}, got {v}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "debug", False):
        # bytewax is Rust: without --debug, no Rust backtraces on top of our one-line error.
        os.environ["RUST_BACKTRACE"] = "0"
    try:
        try:
            _check_numbers(args)
            return COMMANDS[args.command](args)
        finally:
            _close_clients()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `shardflow tail x | head`: the reader left. Not an error; keep Python quiet at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except (SystemExit, GeneratorExit):
        raise
    except UsageError as e:
        print(f"shardflow: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as e:  # noqa: BLE001 - the CLI turns every error into one line (bytewax's
        # PanicException, e.g. when a peer process dies, is a BaseException)
        if getattr(args, "debug", False):
            raise
        import duckdb

        import storage

        # bytewax wraps errors raised inside a flow (BytewaxRuntimeError); the cause is what matters.
        root: BaseException = e
        while root.__cause__ is not None and not isinstance(
            root, (storage.errors.ShardflowError, duckdb.Error)
        ):
            root = root.__cause__
        if isinstance(root, Exception):
            e = root
        e = storage.as_overflow(e) or e  # a count past int64 inside a query: say so as DiffOverflow does
        if isinstance(e, storage.errors.StateCorrupt) and e.shard is not None:
            msg = _name_collection(args, e.shard, str(e))
        elif isinstance(e, storage.errors.ShardflowError):
            msg = str(e)
        elif isinstance(e, duckdb.Error):
            msg = f"query: {str(e).splitlines()[0]}"
        elif isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = f"{type(e).__name__}: {e}"
        print(f"shardflow: error: {_one_line(msg)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""The `shardflow` command line.

    shardflow demo                      run the built-in auction demo into ./data and query it
    shardflow run FLOW.py               run a flow (batch or continuous)
    shardflow query "SQL"               query every collection with DuckDB
    shardflow tail NAME                 print updates as they commit (like SUBSCRIBE)
    shardflow inspect [NAME]            shards, since, upper, batches, sizes, lag
    shardflow compact|gc [NAME]         maintenance on demand
    shardflow fsck                      verify every part's sha256

Errors print one line and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2


def _data_default() -> str:
    return os.environ.get("SHARDFLOW_DATA", "./data")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=_data_default(), metavar="DIR",
                        help="data directory: consensus.sqlite and blob/ (default: %(default)s, or $SHARDFLOW_DATA)")
    common.add_argument("--consensus", default=os.environ.get("SHARDFLOW_CONSENSUS"), metavar="URL",
                        help="consensus URL, e.g. postgresql://user@127.0.0.1:5432/db (default: SQLite under --data)")
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    p = argparse.ArgumentParser(
        prog="shardflow",
        description="Incremental, exactly-once data pipelines: bytewax flows into Parquet shards, queried with DuckDB.",
        epilog="Run `shardflow COMMAND --help` for a command's options. Start with `shardflow demo`.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", parents=[common], help="run the auction demo flow into --data and print a query",
                       description="Generate auctions and bids (deterministic load generator), run them through a flow "
                       "with a SQL step into collections under --data, then print the top bids per auction.")
    d.add_argument("--ticks", type=int, default=200, help="load generator ticks to run (default: %(default)s)")
    d.add_argument("--seed", type=int, default=1, help="load generator seed (default: %(default)s)")

    r = sub.add_parser("run", parents=[common], help="run a flow file",
                       description="Run a flow defined in a Python file (see examples/). Batch mode exits when the "
                       "sources are exhausted; continuous mode runs until SIGINT/SIGTERM, then flushes and exits 0.")
    r.add_argument("flow", metavar="FLOW.py", help="a Python file that defines the flow")
    r.add_argument("--mode", choices=["batch", "continuous"], default="batch", help="default: %(default)s")
    r.add_argument("-w", "--workers", type=int, default=1, help="bytewax worker threads per process (default: 1)")
    r.add_argument("--tick", type=float, default=1.0, metavar="SECONDS",
                   help="continuous mode: tick idle uppers forward this often (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true", help="no live progress line")

    q = sub.add_parser("query", parents=[common], help="run SQL over every collection",
                       description="Every collection under --data is a view of its snapshot; introspection "
                       "collections are in schema sys. The table function changes(name, from, to) returns raw "
                       "updates with from < _time <= to.")
    q.add_argument("sql", help="a DuckDB SQL query")
    q.add_argument("--as-of", type=int, default=None, metavar="T", help="read at time T (default: latest readable)")
    q.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table", help="default: %(default)s")
    q.add_argument("-o", "--output", metavar="FILE", help="write to FILE (required for parquet)")

    t = sub.add_parser("tail", parents=[common], help="print a collection's updates as they commit",
                       description="Print the snapshot at --as-of (default: latest) as updates, then every update "
                       "as it commits, like Materialize's SUBSCRIBE. Stops on Ctrl-C or after --timeout idle seconds.")
    t.add_argument("name", help="collection name")
    t.add_argument("--as-of", type=int, default=None, metavar="T")
    t.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop after this long with no progress")
    t.add_argument("--no-snapshot", action="store_true", help="only updates after --as-of")

    i = sub.add_parser("inspect", parents=[common], help="show collections: shard, since, upper, batches, sizes, lag")
    i.add_argument("name", nargs="?", help="one collection (default: all)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--system", action="store_true", help="include the introspection collections (system.*)")

    c = sub.add_parser("compact", parents=[common], help="compact collections now")
    c.add_argument("name", nargs="?", help="one collection (default: all)")
    g = sub.add_parser("gc", parents=[common], help="delete unreferenced parts and old state versions")
    g.add_argument("name", nargs="?", help="one collection (default: all)")
    sub.add_parser("fsck", parents=[common], help="verify every part's sha256 and every shard's invariants")
    return p


# ---------------------------------------------------------------- helpers


def _open(args: argparse.Namespace, *, create: bool = False) -> Any:
    import storage

    if not create and not os.path.exists(os.path.join(args.data, "consensus.sqlite")) and not args.consensus:
        raise storage.InvalidInput(f"--data {args.data}: no shardflow data here (run a flow first, e.g. `shardflow demo`)")
    return storage.open(args.data, consensus=args.consensus)


def _controller(client: Any, read_only: bool = True) -> Any:
    from storage.controller import StorageController

    return StorageController.open(client, read_only=read_only)


def _catalog(ctl: Any) -> dict[str, str]:
    """Every queryable name -> shard id, introspection included."""
    names = {name: meta.shard_id for name, meta in ctl.collections().items()}
    intro = getattr(ctl, "introspection_shards", None)
    if intro is not None:
        names.update(intro())
    return names


def _resolve(ctl: Any, name: str) -> str:
    cat = _catalog(ctl)
    if name not in cat:
        import storage

        known = ", ".join(sorted(cat)) or "none"
        raise storage.IdentifierMissing(f"collection {name!r} does not exist (known: {known})")
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
        alias = "sys." + name[len("system."):] if name.startswith("system.") else name
        if name in words or alias in words:
            out[name] = shard
    return out


def _print_table(table: Any, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for name in table.schema.names:
        t.add_column(name, overflow="fold")
    for row in table.to_pylist():  # display only: bounded by the caller's LIMIT
        t.add_row(*["NULL" if v is None else str(v) for v in row.values()])
    Console().print(t)


def _emit(table: Any, fmt: str, output: str | None) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if not output:
            import storage

            raise storage.InvalidInput("--format parquet needs --output FILE")
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


def cmd_query(args: argparse.Namespace) -> int:
    import storage

    client = _open(args)
    ctl = _controller(client)
    try:
        cat = _referenced(_catalog(ctl), args.sql)
        with storage.query.connect(client, cat, as_of=args.as_of) as con:
            table = con.sql(args.sql).to_arrow_table() if args.sql.strip() else None
            if table is None:
                raise storage.InvalidInput("query: empty SQL")
            _emit(table, args.format, args.output)
    finally:
        ctl.close()
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    import storage
    from storage.updates import DIFF, TIME

    client = _open(args)
    ctl = _controller(client)
    try:
        shard = _resolve(ctl, args.name)
    finally:
        ctl.close()
    with client.open_leased_reader(shard) as r:
        as_of = args.as_of
        if as_of is None:
            up = client.state(shard).upper
            as_of = max((up.time or 1) - 1, 0) if not up.is_empty else storage.frontier.MAX_TIME
        events = r.listen(as_of, timeout=args.timeout) if args.no_snapshot else r.subscribe(as_of, timeout=args.timeout)
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
    client = _open(args)
    ctl = _controller(client)
    try:
        cat = _catalog(ctl)
        names = [args.name] if args.name else sorted(n for n in cat if args.system or not n.startswith("system."))
        if args.name:
            _resolve(ctl, args.name)
        infos = {n: client.inspect(cat[n]) for n in names}
    finally:
        ctl.close()
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    import storage

    t = Table(title=f"collections in {args.data}")
    for col in ("collection", "shard", "since", "upper", "lag", "batches", "rows", "bytes"):
        t.add_column(col, justify="right" if col in ("since", "upper", "batches", "rows", "bytes") else "left")
    for n, info in infos.items():
        up = storage.Frontier(info["upper"])
        t.add_row(n, info["shard_id"][:9] + "…", str(info["since"]), str(info["upper"]), _lag_ms(up),
                  str(len(info["batches"])), f"{info['rows']:,}", f"{info['bytes']:,}")
    Console().print(t)
    if args.name:
        bt = Table(title=f"batches of {args.name}")
        for col in ("lower", "upper", "since", "parts", "rows", "bytes"):
            bt.add_column(col, justify="right")
        for b in infos[args.name]["batches"]:
            bt.add_row(*[str(b[k]) for k in ("lower", "upper", "since", "parts", "rows", "bytes")])
        Console().print(bt)
    return 0


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
    for name, shard in items:
        before = len(client.state(shard).batches)
        client.compact(shard)
        print(f"{name}: {before} -> {len(client.state(shard).batches)} batches")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    client, items = _each(args)
    for name, shard in items:
        report = client.gc(shard)
        print(f"{name}: {report}")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    import storage
    from storage.state import check_invariants

    client, items = _each(args)
    bad = 0
    for name, shard in items:
        try:
            check_invariants(client.state(shard))
            report = client.verify(shard)
            print(f"{name}: ok {report}")
        except (storage.ShardflowError, AssertionError) as e:
            bad += 1
            print(f"{name}: FAILED {e}")
    return EXIT_ERROR if bad else 0


def cmd_run(args: argparse.Namespace) -> int:
    import storage
    from flows.job import run_flow

    if args.workers < 1:
        raise storage.InvalidInput(f"--workers must be >= 1, got {args.workers}")
    client = storage.open(args.data, consensus=args.consensus)
    summary = run_flow(args.flow, args.data, mode=args.mode, workers=args.workers, tick=args.tick,
                       progress=not args.no_progress and sys.stderr.isatty(), client=client)
    print(f"{args.mode} run of {args.flow}: {summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return int(run_demo(args.data, ticks=args.ticks, seed=args.seed, consensus=args.consensus) or 0)


COMMANDS = {
    "demo": cmd_demo,
    "run": cmd_run,
    "query": cmd_query,
    "tail": cmd_tail,
    "inspect": cmd_inspect,
    "compact": cmd_compact,
    "gc": cmd_gc,
    "fsck": cmd_fsck,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "debug", False):
        # bytewax is Rust: without --debug, no Rust backtraces on top of our one-line error.
        os.environ["RUST_BACKTRACE"] = "0"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every error into one line
        if getattr(args, "debug", False):
            raise
        import duckdb

        import storage

        # bytewax wraps errors raised inside a flow (BytewaxRuntimeError); the cause is what matters.
        root: BaseException = e
        while root.__cause__ is not None and not isinstance(root, (storage.ShardflowError, duckdb.Error)):
            root = root.__cause__
        if isinstance(root, Exception):
            e = root
        if isinstance(e, storage.ShardflowError):
            msg = str(e)
        elif isinstance(e, duckdb.Error):
            msg = f"query: {str(e).splitlines()[0]}"
        elif isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = f"{type(e).__name__}: {e}"
        print(f"shardflow: error: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

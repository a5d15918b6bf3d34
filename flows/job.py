"""Running flows: load a flow file, resume from committed offsets, run batch or continuous.

A flow file is a Python file that defines

    def build(ctx: flows.job.FlowContext) -> bytewax.dataflow.Dataflow

(or, for flows that need nothing from shardflow, a module-level `flow`
Dataflow). `ctx` gives the storage client and controller, the run mode, the
tick, and helpers that name collections through the storage controller and
wire sinks with the right resume point:

    def build(ctx):
        flow = Dataflow("counter")
        shard = ctx.collection("counts", SCHEMA)            # via the controller
        offsets = ctx.resume_offsets("counts")               # partition key -> offset
        src = op.input("in", flow, MySource(resume=offsets, continuous=ctx.continuous))
        ctx.persist("sink", consolidate("cons", src), "counts")
        return flow

`run_flow(path, data_dir, mode=...)` then runs it (bytewax `cli_main`, `-w` workers)
and returns a `Summary`. In continuous mode SIGINT/SIGTERM set
`connectors.base.STOP`; sources emit a final Progress and end, so the sinks
flush (their `on_eof` runs) and the run returns normally. A second signal
aborts at once.

Exactly-once: a sink commits its input's source offsets in the same CAS as the
data (`flows.sinks.OFFSETS_KEY`), with the upper of that append
(`OFFSETS_UPPER_KEY`). `ctx.resume_offsets(name)` reads them back for the
source, and `ctx.persist` passes that upper to `persist_sink` as `as_of`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow, Stream

import storage
from connectors import base as sources
from storage import Client, Frontier
from storage.controller import CollectionDesc, StorageController
from storage.errors import InvalidInput

from .sinks import Committed, append_sink, committed_offsets, persist_sink, resume_point

__all__ = ["FlowContext", "JobStats", "ProgressHook", "Summary", "load_flow", "open_controller", "run", "run_flow"]

Mode = Literal["batch", "continuous"]

log = logging.getLogger("flows.job")

#: Rows per chunk when a resumed view rebuilds its arrangements from its inputs' snapshots.
PRELOAD_ROWS = 1_000_000
#: DuckDB's memory limit for a view's arrangements (`$SHARDFLOW_VIEW_MEMORY`; past it DuckDB spills
#: to the arrangements' file): a view over a 10M-row input stays under 1 GiB RSS.
VIEW_MEMORY_LIMIT = os.environ.get("SHARDFLOW_VIEW_MEMORY", "256MB")


#: A batch job's sinks append at most once per this many seconds (`$SHARDFLOW_BATCH_COMMIT_EVERY`;
#: 0: at every frontier), and at the end: fewer, larger batches, so less consensus traffic and
#: compaction; a crash redoes at most this much. Continuous jobs append at every frontier.
BATCH_COMMIT_EVERY = float(os.environ.get("SHARDFLOW_BATCH_COMMIT_EVERY", "5"))


def open_controller(client: Client, *, read_only: bool = False, role: str = "job") -> StorageController:
    """The storage controller for `client` (no background thread: the job drives nothing).

    `role` names this process's read holds (`shardflow inspect` lists them), e.g. `job:orders`.
    """
    # SUBTLE: fence=False joins the current epoch: a second job (or a webhook server) on
    # the same data must not fence this one's controller, nor this one theirs. No retry
    # without it: an error opening the controller is the job's error, never a reason to
    # take over (fence) every other job's controller.
    return StorageController.open(client, read_only=read_only, tick_interval_ms=None, fence=False, role=role)


# --------------------------------------------------------------------------------------------
# stats and summary
# --------------------------------------------------------------------------------------------


@dataclass
class JobStats:
    """Counters fed by the sinks' `Committed` streams (thread-safe; workers are threads)."""

    started: float = field(default_factory=time.monotonic)
    rows: int = 0
    batches: int = 0
    uppers: dict[str, Frontier] = field(default_factory=dict)
    commit_lag_ms: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_commit(self, name: str, c: Committed) -> None:
        with self._lock:
            self.rows += c.rows
            self.batches += 1 if c.rows else 0
            self.uppers[name] = c.upper

    def snapshot(self) -> tuple[int, int, dict[str, Frontier], float]:
        with self._lock:
            return self.rows, self.batches, dict(self.uppers), time.monotonic() - self.started


@dataclass(frozen=True)
class Summary:
    """What a run did: rows and non-empty batches committed, wall seconds, each collection's upper."""

    rows: int
    batches: int
    seconds: float
    frontiers: Mapping[str, Frontier]

    def __str__(self) -> str:
        fr = ", ".join(f"{n}={f}" for n, f in sorted(self.frontiers.items())) or "-"
        return f"{self.rows} rows in {self.batches} batches, {self.seconds:.2f}s; frontier {fr}"


# --------------------------------------------------------------------------------------------
# the context a flow file builds against
# --------------------------------------------------------------------------------------------


@dataclass
class FlowContext:
    """What `build(ctx)` gets.

    Attributes:
        client: the storage client (`storage.open(data_dir)`).
        controller: the storage controller; collections are named through it.
        mode: "batch" (finite sources; end with Progress(last + 1) then EOF) or
            "continuous" (run until `connectors.base.STOP`).
        tick: seconds between idle progress ticks in continuous mode.
        workers: bytewax workers per process.
        processes: processes of the run (`-p`); the dataflow has `workers * processes` workers.
        stats: counters the sinks wired by `persist`/`append` update.
        process_id: this process in a multi-process run (0 when single-process).
            Only process 0 writes through the controller: it creates the
            collections, records read policies and sink statuses, and compacts.
            Every other process opens the controller read-only, so the copies do
            not fence each other; there `collection()` only looks a collection up
            (process 0 must have created it) and `set_read_policy` changes only
            that process' view.
    """

    client: Client
    controller: StorageController
    mode: Mode = "batch"
    tick: float = 1.0
    workers: int = 1
    stats: JobStats = field(default_factory=JobStats)
    shards: dict[str, str] = field(default_factory=dict)
    process_id: int = 0
    processes: int = 1
    #: collection -> the committed offsets `resume_offsets` handed to a source (append_sink's CAS expects them).
    resumed: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: since holds `persist` takes before it reads a resume point (expired when the run ends).
    holds: list[Any] = field(default_factory=list)
    #: collection -> the `Committed` stream of the sink `persist` wired into it in this flow
    #: (`view` follows it instead of reading the collection with a `ShardSource`).
    committed: dict[str, Stream[Committed]] = field(default_factory=dict)
    #: the collections this flow writes (`collection`, `persist`, `append`, `view`): the ones
    #: its housekeeper compacts. `shards` also holds the ones it only reads.
    written: set[str] = field(default_factory=set)

    def written_shards(self) -> list[str]:
        return [sh for n, sh in self.shards.items() if n in self.written]

    @property
    def continuous(self) -> bool:
        return self.mode == "continuous"

    def collection(
        self, name: str, schema: pa.Schema, *, data_source: str = "ingestion", inputs: tuple[str, ...] = ()
    ) -> str:
        """Create (or look up: an identical re-create is a no-op) collection `name`; return its shard id.

        `inputs`: the collections this flow reads to compute `name` (e.g. with a
        `ShardSource`). Each is then held, durably, at `name`'s since: a rerun
        resumes exactly however far the inputs moved on (and were compacted)
        in between. An existing collection gets these inputs recorded.
        """
        inputs = tuple(inputs)
        try:
            meta = self._existing(name)
            if meta is None:
                self.controller.create_collections(
                    [CollectionDesc(name, schema, data_source=data_source, depends_on=inputs)]
                )
            else:
                # Checks the schema and data source; a change of inputs is recorded below.
                self.controller.create_collections(
                    [CollectionDesc(name, schema, data_source=data_source, depends_on=meta.depends_on)]
                )
                if meta.depends_on != inputs and inputs:
                    self.controller.set_dependencies(name, inputs)
        except storage.errors.ReadOnly as e:
            raise InvalidInput(
                f"collection {name!r} does not exist yet and process {self.process_id} does not create "
                "collections (process 0 does; start it first)"
            ) from e
        self.shards[name] = str(self.controller.collection(name).shard_id)
        self.written.add(name)
        return self.shards[name]

    def _existing(self, name: str) -> Any:
        try:
            return self.controller.collection(name)
        except storage.errors.IdentifierMissing:
            return None

    def shard(self, name: str) -> str:
        """The shard id of collection `name` (looked up once through the controller, then cached).

        SUBTLE: the controller is asked only while the flow is built: another
        writable controller (a second copy of this job) fences this one, and the
        sinks write their shards directly, so a fenced controller must not stop them.
        """
        if name not in self.shards:
            self.shards[name] = str(self.controller.collection(name).shard_id)
        return self.shards[name]

    def resume_offsets(self, *names: str) -> dict[str, Any]:
        """The source offsets committed in the named collections (merged; partition key -> offset).

        A source feeding several collections should be resumed from one of them:
        offsets of different sinks are not merged by any order here.
        """
        out: dict[str, Any] = {}
        for n in names:
            # Offsets regardless of a resume upper: append-only collections record none.
            self.resumed[n] = committed_offsets(self.client.state(self.shard(n)))
            out.update(self.resumed[n])
        return out

    def resume_as_of(self, name: str) -> int | None:
        """The `as_of` for `persist_sink` into `name`: the upper its offsets were committed at."""
        return resume_point(self.client.state(self.shard(name)))[1]

    def upper(self, name: str) -> Frontier:
        """Collection `name`'s upper now: a `resume_upper` that keeps a source's new times past
        everything committed (a partitioned `FileSource` needs one to resume)."""
        return self.client.state(self.shard(name)).upper

    def persist(self, step_id: str, up: Stream[Any], name: str, *, schema: pa.Schema | None = None) -> Stream[Committed]:
        """`persist_sink` into collection `name`, resuming at its committed offsets; counted in `stats`."""
        shard = self.collection(name, schema) if schema is not None else self.shard(name)
        self.written.add(name)
        # SUBTLE: hold since *before* reading the resume point: otherwise another copy's read
        # policy can move since past it in between, and the sink can never correct from it.
        # The committer takes over with its own heartbeated reader and expires this one; in
        # a process without the committer it lasts until the run ends (or its lease runs out).
        hold = self.client.open_leased_reader(shard, heartbeat=False)
        self.holds.append(hold)
        every = None if self.continuous else BATCH_COMMIT_EVERY
        out = persist_sink(step_id, up, self.client, shard, as_of=self.resume_as_of(name), hold=hold, commit_every=every)
        return self._persisted(step_id, name, out)

    def _persisted(self, step_id: str, name: str, out: Stream[Committed]) -> Stream[Committed]:
        op.inspect(f"{step_id}_stats", out, lambda _s, c: self.stats.on_commit(name, c))
        self.committed.setdefault(name, out)
        return out

    def persist_split(
        self, step_id: str, data: Stream[Any], errors: Stream[Any], name: str, *, errors_name: str | None = None
    ) -> Stream[Committed]:
        """`persist` a source's data into `name` and its bad records into `errors_name` (`<name>_errors`).

        `data`/`errors` are the two outputs of `split_errors` (consolidated or not);
        the source resumes from `ctx.resume_offsets(name)`. Returns the data sink's
        `Committed` stream; the errors sink's step is `<step_id>_errors`.

        SUBTLE: two sinks, two commits; a crash between them must lose nothing. The
        errors sink commits each frontier first, and the data sink commits only up
        to the errors collection's upper (`persist_sink(after=)`), so the errors are
        never behind the data offsets the source resumes from. They may be ahead:
        the rerun re-reads those records, and the errors sink, started at the data's
        resume point (`hold_with=`), corrects its collection to them (the copy
        already in cancels out) whatever times the source gives them this time.
        """
        errors_name = errors_name or f"{name}_errors"
        shard, eshard = self.shard(name), self.shard(errors_name)
        self.written.update((name, errors_name))
        # Holds before the resume points are read (see `persist`).
        holds = [self.client.open_leased_reader(sh, heartbeat=False) for sh in (shard, eshard)]
        self.holds.extend(holds)
        as_of, eas_of = self.resume_as_of(name), self.resume_as_of(errors_name)
        # No data resume point: the source reads from the start, so the errors sink corrects everything.
        eas_of = None if as_of is None or eas_of is None else min(as_of, eas_of)
        estep = f"{step_id}_errors"
        every = None if self.continuous else BATCH_COMMIT_EVERY
        eout = persist_sink(
            estep, errors, self.client, eshard, as_of=eas_of, hold=holds[1], commit_every=every, hold_with=shard
        )
        self._persisted(estep, errors_name, eout)
        out = persist_sink(
            step_id, data, self.client, shard, as_of=as_of, hold=holds[0], commit_every=every, after=eout,
            after_shard=eshard,
        )
        return self._persisted(step_id, name, out)

    def view(self, flow: Dataflow, name: str, sql: str, *, replace: bool = False) -> Stream[Committed]:
        """Maintain collection `name` as the incremental view `sql` over other collections.

        Adds to `flow` a `ShardSource` per input collection, the view operator
        (`flows.views.view`) and a `persist_sink` into `name`. The definition is
        stored in the catalog; running `name` again with other SQL is refused
        unless `replace` (which drops and rebuilds it). The view holds its
        inputs durably at its since, so a rerun resumes exactly where it
        stopped: its arrangements are rebuilt from the inputs' snapshots at its
        committed frontier, and only what came after is processed.

        In batch mode the view catches up to the inputs' uppers at start; in
        continuous mode it follows them until stopped.

        An input this same flow writes with `persist` (called before `view`) is
        read from that sink's `Committed` stream instead (`flows.follow`): the
        view sees exactly what became durable, in order, as it commits, and in
        batch mode everything the flow ingested, not only what was there at
        start. On a rerun it first reads the input's updates from its own
        committed frontier to the input's upper (what a crash left between
        them), then follows the live commits.
        """
        from connectors.shard import ShardSource

        from . import views as views_mod
        from .sqlplan import plan_view

        metas = self.controller.collections()
        existing = metas.get(name)
        if existing is not None and existing.definition != sql:
            if existing.definition is None:
                raise InvalidInput(f"collection {name!r} exists and is not a view; choose another name")
            if not replace:
                raise InvalidInput(
                    f"view {name!r} exists with another definition ({existing.definition!r}); "
                    "use --replace (replace=True) to drop and rebuild it"
                )
            self.controller.drop_collections([name])
            self.shards.pop(name, None)
            metas.pop(name)
        schemas = {n: m.schema for n, m in metas.items() if n != name}
        plan = plan_view(sql, schemas)
        out_schema = views_mod.output_schema(plan, {n: schemas[n] for n in plan.inputs})
        try:
            self.controller.create_collections([CollectionDesc(
                name, out_schema, data_source="view", depends_on=plan.inputs, definition=sql
            )])
        except storage.errors.ReadOnly as e:
            raise InvalidInput(f"view {name!r} does not exist yet and process {self.process_id} does not create it") from e
        self.shards[name] = str(self.controller.collection(name).shard_id)
        resumed = self.resume_offsets(name)
        ins = {n: self.shard(n) for n in plan.inputs}
        same_flow = {n for n in plan.inputs if n in self.committed}
        in_schemas = {n: schemas[n] for n in plan.inputs}
        preload = None
        start: int | None = None  # the inputs' resume frontier
        as_of: int | None = None
        fresh = True
        if resumed:
            fresh = False
            start = min(int(resumed.get(f"{n}/0", 0)) for n in plan.inputs)
            # SUBTLE: with several partitions the offsets (partition 0's) can be ahead of the
            # committed upper (another partition behind): resume no later than that upper,
            # below which the view's shard is complete. (The sink drops what it already has.)
            committed = self.resume_as_of(name)
            if committed is not None:
                start = min(start, committed)
            if start < 1:
                raise InvalidInput(f"view {name!r}: its committed offsets {resumed} do not cover every input {list(plan.inputs)}")
        else:
            states = [self.client.state(s) for s in ins.values()]
            low = min(s.upper.time for s in states if s.upper.time is not None) if states else 0
            as_of = max([max(low - 1, 0), *(s.since.time or 0 for s in states)])
            # An input this flow writes is read as it commits: it may well be empty now.
            unreadable = [n for n, s in zip(ins, states, strict=True) if s.upper.time is not None and s.upper.time <= as_of]
            empty = [n for n in unreadable if n not in same_flow]
            if self.mode == "batch" and empty:
                raise InvalidInput(
                    f"view {name!r}: input(s) {empty} have nothing readable at time {as_of} yet (upper "
                    f"{[str(self.client.state(ins[n]).upper) for n in empty]}); write to them first, or run "
                    "the view in continuous mode"
                )
            if not unreadable:
                # Every input is readable at as_of: start like a resumed view (its arrangements
                # loaded from the snapshots at as_of, in chunks), and emit the SQL over them at
                # as_of as the view's first contents. The inputs then go on from as_of + 1.
                start = as_of + 1
        if start is not None:
            def preload(engine: Any, start: int = start) -> None:
                # In chunks of PRELOAD_ROWS: the snapshot of a 10M-row input is never one
                # Arrow table in this process (`load` adds: chunks sum to the snapshot).
                for n, shard in ins.items():
                    with self.client.open_leased_reader(shard, heartbeat=False) as r, \
                            r.snapshot_reader(start - 1, batch_size=PRELOAD_ROWS) as chunks:
                        for b in chunks:
                            engine.load(n, pa.Table.from_batches([b]), start - 1)
                if not fresh:
                    # What the view holds there: the engine retracts exactly that (its SQL may
                    # not be a function of its input: a DOUBLE sum, a tie in ORDER BY).
                    with self.client.open_leased_reader(self.shards[name], heartbeat=False) as r, \
                            r.snapshot_reader(start - 1, batch_size=PRELOAD_ROWS) as chunks:
                        for b in chunks:
                            engine.load_output(pa.Table.from_batches([b]))
        resume = {f"{n}/0": start for n in plan.inputs} if start is not None else {}
        from .follow import follow_committed

        # A new view over one input this batch run writes starts where that input ends up:
        # the follower takes its snapshot at the input's upper - 1 when the run's appends
        # are done (as a new view over an existing input starts at its latest time), so the
        # view evaluates once, not once per time the run appended.
        follow_as_of = None if (
            fresh and start is None and self.mode == "batch" and list(plan.inputs) == list(same_flow)
            and len(plan.inputs) == 1
        ) else as_of

        streams = {
            n: follow_committed(
                f"{name}_follow_{n}", self.committed[n], self.client, shard, name=n, as_of=follow_as_of, resume=start,
                at_end=self.mode == "batch",
            ) if n in same_flow else op.input(f"{name}_in_{n}", flow, ShardSource(
                self.client, shard, as_of=as_of, mode=self.mode, name=n, resume=resume
            ))
            for n, shard in ins.items()
        }
        corrections = views_mod.view(
            f"{name}_view", streams, plan, schemas=in_schemas, preload=preload,
            start=as_of if fresh and start is not None else start, fresh=fresh, memory_limit=VIEW_MEMORY_LIMIT,
            offsets=resume if fresh else None, partitions=self.workers * self.processes,
        )
        return self.persist(f"{name}_sink", corrections, name)

    def append(
        self, step_id: str, up: Stream[Any], name: str, *, schema: pa.Schema | None = None, batch_duration: float = 1.0
    ) -> Stream[Committed]:
        """`append_sink` into collection `name`; counted in `stats`."""
        shard = self.collection(name, schema) if schema is not None else self.shard(name)
        self.written.add(name)
        out = append_sink(
            step_id, up, self.client, shard, batch_duration=batch_duration, resume_offsets=self.resumed.get(name)
        )
        op.inspect(f"{step_id}_stats", out, lambda _s, c: self.stats.on_commit(name, c))
        return out


def load_flow(path: str | os.PathLike[str], ctx: FlowContext) -> Dataflow:
    """Import the flow file at `path` and return its Dataflow (`build(ctx)` or `flow`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidInput(f"flow file {path!r} does not exist")
    mod_name = "shardflow_flow_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    # A path not ending in .py has no loader (it used to end in a bare AssertionError).
    spec = importlib.util.spec_from_file_location(mod_name, path) if path.endswith(".py") else None
    if spec is None or spec.loader is None:
        raise InvalidInput(f"flow file {path!r} is not a Python file: a flow is a .py file that defines build(ctx)")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise InvalidInput(f"flow file {path!r} line {e.lineno}: {e.msg}: not a valid Python flow") from None
    if callable(getattr(mod, "build", None)):
        flow = mod.build(ctx)
    elif isinstance(getattr(mod, "flow", None), Dataflow):
        flow = mod.flow
    else:
        raise InvalidInput(f"flow file {path!r} defines neither `build(ctx) -> Dataflow` nor a `flow` Dataflow")
    if not isinstance(flow, Dataflow):
        raise InvalidInput(f"flow file {path!r}: build(ctx) returned {type(flow).__name__}, not a bytewax Dataflow")
    return flow


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


#: Shows a run's progress: called with the job's `JobStats` when the flow starts running,
#: entered for as long as it runs (the CLI's live progress line is one).
ProgressHook = Callable[["JobStats"], AbstractContextManager[object]]


class _Signals:
    """SIGINT/SIGTERM -> `connectors.base.request_stop()`; a second signal aborts."""

    def __init__(self) -> None:
        self.old: dict[int, Any] = {}
        self.count = 0

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        sources.request_stop()

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def run(
    flow: Dataflow,
    ctx: FlowContext,
    *,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    progress: ProgressHook | None = None,
    handle_signals: bool = True,
) -> Summary:
    """Run an already built flow with bytewax's `cli_main` and return its summary.

    Batch mode returns when every source ended. Continuous mode runs until
    SIGINT/SIGTERM (or `connectors.base.request_stop()`), then flushes and returns.
    With `handle_signals=False` the caller installed the handlers (and cleared
    `connectors.base.STOP`) itself, e.g. before building the flow. `progress`, if
    given, is entered around the running flow with `ctx.stats` (the CLI's progress line).
    """
    from bytewax.run import cli_main

    if handle_signals:
        sources.reset_stop()
    ctx.stats.started = time.monotonic()
    sig = _Signals() if handle_signals else contextlib.nullcontext()
    shown = progress(ctx.stats) if progress is not None else contextlib.nullcontext()
    with sig, shown:
        cli_main(
            flow,
            workers_per_process=ctx.workers,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=timedelta(seconds=10),
        )
    rows, batches, uppers, secs = ctx.stats.snapshot()
    return Summary(rows, batches, secs, uppers)


def run_flow(
    path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    mode: Mode = "batch",
    workers: int = 1,
    tick: float = 1.0,
    progress: ProgressHook | None = None,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    client: Client | None = None,
    configure: Callable[[FlowContext], None] | None = None,
    on_built: Callable[[FlowContext], None] | None = None,
) -> Summary:
    """Load the flow file at `path` against the shards under `data_dir` and run it.

    Args:
        path: a flow file (`build(ctx)` or `flow`).
        data_dir: the storage root (`storage.open(data_dir)`), unless `client` is given.
        mode: "batch" or "continuous".
        workers: bytewax workers per process (`-w`).
        tick: idle progress interval for continuous sources, seconds.
        progress: entered around the running flow with the job's `JobStats`, which
            the sinks keep counting (the CLI renders its progress line with it).
        process_id, addresses: bytewax multi-process settings (`-i`, `-a`). A
            process other than 0 opens the controller read-only and does not
            compact (see `FlowContext.process_id`), so process 0 must have built
            the flow (created its collections) before the others build it.
        configure: called with the context before `build` (tests, CLI options).
        on_built: called with the context after `build`, just before the flow runs
            (the CLI starts the other processes of a multi-process run there).

    Returns:
        The `Summary` (rows, batches, seconds, frontier per collection).
    """
    if mode not in ("batch", "continuous"):
        raise InvalidInput(f"mode must be 'batch' or 'continuous', got {mode!r}")
    if workers < 1:
        raise InvalidInput(f"workers must be >= 1, got {workers}")
    owned = client is None
    client = client or storage.open(data_dir)
    try:
        # Signals first: a SIGTERM while the flow is being built still stops it cleanly.
        sources.reset_stop()
        with _Signals():
            return _run_flow(path, client, mode, workers, tick, progress, process_id, addresses, configure, on_built)
    finally:
        # A client given by the caller stays open: theirs to close (or the exit hook's).
        if owned:
            client.close()


def _run_flow(
    path: str | os.PathLike[str],
    client: Client,
    mode: Mode,
    workers: int,
    tick: float,
    progress: ProgressHook | None,
    process_id: int | None,
    addresses: list[str] | None,
    configure: Callable[[FlowContext], None] | None,
    on_built: Callable[[FlowContext], None] | None = None,
) -> Summary:
    primary = not process_id  # None or 0
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    role = "job:" + (re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:90] or "flow")
    ctl = open_controller(client, read_only=not primary, role=role)
    ctx = FlowContext(
        client, ctl, mode, tick, workers, process_id=process_id or 0, processes=len(addresses) if addresses else 1
    )
    housekeeper = _Housekeeper(ctx, interval=tick if mode == "continuous" else None, primary=primary)
    try:
        if configure is not None:
            configure(ctx)
        flow = load_flow(path, ctx)
        if on_built is not None:
            on_built(ctx)
        housekeeper.report("running")
        with housekeeper:
            summary = run(flow, ctx, process_id=process_id, addresses=addresses, progress=progress, handle_signals=False)
        housekeeper.report("completed" if mode == "batch" else "stopped")
        # Report every collection's final upper, not only those that committed in this run.
        fr = dict(summary.frontiers)
        for name in set(fr) | set(ctx.shards):
            fr[name] = client.state(ctx.shard(name)).upper
        return Summary(summary.rows, summary.batches, summary.seconds, fr)
    except BaseException as e:
        housekeeper.report("failed", _root_message(e))
        raise
    finally:
        for h in ctx.holds:
            try:
                h.expire()
            except Exception:  # noqa: BLE001 - a hold that cannot be expired runs out its lease
                pass
        housekeeper.final_tick()
        ctl.close()


def _root_message(e: BaseException) -> str:
    while e.__cause__ is not None and not isinstance(e, storage.errors.ShardflowError):
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


class _Housekeeper:
    """Drives the job's storage controller: sink statuses, read policies, introspection, compaction.

    The controller is opened without its own thread (`tick_interval_ms=None`), so
    this ticks it: every `interval` seconds while a continuous job runs, and once
    when any job ends. SUBTLE: a newer copy of the job fences this controller;
    then ticking stops quietly, because the sinks write their shards directly and
    must not be stopped by it.

    Only the primary (process 0 of a multi-process run) asks for compaction; the
    others' read-only controllers record nothing, so ticking them is harmless.

    Garbage. The primary of a continuous job also runs `gc` on its thread every
    `gc_interval` seconds (default 10; `$SHARDFLOW_GC_INTERVAL`, 0 turns it off;
    off the sinks' write path) over the job's shards and
    the controller's `system.*` shards: parts of compacted-away batches are
    deleted and consensus is truncated while the job runs, and every
    `reclaim_interval` seconds the consensus file gives the freed space back.
    So a job over a constant-size collection stays constant-size.

    Shutdown is bounded: a continuous job's final tick does no compaction or gc
    (what is left is a few seconds' worth; the next run's scheduled gc takes it);
    closing the client stops the compactor, interrupting a merge in flight. A batch job
    still compacts and collects once at its end (its runtime is the data's).
    """

    GC_INTERVAL = 10.0
    RECLAIM_INTERVAL = 60.0

    def __init__(
        self,
        ctx: FlowContext,
        interval: float | None,
        *,
        primary: bool = True,
        gc_interval: float | None = None,
        reclaim_interval: float | None = None,
    ):
        self.ctx = ctx
        self.interval = interval
        self.primary = primary
        if gc_interval is None:
            gc_interval = float(os.environ.get("SHARDFLOW_GC_INTERVAL") or self.GC_INTERVAL)
        self.gc_interval = gc_interval
        self.reclaim_interval = self.RECLAIM_INTERVAL if reclaim_interval is None else reclaim_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dead = False
        self.gc_runs = 0
        self.gc_errors: list[BaseException] = []

    def _give_up(self, what: str, e: Exception) -> None:
        """Stop driving the controller; say so in one line unless a newer copy fenced it (expected).

        A fault of the whole store (consensus locked or unreachable, a full disk) is
        not the controller's: the data path meets the same fault and stops the job
        with that one line, or the next tick succeeds once it has passed. So this
        keeps ticking and adds no second line for it.
        """
        if isinstance(e, storage.errors.ConsensusUnavailable | storage.errors.OutOfSpace):
            log.debug("%s failed (%s: %s); retrying on the next tick", what, type(e).__name__, e)
            return
        self._dead = True
        if not isinstance(e, storage.errors.Fenced):
            first = str(e).splitlines()[0] if str(e) else ""
            log.warning(
                "warning: %s failed (%s: %s); the job goes on without its introspection (system.*)",
                what, type(e).__name__, first,
            )

    def report(self, status: str, error: str | None = None) -> None:
        if self._dead:
            return
        try:
            for name in sorted(self.ctx.shards):
                self.ctx.controller.report_sink_status(name, status, error)
        except Exception as e:  # noqa: BLE001 - fenced or read-only: the data path goes on regardless
            self._give_up(f"recording sink status {status!r}", e)

    def tick(self) -> None:
        # Sinks commit through the shard machine directly, which does not wake the
        # client's background compactor: ask it here (cheap; it coalesces requests).
        for shard in self.ctx.written_shards() if self.primary else ():
            try:
                self.ctx.client.compactor.request(shard)
            except Exception:  # noqa: BLE001 - compaction is an optimization
                pass
        if self._dead:
            return
        try:
            self.ctx.controller.tick()
        except Exception as e:  # noqa: BLE001 - see the class docstring
            self._give_up("the storage controller's tick", e)

    def _gc_shards(self) -> list[str]:
        shards = list(self.ctx.shards.values())
        try:
            shards += [s for s in self.ctx.controller.introspection_shards().values() if s not in shards]
        except Exception:  # noqa: BLE001 - no introspection (fenced): the job's shards
            pass
        return shards

    def collect_garbage(self, *, reclaim: bool = False) -> None:
        """One gc round over the job's and the controller's shards (primary only).

        gc deletes only parts no live reader can reach (and orphans past their grace
        period), so it is safe while the sinks, other jobs and queries run.
        """
        if not self.primary:
            return
        for shard in self._gc_shards():
            if self._stop.is_set() and self.interval:
                return  # shutting down: the next round (or run) does the rest
            try:
                self.ctx.client.gc(shard)
            except Exception as e:  # noqa: BLE001 - maintenance; the next round retries
                self.gc_errors = [*self.gc_errors[-9:], e]
        self.gc_runs += 1
        if reclaim:
            try:
                self.ctx.client.reclaim_space()
            except Exception as e:  # noqa: BLE001 - maintenance; the next round retries
                self.gc_errors = [*self.gc_errors[-9:], e]

    def final_tick(self) -> None:
        """Last tick; a batch job then compacts and collects every shard it wrote, synchronously.

        A continuous job does not: its scheduled gc kept garbage small, and SIGINT
        must stop it within seconds (see the class docstring).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if not self._dead:
            try:
                self.ctx.controller.tick()
            except Exception as e:  # noqa: BLE001 - see the class docstring
                self._give_up("the storage controller's last tick", e)
        if self.interval:
            return
        for shard in self.ctx.written_shards() if self.primary else ():
            try:
                self.ctx.client.compact(shard)
            except Exception:  # noqa: BLE001 - maintenance; the next run retries
                pass
        self.collect_garbage()

    def _loop(self) -> None:
        assert self.interval is not None
        last_gc = last_reclaim = time.monotonic()
        while not self._stop.wait(self.interval):
            self.tick()
            now = time.monotonic()
            if self.gc_interval and now - last_gc >= self.gc_interval and not self._stop.is_set():
                reclaim = bool(self.reclaim_interval) and now - last_reclaim >= self.reclaim_interval
                self.collect_garbage(reclaim=reclaim)
                last_gc = time.monotonic()
                if reclaim:
                    last_reclaim = last_gc

    def __enter__(self) -> _Housekeeper:
        if self.interval:
            self._thread = threading.Thread(target=self._loop, name="shardflow-housekeeper", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

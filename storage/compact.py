"""Compaction: size-tiered merges of adjacent batches, in the spirit of differential's spine.

Planning is pure and separate from execution:

- `plan_compaction(state)` looks at the batch sizes and returns the merges to
  run (`MergePlan`s), without IO. It is tested on its own.
- `compact(client, shard)` carries the plan out: it reads the input parts
  (checking their sha256), advances times to the shard's since, consolidates in
  DuckDB, writes the output parts, and then swaps the inputs for the output with
  one compare-and-set, *only if the inputs are still in the state*
  (`state.apply_merge`). A merge that lost that race leaves its output parts
  for gc.

The tiering. Each batch has a tier, `floor(log_fanout(rows))`; empty batches
(no parts) have tier -1. Walking the batches from oldest to newest, the planner
keeps a stack of groups whose tiers never increase from older to newer:

- a newer group of a higher tier than the group before it absorbs that group
  (a small straggler merges into the larger batch after it);
- `fanout` adjacent groups of the same tier merge into one (of a higher tier).

So there are at most `fanout - 1` batches per tier and `O(fanout * log n)`
batches for `n` appends, and each update is rewritten about `log_fanout(n)`
times. The default fanout, 6, keeps both within the targets for 1,000 appends
of equal size: at most 2 * log2(n) batches, write amplification under 4.

A merge never changes a snapshot at any `as_of >= since`: consolidation only
adds up diffs of updates that every such snapshot counts together.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb

from . import connections
from . import state as st
from .errors import CorruptPart, InvalidInput
from .frontier import Frontier
from .parts import ShardEnv, parts_source
from .read import tombstone_error
from .updates import consolidate_sql, overflow_checked, update_schema

FANOUT = 6


@dataclass(frozen=True)
class MergePlan:
    """Replace the adjacent batches `inputs` by one batch `[inputs[0].lower, inputs[-1].upper)`.

    `since` is the shard's since when the plan was made; the output's times are
    advanced to it (see `advance_time`) and the output batch carries it.
    """

    inputs: tuple[st.BatchMeta, ...]
    since: Frontier
    full: bool = False  # a major compaction: a lone batch with parts is rewritten too, unless settled

    @property
    def lower(self) -> Frontier:
        return self.inputs[0].lower

    @property
    def upper(self) -> Frontier:
        return self.inputs[-1].upper

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.inputs)

    @property
    def rewrites(self) -> bool:
        """False when at most one input has parts: the output keeps those parts as they are.

        Except in a full compaction, which promises one consolidated batch advanced to
        since: it rewrites a lone batch too, unless that batch is already `settled`.
        """
        data = [b for b in self.inputs if b.parts]
        if len(data) > 1:
            return True
        return self.full and len(data) == 1 and not settled(data[0], self.since, self.upper)


def settled(b: st.BatchMeta, since: Frontier, upper: Frontier) -> bool:
    """True iff rewriting `b` alone as a batch ending at `upper` under `since` would change nothing:
    it is consolidated and its times were already advanced as far as `advance_time` would."""
    if not b.consolidated:
        return False
    adv = advance_time(since, upper)
    return adv is None or b.since.is_empty or b.since.time >= adv  # type: ignore[operator]


@dataclass
class CompactReport:
    """What one `compact` call did."""

    merges_applied: int = 0
    merges_lost: int = 0  # inputs were gone at CAS time; output left for gc
    batches_before: int = 0
    batches_after: int = 0
    rows_read: int = 0
    rows_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    parts_written: int = 0


def tier(batch: st.BatchMeta, fanout: int = FANOUT) -> int:
    """`floor(log_fanout(rows))`; -1 for an empty batch (no parts)."""
    return _tier_of(batch.rows if batch.parts else 0, fanout)


def _tier_of(rows: int, fanout: int) -> int:
    if rows <= 0:
        return -1
    # SUBTLE: integer arithmetic, not math.log, so a batch of exactly fanout**k rows
    # is tier k on every platform.
    t = 0
    while rows >= fanout:
        rows //= fanout
        t += 1
    return t


def plan_compaction(state: st.ShardState, *, fanout: int = FANOUT, full: bool = False) -> list[MergePlan]:
    """The merges that bring `state`'s batches back into size tiers. Pure: no IO, no clock.

    With `full=True`, one merge of every batch (a major compaction: one rewrite
    of the whole shard, e.g. before heavy reading; on demand only), a lone
    batch included unless it is already consolidated and advanced to since.

    Returns non-overlapping runs of adjacent batches (oldest first), each of at
    least two batches (or the lone batch of a full compaction); empty when nothing
    is to be done or the shard is a tombstone. Running every plan and planning again eventually returns `[]`.

    Example:
        >>> import pyarrow as pa
        >>> from storage import state as st
        >>> from storage.frontier import Frontier
        >>> def b(lo, hi, rows):
        ...     parts = (st.PartMeta(f"p{lo}", "", rows, rows),) if rows else ()
        ...     return st.BatchMeta(Frontier(lo), Frontier(hi), Frontier(0), parts)
        >>> s = st.ShardState("s", 0, pa.schema([]), upper=Frontier(3),
        ...                   batches=(b(0, 1, 10), b(1, 2, 0), b(2, 3, 10)))
        >>> [(p.lower.time, p.upper.time) for p in plan_compaction(s)]
        [(1, 3)]
    """
    if fanout < 2:
        raise InvalidInput(f"compaction fanout must be >= 2, got {fanout}")
    if state.is_tombstone or not state.batches:
        return []
    if full:
        plan = MergePlan(state.batches, state.since, full=True)
        return [plan] if len(state.batches) >= 2 or plan.rewrites else []
    if len(state.batches) < 2:
        return []
    # Each group: [tier, rows, first index, last index (inclusive)].
    groups: list[list[int]] = []
    for i, b in enumerate(state.batches):
        groups.append([tier(b, fanout), b.rows, i, i])
        while True:
            if len(groups) >= 2 and groups[-1][0] > groups[-2][0]:
                # A newer group outranks the one before it: the older one is a straggler.
                _merge_last(groups, 2, fanout)
                continue
            if len(groups) >= fanout and groups[-1][0] >= 0 and all(
                g[0] == groups[-1][0] for g in groups[-fanout:]
            ):
                _merge_last(groups, fanout, fanout)
                continue
            break
    return [
        MergePlan(state.batches[g[2] : g[3] + 1], state.since) for g in groups if g[3] > g[2]
    ]


def _merge_last(groups: list[list[int]], n: int, fanout: int) -> None:
    tail = groups[-n:]
    rows = sum(g[1] for g in tail)
    t = _tier_of(rows, fanout)
    # SUBTLE: a merge must not lower the tier (consolidation may shrink the output,
    # but the plan cannot know that); otherwise the loop could bounce forever.
    t = max(t, max(g[0] for g in tail))
    del groups[-n:]
    groups.append([t, rows, tail[0][2], tail[-1][3]])


def advance_time(since: Frontier, upper: Frontier) -> int | None:
    """The time every update below it is advanced to in a merge with output `[.., upper)`.

    `min(since, upper - 1)`: NB not plain `since`. Advancing to `since` would be
    just as exact for every `as_of >= since`, but it could move times past the
    batch's upper; capping at `upper - 1` keeps every update inside its batch's
    `[lower, upper)` (which listen and `changes()` rely on), and all updates of a
    batch that lies wholly below since still collapse onto one time.
    None: nothing to advance (since is 0).
    """
    s = since.time  # None when since is empty
    if not upper.is_empty:
        cap = upper.time - 1  # type: ignore[operator]
        s = cap if s is None else min(s, cap)
    if s is None or s <= 0:
        return None
    return s


def merge_sql(state: st.ShardState, src: str, adv: int | None) -> str:
    """Advance times to `adv` and consolidate: sum diffs per (row, time), drop zeros, sort by time."""
    return consolidate_sql(src, state.schema.names, where=f"shard {state.shard_id}", since=adv, order_by_time=True)


class Interrupt:
    """A stop switch for compactions running on other threads.

    `stop()` makes `compact` return before its next merge and interrupts the
    DuckDB query of the merge in flight (`duckdb.InterruptException` in that
    thread). SUBTLE: a thread still inside DuckDB when the interpreter tears
    down aborts the process (SIGABRT), so exit must be able to end a merge
    early instead of waiting for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._cons: set[duckdb.DuckDBPyConnection] = set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            cons = list(self._cons)
        for con in cons:
            try:
                con.interrupt()
            except Exception:  # noqa: BLE001 - closed meanwhile: nothing left to interrupt
                pass

    def attach(self, con: duckdb.DuckDBPyConnection) -> None:
        with self._lock:
            self._cons.add(con)
        if self.stopped:
            con.interrupt()

    def detach(self, con: duckdb.DuckDBPyConnection) -> None:
        with self._lock:
            self._cons.discard(con)


class Interrupted(Exception):
    """The compaction was stopped (`Interrupt.stop()`) before this merge finished."""


def run_merge(
    client: ShardEnv, state: st.ShardState, plan: MergePlan, *, interrupt: Interrupt | None = None
) -> st.BatchMeta:
    """Read, advance, consolidate and write one merge's output. Does not touch the state."""
    if not plan.rewrites:
        data = [b for b in plan.inputs if b.parts]
        if not data:
            return st.BatchMeta(plan.lower, plan.upper, plan.since)
        # SUBTLE: the parts are kept as they are, so the output keeps their batch's since
        # and consolidation: claiming the plan's since would promise times were advanced.
        (b,) = data
        return st.BatchMeta(plan.lower, plan.upper, b.since, b.parts, b.consolidated)
    adv = advance_time(plan.since, plan.upper)
    con = connections.private()  # its own, so that an Interrupt stops this merge alone
    if interrupt is not None:
        interrupt.attach(con)
    try:
        src = parts_source(client, state, [b for b in plan.inputs if b.parts], con, "__inputs")
        with overflow_checked():
            out = con.sql(merge_sql(state, src, adv)).to_arrow_table()
    except duckdb.InterruptException as e:
        raise Interrupted(f"shard {state.shard_id}: compaction stopped") from e
    finally:
        if interrupt is not None:
            interrupt.detach(con)
        con.close()
    if interrupt is not None and interrupt.stopped:
        raise Interrupted(f"shard {state.shard_id}: compaction stopped")
    out = out.cast(update_schema(state.schema))
    parts = client.parts.write(state.shard_id, out)
    return st.BatchMeta(plan.lower, plan.upper, plan.since, parts, consolidated=True)


def compact(
    client: ShardEnv,
    shard: str,
    *,
    max_merges: int | None = None,
    fanout: int = FANOUT,
    full: bool = False,
    interrupt: Interrupt | None = None,
) -> CompactReport:
    """Run merges on `shard` until `plan_compaction` has nothing left (or `max_merges` ran).

    Each merge is applied with CAS only if its inputs are still in the state; a
    merge that lost that race counts in `merges_lost` and its output parts are
    left for gc. Safe to run concurrently with writers, readers and other
    compactions, in this process or others. `full=True` merges every batch into
    one (see `plan_compaction`). With `interrupt`, `interrupt.stop()` (another
    thread) ends the call early: before its next merge, or by interrupting the
    merge in flight (raises `Interrupted`; nothing is applied, what was written
    is left for gc).

    Raises:
        Tombstone: the shard was finalized.
        CorruptPart: an input part is missing or corrupt while its batch is still
            in the state (a part that disappeared because a concurrent merge
            replaced its batch is not an error).

    Example:
        >>> import pyarrow as pa, storage, tempfile
        >>> client = storage.open(tempfile.mkdtemp())
        >>> shard = storage.ShardId.new()
        >>> w = client.open_writer(shard, schema=pa.schema([("k", pa.string())]), compact=False)
        >>> for t in range(6):
        ...     _ = w.compare_and_append(pa.table({"k": ["a"], "_time": [t], "_diff": [1]}), t, t + 1)
        >>> r = client.compact(shard)
        >>> r.batches_before, r.batches_after, r.merges_applied
        (6, 1, 1)
    """
    m = client.machine(shard)
    report = CompactReport()
    s = m.fetch()
    if s.is_tombstone:
        raise tombstone_error(m.shard_id)
    report.batches_before = report.batches_after = len(s.batches)
    done = 0
    while max_merges is None or done < max_merges:
        plans = plan_compaction(s, fanout=fanout, full=full)
        if not plans:
            break
        progressed = False
        for plan in plans:
            if max_merges is not None and done >= max_merges:
                break
            if interrupt is not None and interrupt.stopped:
                break
            done += 1
            try:
                output = run_merge(client, s, plan, interrupt=interrupt)
            except CorruptPart:
                if _still_present(m.fetch(), plan.inputs):
                    raise
                report.merges_lost += 1
                continue
            if plan.rewrites:
                report.rows_read += plan.rows
                report.bytes_read += sum(b.bytes for b in plan.inputs)
                report.rows_written += output.rows
                report.bytes_written += output.bytes
                report.parts_written += len(output.parts)
            s_new, applied = m.apply(st.apply_merge, plan.inputs, output)
            if applied:
                report.merges_applied += 1
                progressed = True
            else:
                # The inputs were replaced (a concurrent merge) or the shard was
                # finalized: our output parts are orphans now, gc removes them.
                report.merges_lost += 1
            s = s_new
        s = m.fetch()
        # A full compaction is one round: under steady appends it would never finish.
        if s.is_tombstone or not progressed or full or (interrupt is not None and interrupt.stopped):
            break
    report.batches_after = len(s.batches)
    return report


def _still_present(state: st.ShardState, inputs: Sequence[st.BatchMeta]) -> bool:
    have = set(state.batches)
    return all(b in have for b in inputs)


#: The nice value of the background compactor's thread. Measured on 2 cores (bench/append.py,
#: default settings): at the writer's priority its merges took the appends down to 0.26-0.54x bare
#: `pq.write_table`; at nice 10, 0.52x; at 19, 0.84x, compaction catching up in the idle time.
#: `SF_COMPACTOR_NICE` overrides it (0: the writer's priority).
COMPACTOR_NICE = int(os.environ.get("SF_COMPACTOR_NICE", "19"))


def _lower_priority() -> None:
    """Lower this thread's scheduling priority to `COMPACTOR_NICE` (Linux: nice is per thread).

    The threads it starts inherit it: each merge's DuckDB database and part encoders,
    so a merge takes only the CPU the writers leave. SUBTLE: so would a process-wide
    pool that this thread happened to start first; checked with a local and an ArrowFs
    blob, none is (after the merges, only this thread runs at this nice value). The
    writers' threads and the shared read database are not started here.
    Best effort: elsewhere, or where it is not allowed, nothing changes.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), COMPACTOR_NICE))
    except (AttributeError, OSError):
        pass


class BackgroundCompactor:
    """One daemon thread per client that compacts shards after appends.

    `request(shard)` is cheap and coalesces: a shard is compacted at most once
    more however many appends asked for it meanwhile. Errors are recorded in
    `errors` (the last few) and never reach the writer: compaction is an
    optimization, and the next request retries it. The thread runs at a low
    priority (`COMPACTOR_NICE`): appends go first, merges take the idle time.

    `stop(timeout)` ends it for good: pending requests are dropped (the next
    process compacts them), the merge in flight may finish for `grace`
    seconds and is then interrupted, and the thread is joined. The client
    calls it on `close()` and at interpreter exit.
    """

    def __init__(self, client: ShardEnv):
        self.client = client
        self._cv = threading.Condition()
        self._pending: dict[str, None] = {}
        self._busy = False
        self._thread: threading.Thread | None = None
        self._interrupt = Interrupt()
        self.errors: list[BaseException] = []
        self.totals = CompactReport()

    @property
    def stopped(self) -> bool:
        return self._interrupt.stopped

    def request(self, shard: str) -> None:
        with self._cv:
            if self._interrupt.stopped:
                return
            self._pending[shard] = None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="shardflow-compactor", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running; True unless the timeout passed."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stop(self, *, grace: float = 1.0, timeout: float = 10.0) -> bool:
        """Stop for good: drop pending requests, let a running merge finish for up to `grace`
        seconds, then interrupt it; join the thread for up to `timeout` seconds in all.

        Returns True when the thread is gone (nothing of this compactor is still in DuckDB).
        """
        deadline = time.monotonic() + timeout
        with self._cv:
            self._pending.clear()
            thread = self._thread
            if grace > 0 and self._busy:
                self._cv.wait_for(lambda: not self._busy, min(grace, timeout))
            self._interrupt.stop()
            self._cv.notify_all()
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def _loop(self) -> None:
        _lower_priority()
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: bool(self._pending) or self._interrupt.stopped, timeout=30.0):
                    self._thread = None
                    return
                if self._interrupt.stopped:
                    self._thread = None
                    self._cv.notify_all()
                    return
                shard = next(iter(self._pending))
                del self._pending[shard]
                self._busy = True
            try:
                r = compact(self.client, shard, interrupt=self._interrupt)
                t = self.totals
                t.merges_applied += r.merges_applied
                t.merges_lost += r.merges_lost
                t.rows_read += r.rows_read
                t.rows_written += r.rows_written
                t.bytes_read += r.bytes_read
                t.bytes_written += r.bytes_written
                t.parts_written += r.parts_written
            except Interrupted:
                pass
            except BaseException as e:  # noqa: BLE001 - background work must not die
                self.errors = [*self.errors[-9:], e]
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

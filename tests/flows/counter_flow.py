"""A deterministic flow file for the job tests (loaded by path; not a test module).

Source: `COUNTER_PARTS` partitions; tick i of partition p inserts rows
`p{p}-{i}-{j}` (j < COUNTER_ROWS) and retracts those of tick i-3, all at time i.
Offsets: the tick number (resume after it). Env: COUNTER_TICKS, COUNTER_ROWS,
COUNTER_PARTS, COUNTER_INTERVAL (seconds per tick).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow

from connectors.base import STOP, UpdatePartition, UpdateSource, partition_key
from flows.operators import consolidate
from storage import Frontier, Progress, UpdateBatch

SCHEMA = pa.schema([("k", pa.string())])
NAME = "counter"


def tick_table(p: int, i: int, rows: int) -> pa.Table:
    ks = [f"p{p}-{i}-{j}" for j in range(rows)]
    ds = [1] * rows
    if i >= 3:
        ks += [f"p{p}-{i - 3}-{j}" for j in range(rows)]
        ds += [-1] * rows
    n = len(ks)
    return pa.table({"k": ks, "_time": pa.array([i] * n, pa.int64()), "_diff": pa.array(ds, pa.int64())})


class _Part(UpdatePartition):
    def __init__(self, key, p, start, ticks, rows, interval, continuous, keys):
        self.key, self.p, self.offset = key, p, start - 1
        self.next, self.ticks, self.rows, self.interval = start, ticks, rows, interval
        self.continuous, self.keys = continuous, keys
        self.awake: datetime | None = None
        self.started = False
        self.finished = False

    def _progress(self) -> Progress:
        return Progress(Frontier(self.next), self.key, self.keys)

    def next_batch(self) -> list[Any]:
        if self.finished:
            raise StopIteration
        if not self.started:
            self.started = True
            return [self._progress()]
        if STOP.is_set() or (not self.continuous and self.next >= self.ticks):
            self.finished = True
            return [self._progress()]
        if self.next >= self.ticks:
            self.awake = datetime.now(UTC) + timedelta(seconds=0.05)
            return []
        i = self.next
        self.next += 1
        self.offset = i
        self.awake = datetime.now(UTC) + timedelta(seconds=self.interval)
        return [UpdateBatch(tick_table(self.p, i, self.rows), offsets={self.key: i}), self._progress()]

    def next_awake(self):
        return self.awake


class CounterSource(UpdateSource):
    def __init__(self, *, parts, ticks, rows, interval, continuous, resume=None):
        super().__init__(resume=resume)
        self.parts, self.ticks, self.rows, self.interval, self.continuous = parts, ticks, rows, interval, continuous
        self.keys = tuple(partition_key("counter", p) for p in range(parts))

    def list_parts(self):
        return list(self.keys)

    def build_partition(self, key, resume_offset):
        p = self.keys.index(key)
        start = 0 if resume_offset is None else int(resume_offset) + 1
        return _Part(key, p, start, self.ticks, self.rows, self.interval, self.continuous, self.keys)


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def build(ctx):
    flow = Dataflow("counter")
    ctx.collection(NAME, SCHEMA)
    src = CounterSource(
        parts=int(env("COUNTER_PARTS", "2")),
        ticks=int(env("COUNTER_TICKS", "20")),
        rows=int(env("COUNTER_ROWS", "10")),
        interval=float(env("COUNTER_INTERVAL", "0.0")),
        continuous=ctx.continuous,
        resume=ctx.resume_offsets(NAME),
    )
    s = op.input("in", flow, src)
    ctx.persist("sink", consolidate("cons", s), NAME)
    return flow

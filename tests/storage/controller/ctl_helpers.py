"""Helpers shared by the storage controller tests."""

from __future__ import annotations

import pyarrow as pa

import storage


class Clock:
    """A settable millisecond clock."""

    def __init__(self, now: int = 10_000):
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


KV = pa.schema([("k", pa.string()), ("v", pa.int64())])


def contents(client: storage.Client, shard: str, as_of: int | None = None) -> list[tuple]:
    """Sorted (row..., diff) tuples of a shard's snapshot at `as_of` (default upper - 1)."""
    s = client.state(shard)
    if as_of is None:
        assert s.upper.time is not None and s.upper.time > 0, s.upper
        as_of = s.upper.time - 1
    with client.open_leased_reader(shard, heartbeat=False) as r:
        t = r.snapshot(as_of, timeout=5)
    return sorted(tuple(d.values()) for d in t.to_pylist())

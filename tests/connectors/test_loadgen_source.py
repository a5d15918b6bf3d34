"""connectors.loadgen_source: determinism, resume after the last emitted tick, pacing, stop."""

from __future__ import annotations

import time
from typing import Any

import bytewax.operators as op
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, cluster_main, run_main

from connectors.base import request_stop, reset_stop
from connectors.loadgen import Auction, Counter, generate
from connectors.loadgen_source import LoadgenSource, loadgen_sources
from storage import Progress, UpdateBatch


def run(*sources: LoadgenSource, workers: int = 1) -> list[Any]:
    flow, out = Dataflow("lg"), []
    for i, s in enumerate(sources):
        op.output(f"out{i}", op.input(f"in{i}", flow, s), TestingSink(out))
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return out


def table(items: list[Any], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([x.table for x in items if isinstance(x, UpdateBatch)]).cast(schema)


def gen() -> Auction:
    return Auction(7, auctions_per_tick=2, bids_per_tick=5, users=20, auction_ticks=3)


def test_deterministic_and_equal_to_the_generator() -> None:
    g = gen()
    a = run(LoadgenSource(g, "bids", ticks=12))
    b = run(LoadgenSource(gen(), "bids", ticks=12))
    assert [repr(x) for x in a] == [repr(x) for x in b]
    assert table(a, g.update_schemas()["bids"]).equals(generate(g, range(12))["bids"])
    assert [x.offsets for x in a if isinstance(x, UpdateBatch)] == [{"bids/0": i} for i in range(12)]
    fronts = [x.frontier.time for x in a if isinstance(x, Progress)]
    assert fronts == [0] + [g.time_of(i + 1) for i in range(11)] + [g.time_of(11) + 1]


def test_resume_after_last_emitted_tick() -> None:
    g = gen()
    full = run(LoadgenSource(g, "users", ticks=10))
    first = run(LoadgenSource(g, "users", ticks=4))
    rest = run(LoadgenSource(g, "users", ticks=10, resume={"users/0": 3}))
    assert [x.offsets["users/0"] for x in rest if isinstance(x, UpdateBatch)] == list(range(4, 10))
    s = g.update_schemas()["users"]
    assert pa.concat_tables([table(first, s), table(rest, s)]).equals(table(full, s))
    # Resuming a finished run emits only the final Progress.
    done = run(LoadgenSource(g, "users", ticks=10, resume={"users/0": 9}))
    assert [type(x) for x in done] == [Progress] and done[0].frontier.time == g.time_of(9) + 1


def test_all_collections_two_workers() -> None:
    srcs = loadgen_sources(gen(), ticks=5)
    one = run(*srcs.values())
    two = run(*loadgen_sources(gen(), ticks=5).values(), workers=2)
    assert sorted(map(repr, one)) == sorted(map(repr, two))
    assert set(srcs) == set(gen().schemas())


def test_rate_paces_and_stop_ends_continuous_mode() -> None:
    t0 = time.monotonic()
    run(LoadgenSource(Counter(), "counter", ticks=6, rate=50.0))
    assert time.monotonic() - t0 >= 0.09
    reset_stop()
    part = LoadgenSource(Counter(), "counter", ticks=None).build_part("x", "counter/0", None)
    items = part.next_batch() + part.next_batch()
    request_stop()
    try:
        items += part.next_batch()
        with pytest.raises(StopIteration):
            part.next_batch()
    finally:
        reset_stop()
    fronts = [x.frontier.time for x in items if isinstance(x, Progress)]
    assert fronts == sorted(fronts) and isinstance(items[-1], Progress)
    assert len([x for x in items if isinstance(x, UpdateBatch)]) == 32


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no collection 'nope'"):
        LoadgenSource(Counter(), "nope", ticks=1)
    with pytest.raises(ValueError, match="rate must be > 0"):
        LoadgenSource(Counter(), "counter", ticks=1, rate=0)

"""Tests for the Nexmark generator (connectors.loadgen.Nexmark) and the bench/nexmark.py views."""

from __future__ import annotations

import importlib.util
import os
import sys

import pyarrow.compute as pc
import pytest

from connectors.loadgen import DIFF, GENERATORS, TIME, Nexmark, generate, make_generator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gen(seed: int = 3, **kw: int) -> Nexmark:
    return Nexmark(seed, events_per_tick=kw.pop("events_per_tick", 250), **kw)


def test_registered_and_config_round_trip():
    assert GENERATORS["nexmark"] is Nexmark
    g = _gen(5, auction_ticks=3)
    clone = make_generator("nexmark", **g.config())
    assert repr(clone) == repr(g)
    assert generate(clone, range(4)) == generate(g, range(4))


def test_deterministic_per_seed():
    a, b = generate(_gen(7), range(6)), generate(_gen(7), range(6))
    assert a == b
    c = generate(_gen(8), range(6))
    assert c["bids"].column("price") != a["bids"].column("price")


def test_tick_on_its_own_equals_the_tick_within_a_run():
    g = _gen(11)
    run = [g.tick(i) for i in range(12)]
    for i in (0, 1, 7, 11):
        alone = _gen(11).tick(i)
        assert alone.keys() == run[i].keys()
        for name, batch in alone.items():
            assert batch.equals(run[i][name]), (i, name)


def test_times_diffs_and_schemas():
    g = Nexmark(2, events_per_tick=100, start_time=5000, tick_ms=250)
    for i in range(5):
        out = g.tick(i)
        for name, batch in out.items():
            assert batch.schema == g.update_schemas()[name]
            assert pc.all(pc.equal(batch.column(TIME), 5000 + 250 * i)).as_py()
            assert pc.all(pc.equal(batch.column(DIFF), 1)).as_py()
            dt = batch.column("date_time")
            assert pc.min(dt).as_py() >= 5000 + 250 * i and pc.max(dt).as_py() < 5000 + 250 * (i + 1)


def test_proportions_1_3_46():
    t = generate(_gen(1, events_per_tick=500), range(10))  # 5,000 events = 100 epochs
    assert (t["persons"].num_rows, t["auctions"].num_rows, t["bids"].num_rows) == (100, 300, 4600)
    # a tick size that cuts epochs: the counts still add up to the events
    u = generate(_gen(1, events_per_tick=37), range(10))
    assert sum(x.num_rows for x in u.values()) == 370
    assert u["persons"].num_rows == 8  # events 0, 50, ..., 350


def test_ids_dense_and_references_to_generated_rows():
    g = _gen(9, events_per_tick=333)
    max_person = max_auction = -1
    persons: list[int] = []
    auctions: list[int] = []
    for i in range(30):
        out = g.tick(i)
        if "persons" in out:
            ids = out["persons"].column("id").to_pylist()
            persons += ids
            max_person = max(ids)
        if "auctions" in out:
            a = out["auctions"]
            ids = a.column("id").to_pylist()
            auctions += ids
            max_auction = max(ids)
            assert pc.max(a.column("seller")).as_py() <= max_person
            assert pc.min(a.column("seller")).as_py() >= Nexmark.FIRST_PERSON_ID
            assert pc.all(pc.greater_equal(a.column("reserve"), a.column("initial_bid"))).as_py()
            assert pc.all(pc.greater(a.column("expires"), a.column("date_time"))).as_py()
            cats = set(a.column("category").to_pylist())
            assert cats <= set(range(10, 15))
        if "bids" in out:
            b = out["bids"]
            assert pc.max(b.column("auction")).as_py() <= max_auction
            assert pc.min(b.column("auction")).as_py() >= Nexmark.FIRST_AUCTION_ID
            assert pc.max(b.column("bidder")).as_py() <= max_person
            assert pc.min(b.column("price")).as_py() >= 1
    assert persons == list(range(1000, 1000 + len(persons)))
    assert auctions == list(range(1000, 1000 + len(auctions)))


def test_hot_auctions_and_price_skew():
    b = generate(_gen(4, events_per_tick=1000), range(20))["bids"]
    hot = pc.sum(pc.equal(pc.modulo(pc.subtract(b.column("auction"), 1000), 100), 0)).as_py()
    assert hot / b.num_rows > 0.45  # half the bids go to the hot auction (plus cold draws)
    price = b.column("price")
    assert pc.min(price).as_py() >= 100 and pc.max(price).as_py() <= 100_000_000
    # log-uniform: the median is near 10^3 * 100
    med = pc.approximate_median(price).as_py()
    assert 30_000 < med < 300_000


def test_bad_parameters():
    with pytest.raises(ValueError, match="events_per_tick"):
        Nexmark(events_per_tick=0)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_nexmark", os.path.join(ROOT, "bench", "nexmark.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_quick_views_equal_duckdb(capsys):
    res = _bench().main(["--quick", "--only", "q0,q2,q3,q9", "--one-time-per-step"])
    assert set(res) == {"q0", "q2", "q3", "q9"}
    assert all(r["ok"] for r in res.values()), capsys.readouterr().out
    assert all(isinstance(r["rows"], int) and r["rows"] > 0 for r in res.values())

"""Deterministic load generators: Materialize's COUNTER, AUCTION and MARKETING, and Nexmark.

A generator produces *updates* ``(row, time, diff)`` as Arrow record batches whose
last two columns are ``_time`` (int64) and ``_diff`` (int64, +1 insert / -1 retract).
This module is pure data generation: it imports no streaming framework, so a
source wrapper (e.g. a bytewax input) only has to call :meth:`LoadGenerator.tick`.

Delivery contract, shared by every generator:

* **Deterministic per seed.** The output depends only on the seed and the
  constructor parameters; the same generator built twice emits identical data.
* **Tick ``i`` is reproducible on its own.** ``tick(i)`` is a pure function of
  ``(seed, params, i)``. It never replays ticks ``0..i-1``: every random attribute
  is a counter-based hash of ``(seed, stream, entity id)``, and every entity id is
  arithmetic on the tick number.
* **Resume after the last emitted tick.** The resume offset of a source is simply
  the next tick number: after a restart, continue with ``tick(last_emitted + 1)``
  and the concatenated output is exactly what an uninterrupted run would emit.
* **Times.** Every update of tick ``i`` carries ``_time = start_time + i * tick_ms``.
* **Consolidated per tick.** A batch never holds the same row with both +1 and -1,
  and summing ``_diff`` per row over ticks ``0..i`` never goes negative.

Randomness is a vectorised splitmix64 evaluated with Arrow compute kernels, so no
generator runs a Python loop per row.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

# The update columns and schema are storage's (re-exported here for the generators' users).
from storage import DIFF, TIME, update_schema
from storage.errors import InvalidInput

__all__ = [
    "DIFF",
    "GENERATORS",
    "TIME",
    "Auction",
    "Counter",
    "LoadGenerator",
    "Marketing",
    "Nexmark",
    "generate",
    "iter_ticks",
    "make_generator",
    "update_schema",
]

_MASK64 = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Largest count accepted for entity parameters: keeps ids well inside int64 and
# every draw range within _MAX_RANGE.
_MAX_COUNT = 1 << 31


# --------------------------------------------------------------------------- #
# Parameter validation
# --------------------------------------------------------------------------- #


def _check_int(name: str, value: Any, minimum: int, maximum: int = _INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidInput(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return value


def _check_prob(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 <= float(value) <= 1.0
    ):
        raise InvalidInput(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- #
# Counter-based PRNG (splitmix64), vectorised with Arrow compute
# --------------------------------------------------------------------------- #


def _mix64(x: int) -> int:
    """The splitmix64 finaliser on one Python int."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


_U64 = pa.uint64()
_S_GOLDEN = pa.scalar(_GOLDEN, _U64)
_S_MIX1 = pa.scalar(_MIX1, _U64)
_S_MIX2 = pa.scalar(_MIX2, _U64)
_S_27 = pa.scalar(27, _U64)
_S_30 = pa.scalar(30, _U64)
_S_31 = pa.scalar(31, _U64)
_S_11 = pa.scalar(11, _U64)
_S_2_POW_M53 = pa.scalar(2.0**-53, pa.float64())


# Compute kernels get typed scalars only: a bare Python number or string makes
# pyarrow probe optional imports on every call (~40 us each when numpy is absent).
def _i64(v: int) -> pa.Scalar:
    return pa.scalar(v, pa.int64())


def _f64(v: float) -> pa.Scalar:
    return pa.scalar(v, pa.float64())


def _str(v: str) -> pa.Scalar:
    return pa.scalar(v, pa.string())


def _bits(key: pa.Scalar, ids: pa.Array) -> pa.Array:
    """64 random bits per id: ``splitmix64(key + id * golden)``, all uint64 arithmetic."""
    z = pc.add(pc.multiply(ids.cast(_U64), _S_GOLDEN), key)
    z = pc.multiply(pc.bit_wise_xor(z, pc.shift_right(z, _S_30)), _S_MIX1)
    z = pc.multiply(pc.bit_wise_xor(z, pc.shift_right(z, _S_27)), _S_MIX2)
    return pc.bit_wise_xor(z, pc.shift_right(z, _S_31))


class _Rng:
    """Independent random streams keyed by name; each draw is a pure function of an id."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._keys: dict[str, pa.Scalar] = {}

    def key(self, stream: str) -> pa.Scalar:
        k = self._keys.get(stream)
        if k is None:
            salt = _mix64(zlib.crc32(stream.encode()) + _GOLDEN)
            k = self._keys[stream] = pa.scalar(_mix64(self._seed ^ salt), _U64)
        return k

    def integers(self, stream: str, ids: pa.Array, low: int, high: int) -> pa.Array:
        """Uniform int64 in ``[low, high)``.

        ``bits // ceil(2**64 / n)`` maps 64 random bits onto ``[0, n)`` with one kernel
        call; the bias is below ``n / 2**64``.
        """
        n = high - low
        assert 0 < n <= _MAX_RANGE, (low, high)
        if n == 1:
            return _const(low, len(ids))
        r = pc.divide(_bits(self.key(stream), ids), _step(n)).cast(pa.int64())
        return pc.add(r, _i64(low)) if low else r

    def uniform(self, stream: str, ids: pa.Array) -> pa.Array:
        """Uniform float64 in ``[0, 1)`` with 53 random bits."""
        h = pc.shift_right(_bits(self.key(stream), ids), _S_11)
        return pc.multiply(h.cast(pa.float64()), _S_2_POW_M53)


_MAX_RANGE = 1 << 32


@lru_cache(maxsize=1024)
def _step(n: int) -> pa.Scalar:
    """``ceil(2**64 / n)`` as a uint64 scalar (n >= 2)."""
    return pa.scalar(-(-(1 << 64) // n), _U64)


# --------------------------------------------------------------------------- #
# Vectorised construction helpers
# --------------------------------------------------------------------------- #


@lru_cache(maxsize=64)
def _base(n: int) -> pa.Array:
    return pa.array(range(n), pa.int64())


def _iota(start: int, n: int) -> pa.Array:
    """int64 ids ``start, start+1, ..., start+n-1``."""
    base = _base(n)
    return pc.add(base, _i64(start)) if start else base


def _const(value: int, n: int) -> pa.Array:
    return pa.nulls(n, pa.int64()).fill_null(_i64(value))


def _prefixed(prefix: str, ids: pa.Array, suffix: str = "") -> pa.Array:
    """Strings ``f"{prefix}{id}{suffix}"`` built column-wise."""
    return pc.binary_join_element_wise(_str(prefix), ids.cast(pa.string()), _str(suffix), _str(""))


def _batch(schema: pa.Schema, columns: list[pa.Array], time: int, diff: int) -> pa.RecordBatch:
    n = len(columns[0])
    return pa.RecordBatch.from_arrays(
        [*columns, _const(time, n), _const(diff, n)], schema=update_schema(schema)
    )


def _put(out: dict[str, pa.RecordBatch], name: str, parts: list[pa.RecordBatch]) -> None:
    parts = [p for p in parts if p.num_rows]
    if parts:
        out[name] = parts[0] if len(parts) == 1 else pa.concat_batches(parts)


# --------------------------------------------------------------------------- #
# Generators
# --------------------------------------------------------------------------- #


class LoadGenerator(ABC):
    """Base class: a deterministic, tick-addressable source of updates.

    Subclasses define :meth:`schemas` and :meth:`_tick`. Every public entry point
    validates its arguments and raises a one-line ``InvalidInput`` (a ``ValueError``)
    naming the offending parameter and value.

    Args:
        seed: Seed in ``[0, 2**64)``; the output is a pure function of it and the
            other constructor parameters.
        start_time: ``_time`` of tick 0 (>= 0).
        tick_ms: ``_time`` distance between consecutive ticks (>= 1).
    """

    name: ClassVar[str] = ""

    def __init__(self, seed: int = 0, *, start_time: int = 0, tick_ms: int = 1000) -> None:
        self.seed = _check_int("seed", seed, 0, _MASK64)
        self.start_time = _check_int("start_time", start_time, 0)
        self.tick_ms = _check_int("tick_ms", tick_ms, 1)
        self._rng = _Rng(self.seed)

    @abstractmethod
    def schemas(self) -> dict[str, pa.Schema]:
        """Return ``{collection name: row schema}`` (without ``_time``/``_diff``)."""

    def update_schemas(self) -> dict[str, pa.Schema]:
        """Return ``{collection name: update schema}`` (row columns + ``_time`` + ``_diff``)."""
        return {name: update_schema(s) for name, s in self.schemas().items()}

    def config(self) -> dict[str, Any]:
        """Return the constructor parameters; persist them next to the resume offset.

        ``type(gen)(**gen.config())`` rebuilds a generator with identical output.
        """
        return dict(self._config())

    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, "start_time": self.start_time, "tick_ms": self.tick_ms}

    def time_of(self, i: int) -> int:
        """Return the ``_time`` of tick ``i``: ``start_time + i * tick_ms``."""
        _check_int("tick", i, 0)
        t = self.start_time + i * self.tick_ms
        if t > _INT64_MAX:
            raise InvalidInput(f"tick {i} overflows int64 _time (start_time + tick * tick_ms = {t})")
        return t

    def tick(self, i: int) -> dict[str, pa.RecordBatch]:
        """Return the updates produced at tick ``i``.

        Pure function of ``(seed, params, i)``: tick ``i`` can be regenerated on its
        own after a restart, without replaying earlier ticks. Resume a source by
        continuing with the tick after the last one emitted.

        Args:
            i: Tick number, >= 0.

        Returns:
            ``{collection name: record batch}`` holding the row columns followed by
            ``_time`` (``start_time + i * tick_ms``) and ``_diff`` (+1/-1).
            Collections without updates at this tick are absent; batches are never empty.
        """
        return self._tick(i, self.time_of(i))

    @abstractmethod
    def _tick(self, i: int, time: int) -> dict[str, pa.RecordBatch]: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


class Counter(LoadGenerator):
    """Materialize's COUNTER: a single column counting up ``1, 2, 3, ...``.

    Collection ``counter(counter int64)``. Tick ``i`` inserts the values
    ``i * rows_per_tick + 1 .. (i + 1) * rows_per_tick``. With ``max_cardinality``
    the oldest values are retracted (``_diff`` -1) as soon as more than
    ``max_cardinality`` are live, so after every tick exactly
    ``min(max_cardinality, values emitted so far)`` rows are live. A value inserted
    and retracted within the same tick is not emitted at all.

    Deterministic per seed (the seed does not affect the values); tick ``i`` is
    reproducible on its own; resume after the last emitted tick.

    Args:
        seed: Seed in ``[0, 2**64)`` (kept for a uniform interface).
        rows_per_tick: Values inserted per tick (>= 1).
        max_cardinality: Live rows kept at most, or ``None`` for unbounded (>= 1).
        start_time: ``_time`` of tick 0.
        tick_ms: ``_time`` distance between ticks.
    """

    name = "counter"
    SCHEMA: ClassVar[pa.Schema] = pa.schema([("counter", pa.int64())])

    def __init__(
        self,
        seed: int = 0,
        rows_per_tick: int = 1,
        max_cardinality: int | None = None,
        *,
        start_time: int = 0,
        tick_ms: int = 1000,
    ) -> None:
        super().__init__(seed, start_time=start_time, tick_ms=tick_ms)
        self.rows_per_tick = _check_int("rows_per_tick", rows_per_tick, 1, _MAX_COUNT)
        self.max_cardinality = (
            None
            if max_cardinality is None
            else _check_int("max_cardinality", max_cardinality, 1, _INT64_MAX)
        )

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "rows_per_tick": self.rows_per_tick,
            "max_cardinality": self.max_cardinality,
        }

    def schemas(self) -> dict[str, pa.Schema]:
        return {"counter": self.SCHEMA}

    def _tick(self, i: int, time: int) -> dict[str, pa.RecordBatch]:
        r, m = self.rows_per_tick, self.max_cardinality
        lo, hi = i * r + 1, (i + 1) * r  # values inserted this tick, inclusive
        parts = []
        if m is None:
            parts.append(_batch(self.SCHEMA, [_iota(lo, r)], time, 1))
        else:
            # After tick i the live values are (hi - m, hi]; skip values that would
            # be inserted and retracted in the same tick.
            ins_lo = max(lo, hi - m + 1)
            ret_lo, ret_hi = max(1, lo - m), min(lo - 1, hi - m)
            parts.append(_batch(self.SCHEMA, [_iota(ins_lo, hi - ins_lo + 1)], time, 1))
            if ret_hi >= ret_lo:
                parts.append(_batch(self.SCHEMA, [_iota(ret_lo, ret_hi - ret_lo + 1)], time, -1))
        out: dict[str, pa.RecordBatch] = {}
        _put(out, "counter", parts)
        return out


ITEMS: tuple[str, ...] = (
    "Signed Memorabilia",
    "City Bar Crawl",
    "Best Pizza in Town",
    "Gift Basket",
    "Custom Art",
)


class Auction(LoadGenerator):
    """Materialize's AUCTION: organizations, users and accounts, then auctions and bids.

    Collections:

    * ``organizations(id, name)``, ``users(id, org_id, name)`` and
      ``accounts(id, org_id, balance)`` (one account per organization): static
      reference data, all emitted at tick 0. There are ``max(1, users // 10)``
      organizations.
    * ``auctions(id, seller, item, end_time)``: ``auctions_per_tick`` new auctions per
      tick. Auction ids of tick ``i`` are ``i * auctions_per_tick + k``; an auction
      created at tick ``i`` is open for ticks ``i .. i + auction_ticks - 1`` and its
      ``end_time`` is the ``_time`` of tick ``i + auction_ticks``.
    * ``bids(id, buyer, auction_id, amount, bid_time)``: ``bids_per_tick`` bids per
      tick, each on an auction open at that tick (uniformly), from a buyer other than
      the seller; ``bid_time`` is the tick's ``_time``.

    All updates are inserts. Derived views (winning bids, ...) are left to SQL.
    Deterministic per seed; tick ``i`` is reproducible on its own; resume after the
    last emitted tick.

    Args:
        seed: Seed in ``[0, 2**64)``.
        auctions_per_tick: New auctions per tick (>= 1).
        bids_per_tick: Bids per tick (>= 0).
        users: Number of users (>= 2, so a buyer is never the seller).
        auction_ticks: How many ticks an auction stays open (>= 1).
        start_time: ``_time`` of tick 0.
        tick_ms: ``_time`` distance between ticks.
    """

    name = "auction"
    ITEMS: ClassVar[tuple[str, ...]] = ITEMS
    SCHEMAS: ClassVar[dict[str, pa.Schema]] = {
        "organizations": pa.schema([("id", pa.int64()), ("name", pa.string())]),
        "users": pa.schema([("id", pa.int64()), ("org_id", pa.int64()), ("name", pa.string())]),
        "accounts": pa.schema(
            [("id", pa.int64()), ("org_id", pa.int64()), ("balance", pa.int64())]
        ),
        "auctions": pa.schema(
            [
                ("id", pa.int64()),
                ("seller", pa.int64()),
                ("item", pa.string()),
                ("end_time", pa.int64()),
            ]
        ),
        "bids": pa.schema(
            [
                ("id", pa.int64()),
                ("buyer", pa.int64()),
                ("auction_id", pa.int64()),
                ("amount", pa.int64()),
                ("bid_time", pa.int64()),
            ]
        ),
    }
    _ITEMS_ARRAY = pa.array(ITEMS, pa.string())

    def __init__(
        self,
        seed: int = 0,
        auctions_per_tick: int = 1,
        bids_per_tick: int = 10,
        users: int = 100,
        auction_ticks: int = 10,
        *,
        start_time: int = 0,
        tick_ms: int = 1000,
    ) -> None:
        super().__init__(seed, start_time=start_time, tick_ms=tick_ms)
        self.auctions_per_tick = _check_int("auctions_per_tick", auctions_per_tick, 1, _MAX_COUNT)
        self.bids_per_tick = _check_int("bids_per_tick", bids_per_tick, 0, _MAX_COUNT)
        self.users = _check_int("users", users, 2, _MAX_COUNT)
        self.auction_ticks = _check_int("auction_ticks", auction_ticks, 1, _MAX_COUNT)
        if auctions_per_tick * auction_ticks > _MAX_RANGE:
            raise InvalidInput(
                f"auctions_per_tick * auction_ticks must be <= {_MAX_RANGE} open auctions, "
                f"got {auctions_per_tick} * {auction_ticks}"
            )
        self.organizations = max(1, self.users // 10)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "auctions_per_tick": self.auctions_per_tick,
            "bids_per_tick": self.bids_per_tick,
            "users": self.users,
            "auction_ticks": self.auction_ticks,
        }

    def schemas(self) -> dict[str, pa.Schema]:
        return dict(self.SCHEMAS)

    def seller_of(self, auction_ids: pa.Array) -> pa.Array:
        """Return the seller of each auction id (a pure function of seed and id)."""
        return self._rng.integers("auction.seller", auction_ids, 0, self.users)

    def _tick(self, i: int, time: int) -> dict[str, pa.RecordBatch]:
        s, rng = self.SCHEMAS, self._rng
        out: dict[str, pa.RecordBatch] = {}
        if i == 0:
            org = _iota(0, self.organizations)
            _put(
                out,
                "organizations",
                [_batch(s["organizations"], [org, _prefixed("org_", org)], time, 1)],
            )
            uid = _iota(0, self.users)
            user_org = rng.integers("user.org", uid, 0, self.organizations)
            _put(
                out,
                "users",
                [_batch(s["users"], [uid, user_org, _prefixed("user_", uid)], time, 1)],
            )
            balance = rng.integers("account.balance", org, 10_000, 1_000_000)
            _put(out, "accounts", [_batch(s["accounts"], [org, org, balance], time, 1)])

        a = self.auctions_per_tick
        aid = _iota(i * a, a)
        item = pc.take(self._ITEMS_ARRAY, rng.integers("auction.item", aid, 0, len(ITEMS)))
        end = _const(self.time_of(i + self.auction_ticks), a)
        _put(
            out, "auctions", [_batch(s["auctions"], [aid, self.seller_of(aid), item, end], time, 1)]
        )

        b = self.bids_per_tick
        if b:
            bid = _iota(i * b, b)
            # Open at tick i: auctions created at ticks max(0, i - auction_ticks + 1) .. i.
            open_lo = max(0, i - self.auction_ticks + 1) * a
            auction_id = rng.integers("bid.auction", bid, open_lo, (i + 1) * a)
            seller = self.seller_of(auction_id)
            r = rng.integers("bid.buyer", bid, 0, self.users - 1)
            buyer = pc.add(r, pc.greater_equal(r, seller).cast(pa.int64()))
            amount = rng.integers("bid.amount", bid, 1, 1001)
            cols = [bid, buyer, auction_id, amount, _const(time, b)]
            _put(out, "bids", [_batch(s["bids"], cols, time, 1)])
        return out


class Marketing(LoadGenerator):
    """Materialize's MARKETING: impressions, clicks, leads, coupons and model predictions.

    Collections (times are int64 in the ``_time`` unit):

    * ``customers(id, email, income)``: ``customers`` rows, all emitted at tick 0.
    * ``impressions(id, customer_id, ad_id, impression_time)``: ``impressions_per_tick``
      per tick, ``ad_id`` in ``[0, 20)``.
    * ``clicks(impression_id, click_time)``: each impression is clicked with
      probability ``click_probability``, 1 to 3 ticks after it was shown.
    * ``leads(id, customer_id, created_at, converted_at, conversion_amount)``:
      ``leads_per_tick`` new leads per tick, inserted unconverted (nulls). A lead
      that converts does so 1 to ``conversion_ticks`` ticks later, as an update:
      ``-1`` for the unconverted row and ``+1`` for the row with ``converted_at`` and
      ``conversion_amount`` set.
    * ``conversion_predictions(lead_id, experiment_bucket, predicted_at, score)``: one
      per lead at creation; bucket ``"control"`` when ``lead_id % 10 <= 1`` else
      ``"experiment"``; ``score`` uniform in ``[0, 1)``.
    * ``coupons(id, lead_id, created_at, amount)``: sent at creation to experiment
      leads with ``score <= 0.5``; coupon id = lead id.

    A lead converts with probability ``score``, with a second chance (again
    ``score``) when it received a coupon. Deterministic per seed; tick ``i`` is
    reproducible on its own; resume after the last emitted tick.

    Args:
        seed: Seed in ``[0, 2**64)``.
        customers: Number of customers (>= 1).
        impressions_per_tick: New impressions per tick (>= 0).
        leads_per_tick: New leads per tick (>= 0).
        click_probability: Probability that an impression is clicked, in ``[0, 1]``.
        conversion_ticks: Maximum delay, in ticks, before a lead converts (>= 1).
        start_time: ``_time`` of tick 0.
        tick_ms: ``_time`` distance between ticks.
    """

    name = "marketing"
    CLICK_DELAY_TICKS: ClassVar[int] = 3
    ADS: ClassVar[int] = 20
    SCHEMAS: ClassVar[dict[str, pa.Schema]] = {
        "customers": pa.schema(
            [("id", pa.int64()), ("email", pa.string()), ("income", pa.int64())]
        ),
        "impressions": pa.schema(
            [
                ("id", pa.int64()),
                ("customer_id", pa.int64()),
                ("ad_id", pa.int64()),
                ("impression_time", pa.int64()),
            ]
        ),
        "clicks": pa.schema([("impression_id", pa.int64()), ("click_time", pa.int64())]),
        "leads": pa.schema(
            [
                ("id", pa.int64()),
                ("customer_id", pa.int64()),
                ("created_at", pa.int64()),
                ("converted_at", pa.int64()),
                ("conversion_amount", pa.int64()),
            ]
        ),
        "coupons": pa.schema(
            [
                ("id", pa.int64()),
                ("lead_id", pa.int64()),
                ("created_at", pa.int64()),
                ("amount", pa.int64()),
            ]
        ),
        "conversion_predictions": pa.schema(
            [
                ("lead_id", pa.int64()),
                ("experiment_bucket", pa.string()),
                ("predicted_at", pa.int64()),
                ("score", pa.float64()),
            ]
        ),
    }

    def __init__(
        self,
        seed: int = 0,
        customers: int = 100,
        impressions_per_tick: int = 10,
        leads_per_tick: int = 1,
        click_probability: float = 0.1,
        conversion_ticks: int = 30,
        *,
        start_time: int = 0,
        tick_ms: int = 1000,
    ) -> None:
        super().__init__(seed, start_time=start_time, tick_ms=tick_ms)
        self.customers = _check_int("customers", customers, 1, _MAX_COUNT)
        self.impressions_per_tick = _check_int(
            "impressions_per_tick", impressions_per_tick, 0, _MAX_COUNT
        )
        self.leads_per_tick = _check_int("leads_per_tick", leads_per_tick, 0, _MAX_COUNT)
        self.click_probability = _check_prob("click_probability", click_probability)
        self.conversion_ticks = _check_int("conversion_ticks", conversion_ticks, 1, 1 << 20)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "customers": self.customers,
            "impressions_per_tick": self.impressions_per_tick,
            "leads_per_tick": self.leads_per_tick,
            "click_probability": self.click_probability,
            "conversion_ticks": self.conversion_ticks,
        }

    def schemas(self) -> dict[str, pa.Schema]:
        return dict(self.SCHEMAS)

    # Per-lead attributes: pure functions of (seed, lead id).
    def _lead_customer(self, lid: pa.Array) -> pa.Array:
        return self._rng.integers("lead.customer", lid, 0, self.customers)

    def _lead_score(self, lid: pa.Array) -> pa.Array:
        return self._rng.uniform("lead.score", lid)

    def _lead_experiment(self, lid: pa.Array) -> pa.Array:
        return pc.greater(pc.modulo(lid, _i64(10)), _i64(1))

    def _lead_coupon(self, lid: pa.Array, score: pa.Array) -> pa.Array:
        return pc.and_(self._lead_experiment(lid), pc.less_equal(score, _f64(0.5)))

    def _tick(self, i: int, time: int) -> dict[str, pa.RecordBatch]:
        s, rng = self.SCHEMAS, self._rng
        out: dict[str, pa.RecordBatch] = {}
        if i == 0:
            cid = _iota(0, self.customers)
            email = _prefixed("customer", cid, "@email.com")
            income = rng.integers("customer.income", cid, 5_000_000, 10_000_000)
            _put(out, "customers", [_batch(s["customers"], [cid, email, income], time, 1)])

        n = self.impressions_per_tick
        if n:
            imp = _iota(i * n, n)
            cols = [
                imp,
                rng.integers("impression.customer", imp, 0, self.customers),
                rng.integers("impression.ad", imp, 0, self.ADS),
                _const(time, n),
            ]
            _put(out, "impressions", [_batch(s["impressions"], cols, time, 1)])
            # Clicks due now: impressions of the previous CLICK_DELAY_TICKS ticks.
            first = max(0, i - self.CLICK_DELAY_TICKS)
            if i > first and self.click_probability > 0:
                cand = _iota(first * n, (i - first) * n)
                shown = pc.divide(cand, _i64(n))  # tick the impression was shown (int division)
                delay = rng.integers("click.delay", cand, 1, self.CLICK_DELAY_TICKS + 1)
                due = pc.and_(
                    pc.less(rng.uniform("click", cand), _f64(self.click_probability)),
                    pc.equal(pc.add(shown, delay), _i64(i)),
                )
                clicked = cand.filter(due)
                cols = [clicked, _const(time, len(clicked))]
                _put(out, "clicks", [_batch(s["clicks"], cols, time, 1)])

        m = self.leads_per_tick
        if m:
            lid = _iota(i * m, m)
            customer = self._lead_customer(lid)
            score = self._lead_score(lid)
            nulls = pa.nulls(m, pa.int64())
            now = _const(time, m)
            new = [lid, customer, now, nulls, nulls]
            bucket = pc.if_else(self._lead_experiment(lid), _str("experiment"), _str("control"))
            _put(
                out,
                "conversion_predictions",
                [_batch(s["conversion_predictions"], [lid, bucket, now, score], time, 1)],
            )
            coupon = self._lead_coupon(lid, score)
            c_lid = lid.filter(coupon)
            c_amount = rng.integers("coupon.amount", c_lid, 500, 5000)
            c_now = _const(time, len(c_lid))
            _put(out, "coupons", [_batch(s["coupons"], [c_lid, c_lid, c_now, c_amount], time, 1)])
            _put(out, "leads", [_batch(s["leads"], new, time, 1), *self._conversions(i, time)])
        return out

    def _conversions(self, i: int, time: int) -> list[pa.RecordBatch]:
        """Lead updates due at tick ``i``: retract the unconverted row, insert the converted one."""
        m, rng = self.leads_per_tick, self._rng
        first = max(0, i - self.conversion_ticks)
        if i == first:
            return []
        lid = _iota(first * m, (i - first) * m)
        created_tick = pc.divide(lid, _i64(m))
        score = self._lead_score(lid)
        converted = pc.or_(
            pc.less(rng.uniform("lead.convert", lid), score),
            pc.and_(
                self._lead_coupon(lid, score),
                pc.less(rng.uniform("lead.convert2", lid), score),
            ),
        )
        delay = rng.integers("lead.delay", lid, 1, self.conversion_ticks + 1)
        due = pc.and_(converted, pc.equal(pc.add(created_tick, delay), _i64(i)))
        lid = lid.filter(due)
        k = len(lid)
        if not k:
            return []
        customer = self._lead_customer(lid)
        created_at = pc.add(
            pc.multiply(pc.divide(lid, _i64(m)), _i64(self.tick_ms)), _i64(self.start_time)
        )
        amount = rng.integers("lead.amount", lid, 1000, 25000)
        nulls = pa.nulls(k, pa.int64())
        schema = self.SCHEMAS["leads"]
        return [
            _batch(schema, [lid, customer, created_at, nulls, nulls], time, -1),
            _batch(schema, [lid, customer, created_at, _const(time, k), amount], time, 1),
        ]


# Nexmark's fixed vocabularies (Apache Beam / Flink Nexmark generators).
_NX_FIRST_NAMES = ("Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter")  # fmt: skip
_NX_LAST_NAMES = ("Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris")  # fmt: skip
_NX_STATES = ("AZ", "CA", "ID", "OR", "WA", "WY")
_NX_CITIES = ("Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland", "Bend", "Redmond", "Seattle", "Kent", "Cheyenne")  # fmt: skip
_NX_HOT_CHANNELS = ("Google", "Facebook", "Baidu", "Apple")
# Syllables standing in for Nexmark's random lower-case strings (nextString).
_NX_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


class Nexmark(LoadGenerator):
    """The Nexmark benchmark's event stream: persons, auctions and bids (append-only).

    Modelled on the Apache Beam / Flink Nexmark ``GeneratorConfig`` with its
    default parameters. Events are numbered ``n = 0, 1, 2, ...``; tick ``i``
    holds events ``i * events_per_tick .. (i + 1) * events_per_tick - 1``. Of
    every 50 consecutive events (``epoch = n // 50``, ``offset = n % 50``) offset
    0 is a person, offsets 1..3 are auctions and 4..49 are bids (1 : 3 : 46).
    Ids are dense and arithmetic on the event number, as in Nexmark:
    person id ``1000 + epoch``, auction id ``1000 + 3 * epoch + offset - 1``.

    Collections (times are int64 milliseconds in the ``_time`` unit):

    * ``persons(id, name, email_address, credit_card, city, state, date_time)``:
      name from Nexmark's first/last name lists, city and state (independently)
      from its US city/state lists, a 16-digit credit card in four groups.
    * ``auctions(id, item_name, description, initial_bid, reserve, date_time,
      expires, seller, category)``: ``initial_bid`` = ``nextPrice()``,
      ``reserve = initial_bid + nextPrice()``, ``category = 10 + random(5)``;
      the seller is, 3 times in 4, the latest "hot seller"
      (``(last person // 100) * 100``), else a uniformly drawn one of the 1,000
      most recent persons.
    * ``bids(auction, bidder, price, channel, url, date_time)``: the auction is,
      1 time in 2 (``HOT_AUCTION_RATIO``), the latest "hot auction"
      (``(last auction // 100) * 100``), else uniform among the 100 most recent
      auctions (``numInFlightAuctions``); the bidder is, 3 times in 4, the latest
      "hot bidder" (``(last person // 100) * 100 + 1``), else uniform among the
      1,000 most recent persons; ``price = nextPrice()``.

    ``nextPrice()`` is Nexmark's ``round(10 ** (random * 6) * 100)`` (cents, from
    100 to 10^8). An event's ``date_time`` is its tick's ``_time`` plus its
    position within the tick, ``(n % events_per_tick) * tick_ms // events_per_tick``,
    so event times rise with the event number as in Nexmark (whose inter-event
    delay is fixed by a rate instead). All updates are inserts (``_diff`` +1).

    Differences from the reference generator, on purpose:

    * Random draws are counter-based hashes of ``(seed, stream, event number)``,
      not a ``java.util.Random`` seeded per event: same distributions, other values.
    * No ``PERSON_ID_LEAD`` / ``AUCTION_ID_LEAD``: Nexmark may draw a bidder,
      seller or auction up to 10 ids *ahead* of the last one generated; here
      every reference is to a person or auction already generated (at the same
      tick or before). For the same reason the hot bidder is clamped to the last
      person (Nexmark's ``+ 1`` can name the next, not yet generated, person).
    * Strings are not Nexmark's random letters: ``email_address`` is
      ``<syllables><id>@<syllables>.com``, ``item_name`` is two syllables plus the
      auction id, ``description`` a fixed phrase with the category, and
      ``channel``/``url`` follow the Flink generator's shape (half the bids from
      its four "hot" channels, the rest ``channel-<k>``, ``k < 10000``) without
      its URL caching.
    * ``date_time`` and ``expires`` are int64 milliseconds, not timestamps; the
      auction length (``expires - date_time``) is uniform in
      ``[tick_ms, auction_ticks * tick_ms]`` rather than derived from the event rate.
    * No out-of-order delay, no reserve-driven auction closing, no ``extra`` padding column.

    Deterministic per seed; tick ``i`` is reproducible on its own; resume after
    the last emitted tick.

    Args:
        seed: Seed in ``[0, 2**64)``.
        events_per_tick: Events (persons + auctions + bids) per tick (>= 1).
        auction_ticks: Longest auction, in ticks (>= 1).
        start_time: ``_time`` of tick 0.
        tick_ms: ``_time`` distance between ticks.
    """

    name = "nexmark"
    FIRST_PERSON_ID: ClassVar[int] = 1000
    FIRST_AUCTION_ID: ClassVar[int] = 1000
    FIRST_CATEGORY_ID: ClassVar[int] = 10
    NUM_CATEGORIES: ClassVar[int] = 5
    PERSON_PROPORTION: ClassVar[int] = 1
    AUCTION_PROPORTION: ClassVar[int] = 3
    BID_PROPORTION: ClassVar[int] = 46
    TOTAL_PROPORTION: ClassVar[int] = 50
    HOT_AUCTION_RATIO: ClassVar[int] = 2  # 1 bid in 2 goes to the hot auction
    HOT_BIDDER_RATIO: ClassVar[int] = 4  # 3 bids in 4 come from the hot bidder
    HOT_SELLER_RATIO: ClassVar[int] = 4  # 3 auctions in 4 come from the hot seller
    HOT_ID_STRIDE: ClassVar[int] = 100  # hot ids are multiples of this (base-0)
    NUM_ACTIVE_PEOPLE: ClassVar[int] = 1000
    NUM_IN_FLIGHT_AUCTIONS: ClassVar[int] = 100
    CHANNELS: ClassVar[int] = 10_000
    SCHEMAS: ClassVar[dict[str, pa.Schema]] = {
        "persons": pa.schema(
            [
                ("id", pa.int64()),
                ("name", pa.string()),
                ("email_address", pa.string()),
                ("credit_card", pa.string()),
                ("city", pa.string()),
                ("state", pa.string()),
                ("date_time", pa.int64()),
            ]
        ),
        "auctions": pa.schema(
            [
                ("id", pa.int64()),
                ("item_name", pa.string()),
                ("description", pa.string()),
                ("initial_bid", pa.int64()),
                ("reserve", pa.int64()),
                ("date_time", pa.int64()),
                ("expires", pa.int64()),
                ("seller", pa.int64()),
                ("category", pa.int64()),
            ]
        ),
        "bids": pa.schema(
            [
                ("auction", pa.int64()),
                ("bidder", pa.int64()),
                ("price", pa.int64()),
                ("channel", pa.string()),
                ("url", pa.string()),
                ("date_time", pa.int64()),
            ]
        ),
    }
    _FIRST = pa.array(_NX_FIRST_NAMES, pa.string())
    _LAST = pa.array(_NX_LAST_NAMES, pa.string())
    _STATES = pa.array(_NX_STATES, pa.string())
    _CITIES = pa.array(_NX_CITIES, pa.string())
    _HOT_CHANNELS = pa.array(_NX_HOT_CHANNELS, pa.string())
    _SYLL = pa.array(_NX_SYLLABLES, pa.string())

    def __init__(
        self,
        seed: int = 0,
        events_per_tick: int = 1000,
        auction_ticks: int = 10,
        *,
        start_time: int = 0,
        tick_ms: int = 1000,
    ) -> None:
        super().__init__(seed, start_time=start_time, tick_ms=tick_ms)
        self.events_per_tick = _check_int("events_per_tick", events_per_tick, 1, _MAX_COUNT)
        self.auction_ticks = _check_int("auction_ticks", auction_ticks, 1, 1 << 20)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "events_per_tick": self.events_per_tick,
            "auction_ticks": self.auction_ticks,
        }

    def schemas(self) -> dict[str, pa.Schema]:
        return dict(self.SCHEMAS)

    # Nexmark's id arithmetic on event numbers (GeneratorConfig), vectorised.
    def last_person(self, n: pa.Array) -> pa.Array:
        """Base-0 id of the last person generated at or before each event number."""
        return pc.divide(n, _i64(self.TOTAL_PROPORTION))  # PERSON_PROPORTION == 1: offset 0

    def last_auction(self, n: pa.Array) -> pa.Array:
        """Base-0 id of the last auction generated at or before each event number (-1: none yet).

        For persons (offset 0) that is the previous epoch's last auction; for
        auctions their own id; for bids the epoch's third auction.
        """
        epoch = pc.divide(n, _i64(self.TOTAL_PROPORTION))
        offset = pc.subtract(pc.modulo(n, _i64(self.TOTAL_PROPORTION)), _i64(1))  # -1 for persons
        offset = pc.min_element_wise(offset, _i64(self.AUCTION_PROPORTION - 1))
        return pc.add(pc.multiply(epoch, _i64(self.AUCTION_PROPORTION)), offset)

    def _pick(self, stream: str, n: pa.Array, lo: pa.Array, count: pa.Array) -> pa.Array:
        """Per row, uniform in ``[lo, lo + count)`` (``count`` >= 1, an array)."""
        u = self._rng.uniform(stream, n)
        off = pc.floor(pc.multiply(u, count.cast(pa.float64()))).cast(pa.int64())
        return pc.add(lo, pc.min_element_wise(off, pc.subtract(count, _i64(1))))

    def _recent_person(self, stream: str, n: pa.Array) -> pa.Array:
        """Nexmark's nextBase0PersonId without the lead: one of the 1,000 latest persons."""
        people = pc.add(self.last_person(n), _i64(1))
        active = pc.min_element_wise(people, _i64(self.NUM_ACTIVE_PEOPLE))
        return self._pick(stream, n, pc.subtract(people, active), active)

    def _hot(self, stream: str, n: pa.Array, ratio: int) -> pa.Array:
        """True for the ``(ratio - 1) / ratio`` of rows that go to a hot id (``random(ratio) > 0``)."""
        return pc.greater(self._rng.integers(stream, n, 0, ratio), _i64(0))

    def _price(self, stream: str, n: pa.Array) -> pa.Array:
        """Nexmark's nextPrice: ``round(10 ** (random * 6) * 100)``."""
        e = pc.multiply(self._rng.uniform(stream, n), _f64(6.0))
        return pc.round(pc.multiply(pc.power(_f64(10.0), e), _f64(100.0))).cast(pa.int64())

    def _syllables(self, stream: str, n: pa.Array, k: int) -> pa.Array:
        parts = [
            pc.take(self._SYLL, self._rng.integers(f"{stream}.{j}", n, 0, len(self._SYLL)))
            for j in range(k)
        ]
        return pc.binary_join_element_wise(*parts, _str(""))

    def _choice(self, stream: str, n: pa.Array, values: pa.Array) -> pa.Array:
        return pc.take(values, self._rng.integers(stream, n, 0, len(values)))

    def _tick(self, i: int, time: int) -> dict[str, pa.RecordBatch]:
        e, s = self.events_per_tick, self.SCHEMAS
        n = _iota(i * e, e)
        offset = pc.modulo(n, _i64(self.TOTAL_PROPORTION))
        out: dict[str, pa.RecordBatch] = {}

        def when(ev: pa.Array) -> pa.Array:
            pos = pc.subtract(ev, _i64(i * e))
            return pc.add(pc.divide(pc.multiply(pos, _i64(self.tick_ms)), _i64(e)), _i64(time))

        # persons: offset 0
        pn = n.filter(pc.equal(offset, _i64(0)))
        if len(pn):
            pid = pc.add(self.last_person(pn), _i64(self.FIRST_PERSON_ID))
            name = pc.binary_join_element_wise(
                self._choice("person.first", pn, self._FIRST),
                self._choice("person.last", pn, self._LAST),
                _str(" "),
            )
            email = pc.binary_join_element_wise(
                self._syllables("person.email", pn, 2),
                pid.cast(pa.string()),
                _str("@"),
                self._syllables("person.domain", pn, 2),
                _str(".com"),
                _str(""),
            )
            groups = [
                pc.utf8_lpad(
                    self._rng.integers(f"person.card.{j}", pn, 0, 10000).cast(pa.string()), 4, "0"
                )
                for j in range(4)
            ]
            card = pc.binary_join_element_wise(*groups, _str(" "))
            cols = [
                pid,
                name,
                email,
                card,
                self._choice("person.city", pn, self._CITIES),
                self._choice("person.state", pn, self._STATES),
                when(pn),
            ]
            _put(out, "persons", [_batch(s["persons"], cols, time, 1)])

        # auctions: offsets 1 .. 3
        is_auction = pc.and_(
            pc.greater(offset, _i64(0)),
            pc.less_equal(offset, _i64(self.AUCTION_PROPORTION)),
        )
        an = n.filter(is_auction)
        if len(an):
            aid = pc.add(self.last_auction(an), _i64(self.FIRST_AUCTION_ID))
            last_p = self.last_person(an)
            hot_seller = pc.multiply(
                pc.divide(last_p, _i64(self.HOT_ID_STRIDE)), _i64(self.HOT_ID_STRIDE)
            )
            seller = pc.if_else(
                self._hot("auction.hot_seller", an, self.HOT_SELLER_RATIO),
                hot_seller,
                self._recent_person("auction.seller", an),
            )
            seller = pc.add(seller, _i64(self.FIRST_PERSON_ID))
            category = pc.add(
                self._rng.integers("auction.category", an, 0, self.NUM_CATEGORIES),
                _i64(self.FIRST_CATEGORY_ID),
            )
            initial = self._price("auction.initial", an)
            reserve = pc.add(initial, self._price("auction.reserve", an))
            dt = when(an)
            length = self._rng.integers(
                "auction.length", an, self.tick_ms, self.auction_ticks * self.tick_ms + 1
            )
            item = pc.binary_join_element_wise(
                self._syllables("auction.item", an, 2), aid.cast(pa.string()), _str(" ")
            )
            desc = pc.binary_join_element_wise(
                _str("item of category"), category.cast(pa.string()), _str(" ")
            )
            cols = [aid, item, desc, initial, reserve, dt, pc.add(dt, length), seller, category]
            _put(out, "auctions", [_batch(s["auctions"], cols, time, 1)])

        # bids: offsets 4 .. 49
        bn = n.filter(pc.greater(offset, _i64(self.AUCTION_PROPORTION)))
        if len(bn):
            last_a = self.last_auction(bn)
            hot_auction = pc.multiply(
                pc.divide(last_a, _i64(self.HOT_ID_STRIDE)), _i64(self.HOT_ID_STRIDE)
            )
            min_a = pc.max_element_wise(
                pc.subtract(last_a, _i64(self.NUM_IN_FLIGHT_AUCTIONS)), _i64(0)
            )
            cold_auction = self._pick(
                "bid.auction", bn, min_a, pc.add(pc.subtract(last_a, min_a), _i64(1))
            )
            auction = pc.if_else(
                self._hot("bid.hot_auction", bn, self.HOT_AUCTION_RATIO), hot_auction, cold_auction
            )
            last_p = self.last_person(bn)
            hot_bidder = pc.min_element_wise(
                pc.add(
                    pc.multiply(pc.divide(last_p, _i64(self.HOT_ID_STRIDE)), _i64(self.HOT_ID_STRIDE)),
                    _i64(1),
                ),
                last_p,
            )
            bidder = pc.if_else(
                self._hot("bid.hot_bidder", bn, self.HOT_BIDDER_RATIO),
                hot_bidder,
                self._recent_person("bid.bidder", bn),
            )
            chan_no = self._rng.integers("bid.channel", bn, 0, self.CHANNELS)
            hot_chan = pc.less(self._rng.uniform("bid.hot_channel", bn), _f64(0.5))
            channel = pc.if_else(
                hot_chan,
                pc.take(self._HOT_CHANNELS, pc.modulo(chan_no, _i64(len(_NX_HOT_CHANNELS)))),
                _prefixed("channel-", chan_no),
            )
            url = pc.binary_join_element_wise(
                _str("https://www.nexmark.com/"),
                self._syllables("bid.url", bn, 2),
                _str("/item.htm?query=1&channel_id="),
                chan_no.cast(pa.string()),
                _str(""),
            )
            cols = [
                pc.add(auction, _i64(self.FIRST_AUCTION_ID)),
                pc.add(bidder, _i64(self.FIRST_PERSON_ID)),
                self._price("bid.price", bn),
                channel,
                url,
                when(bn),
            ]
            _put(out, "bids", [_batch(s["bids"], cols, time, 1)])
        return out


GENERATORS: dict[str, type[LoadGenerator]] = {
    "counter": Counter,
    "auction": Auction,
    "marketing": Marketing,
    "nexmark": Nexmark,
}


def make_generator(name: str, **params: Any) -> LoadGenerator:
    """Build a generator by name (``"counter"``, ``"auction"``, ``"marketing"``, ``"nexmark"``).

    Args:
        name: A key of :data:`GENERATORS`.
        **params: Constructor parameters of that generator.

    Raises:
        InvalidInput: Unknown name or a bad parameter (a ``ValueError``).
    """
    cls = GENERATORS.get(name)
    if cls is None:
        raise InvalidInput(f"generator must be one of {sorted(GENERATORS)}, got {name!r}")
    try:
        return cls(**params)
    except TypeError as e:  # unknown keyword
        raise InvalidInput(f"{name}: {e}") from None


def iter_ticks(
    gen: LoadGenerator, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, dict[str, pa.RecordBatch]]]:
    """Yield ``(i, gen.tick(i))`` for ``i = start, start + 1, ...`` (up to ``stop``, exclusive).

    To resume a source exactly, pass ``start = last emitted tick + 1``.
    """
    _check_int("start", start, 0)
    if stop is not None:
        _check_int("stop", stop, 0)
    i = start
    while stop is None or i < stop:
        yield i, gen.tick(i)
        i += 1


def generate(gen: LoadGenerator, ticks: Iterable[int]) -> dict[str, pa.Table]:
    """Concatenate the updates of ``ticks`` (e.g. ``range(1000)``) per collection.

    Args:
        gen: A load generator.
        ticks: Tick numbers, in the order they should appear.

    Returns:
        ``{collection name: table}`` for every collection of ``gen.schemas()``, each
        with the update schema (possibly empty).
    """
    schemas = gen.update_schemas()
    parts: dict[str, list[pa.RecordBatch]] = {name: [] for name in schemas}
    for i in ticks:
        for name, batch in gen.tick(i).items():
            parts[name].append(batch)
    return {
        name: pa.Table.from_batches(parts[name], schema=schema) for name, schema in schemas.items()
    }

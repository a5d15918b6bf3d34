"""Machine: applies pure state transitions to one shard with compare-and-set.

Every attempt reads the head, runs the transition with a fresh `now_ms`, and
CASes `seqno + 1`. A lost CAS retries with a fresh head; the transition itself
decides what a lost *race* means (e.g. UpperMismatch), which is different from
a lost *CAS* (someone else wrote first, maybe something unrelated).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pyarrow as pa

from . import state as st
from .consensus import Consensus, VersionedData
from .errors import CasRetriesExhausted, SchemaMismatch, ShardNotFound

R = TypeVar("R")
T = TypeVar("T")

SHARD_PREFIX = "shard/"


def shard_key(shard_id: str) -> str:
    return SHARD_PREFIX + shard_id


class Machine:
    def __init__(self, consensus: Consensus, shard_id: str, clock: Callable[[], int]):
        self.consensus = consensus
        self.shard_id = shard_id
        self.key = shard_key(shard_id)
        self.clock = clock
        self.cas_retries = 0  # observable for tests and metrics

    def fetch(self) -> st.ShardState:
        head = self.consensus.head(self.key)
        if head is None:
            raise ShardNotFound(f"shard {self.shard_id}: does not exist (nothing was ever written to it)")
        s = st.ShardState.decode(
            head.data, f"shard {self.shard_id} seqno {head.seqno}", seqno=head.seqno, shard_id=self.shard_id
        )
        if s.seqno != head.seqno:
            s = replace(s, seqno=head.seqno)
        return s

    def fetch_or_init(self, schema: pa.Schema | None) -> st.ShardState:
        """The current state; creates the shard with `schema` if it does not exist yet."""
        while True:
            head = self.consensus.head(self.key)
            if head is not None:
                s = st.ShardState.decode(
                    head.data, f"shard {self.shard_id} seqno {head.seqno}", seqno=head.seqno, shard_id=self.shard_id
                )
                if schema is not None and not s.schema.equals(schema):
                    raise SchemaMismatch(
                        f"shard {self.shard_id}: opened with schema {_fmt(schema)}, but the shard's schema is {_fmt(s.schema)}"
                    )
                return s
            if schema is None:
                raise ShardNotFound(f"shard {self.shard_id}: does not exist; open a writer with a schema to create it")
            init = st.initial(self.shard_id, schema)
            if self.consensus.compare_and_set(self.key, None, VersionedData(0, init.encode())):
                return init

    def apply(
        self, transition: Callable[..., tuple[st.ShardState | None, R]], /, *args: Any, **kwargs: Any
    ) -> tuple[st.ShardState, R]:
        """Run `transition(state, *args, now_ms=<fresh clock>, **kwargs)` until its result is committed.

        `transition` is one of `state.py`'s pure transitions (or a function of the
        same shape). A result with no new state commits nothing. Returns the state
        the result holds in (the new one, or the head it was computed from).

        Example: `machine.apply(st.downgrade_since, reader_id, Frontier(5))`.
        """
        return self.apply_from(None, transition, *args, **kwargs)

    def apply_from(
        self,
        state: st.ShardState | None,
        transition: Callable[..., tuple[st.ShardState | None, R]],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[st.ShardState, R]:
        """`apply`, its first attempt on `state` (a head this call just fetched) instead of a new fetch.

        Saves a read of the head (a whole state version) when the caller has one in
        hand. If `state` is no longer the head, the compare-and-set loses and the next
        attempt fetches; a result with nothing to write holds at the read of `state`.
        """
        first: list[st.ShardState] = [state] if state is not None else []

        def attempt() -> tuple[st.ShardState, R] | None:
            cur = first.pop() if first else self.fetch()
            new, result = transition(cur, *args, now_ms=self.clock(), **kwargs)
            if new is None:
                return cur, result
            data, new = replace(new, seqno=cur.seqno + 1).encode_decoded()
            # Checked before it is written (a decode would check it; the cache then skips that).
            st.check_invariants(new)
            if self.consensus.compare_and_set(self.key, cur.seqno, VersionedData(new.seqno, data)):
                # The next fetch of these bytes (this writer's next append, a reader
                # of this process) is then not decoded again.
                st.remember(data, new)
                return new, result
            self.cas_retries += 1
            return None

        return cas_retry(attempt)


def cas_backoff(attempt: int) -> None:
    """Sleep a little before retry number `attempt` (1, 2, ...) of a lost compare-and-set.

    Jittered and exponential, capped at 50 ms, so racing writers do not livelock.
    """
    time.sleep(min(0.0005 * 2 ** min(attempt, 8), 0.05) * random.random())


def cas_retry(attempt: Callable[[], T | None], *, max_attempts: int | None = None) -> T:
    """The one compare-and-set loop: call `attempt()` until it returns a value, backing off in between.

    `attempt` reads the head, computes, and compare-and-sets; it returns None when
    its CAS lost (someone else wrote first), and anything else when it is done.
    With `max_attempts`, after that many lost attempts `CasRetriesExhausted` is
    raised (the caller turns it into its own error); without, it retries forever.

    Example:
        >>> n = iter([None, None, "done"])
        >>> cas_retry(lambda: next(n))
        'done'
    """
    lost = 0
    while True:
        out = attempt()
        if out is not None:
            return out
        lost += 1
        if max_attempts is not None and lost >= max_attempts:
            raise CasRetriesExhausted(f"lost {lost} compare-and-set races in a row")
        cas_backoff(lost)


def _fmt(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name} {f.type}" for f in schema) + ")"

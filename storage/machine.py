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
from typing import TypeVar

import pyarrow as pa

from . import state as st
from .consensus import Consensus, VersionedData
from .errors import SchemaMismatch, ShardNotFound

R = TypeVar("R")

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

    def apply(self, transition: Callable[[st.ShardState, int], tuple[st.ShardState | None, R]]) -> tuple[st.ShardState, R]:
        """Run `transition(state, now_ms)` until its result is committed (or it writes nothing).

        Returns the state the result holds in (the new one, or the head it was computed from).
        """
        attempt = 0
        while True:
            cur = self.fetch()
            new, result = transition(cur, self.clock())
            if new is None:
                return cur, result
            new = replace(new, seqno=cur.seqno + 1)
            if self.consensus.compare_and_set(self.key, cur.seqno, VersionedData(new.seqno, new.encode())):
                return new, result
            attempt += 1
            self.cas_retries += 1
            # Back off a little under contention so racing writers do not livelock.
            time.sleep(min(0.0005 * 2 ** min(attempt, 8), 0.05) * random.random())


def _fmt(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name} {f.type}" for f in schema) + ")"

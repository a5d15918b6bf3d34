"""The catalog: collection name -> {shard_id, schema, data_source, read_policy}, durable in consensus.

It lives under the consensus key `catalog` as one JSON document per version,
and every change is a compare-and-set of `seqno + 1`. Besides the collections
it holds `unfinalized_shards` (dropped, not yet finalized) and the controller
`epoch` that fences an older writer.

The transitions below are pure (`CatalogState -> ... -> CatalogState | None`,
None meaning "nothing to write"); `CatalogStore` applies them with CAS, checks
the epoch first, and retries a lost CAS with a fresh head.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pyarrow as pa

from ..consensus import Consensus, VersionedData
from ..errors import (
    AlterError,
    Fenced,
    IdentifierMissing,
    InvalidInput,
    SourceIdReused,
    StateCorrupt,
)
from ..ids import NAME_RULE, name_problem, shown_name
from ..machine import cas_retry
from ..state import seal, unseal
from ..updates import check_row_schema
from .policy import ReadPolicy, coerce_policy, policy_from_json, policy_to_json

CATALOG_KEY = "catalog"
CATALOG_VERSION = 1
_LEGACY_HEAD = b'{"collections":'  # versions written before checksums: sorted keys, no envelope
DATA_SOURCES = ("ingestion", "table", "webhook", "introspection", "view", "other")
SYSTEM_PREFIX = "system."

R = TypeVar("R")


def validate_name(name: Any, *, allow_system: bool = False) -> str:
    """A user collection name is `ids.NAME_RULE`; `system.<name>` is the controller's own."""
    why = name_problem(name)
    if why is None:
        return name
    if allow_system and isinstance(name, str) and name.startswith(SYSTEM_PREFIX):
        why = name_problem(name[len(SYSTEM_PREFIX):])
        if why is None:
            return name
    raise InvalidInput(f"collection name {shown_name(name)} is invalid ({why}): names must be {NAME_RULE}")


def schema_to_json(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_json(s: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s)))


@dataclass(frozen=True)
class CollectionDesc:
    """What a caller asks for: a collection `name` with a row `schema`.

    Args:
        name: `[a-z_][a-z0-9_]*`.
        schema: the row schema (no `_time`/`_diff`).
        data_source: who writes it: "ingestion" (a flow's sink), "table"
            (`append_table`), "webhook", "introspection" or "other" (e.g. the
            collection manager's `differential_write`).
        read_policy: None for the default, `lag_writes_by(1000, 1000)`.
        depends_on: input collections; this collection holds each of them at its
            own read frontier, so they stay readable wherever it is.
        definition: a view's SQL (data_source "view"); a re-create with other SQL is refused.
    """

    name: str
    schema: pa.Schema
    data_source: str = "other"
    read_policy: ReadPolicy | None = None
    depends_on: tuple[str, ...] = ()
    definition: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "depends_on", tuple(self.depends_on))
        if self.read_policy is not None:
            object.__setattr__(self, "read_policy", coerce_policy(self.read_policy))

    def same_as(self, other: CollectionDesc) -> bool:
        return (
            self.name == other.name
            and self.schema.equals(other.schema)
            and self.data_source == other.data_source
            and self.depends_on == other.depends_on
            and self.definition == other.definition
            and policy_to_json(self.read_policy) == policy_to_json(other.read_policy)
            and self.read_policy == other.read_policy
        )


@dataclass(frozen=True)
class CollectionMeta:
    """A collection as the catalog holds it.

    `read_policy` is None when the collection uses the default policy.
    """

    name: str
    shard_id: str
    schema: pa.Schema
    data_source: str
    read_policy: ReadPolicy | None
    depends_on: tuple[str, ...] = ()
    definition: str | None = None  # a view's SQL

    def to_json(self) -> dict[str, Any]:
        d = {
            "shard_id": self.shard_id,
            "schema": schema_to_json(self.schema),
            "data_source": self.data_source,
            "read_policy": policy_to_json(self.read_policy),
            "depends_on": list(self.depends_on),
        }
        if self.definition is not None:  # only when set: older catalogs encode unchanged
            d["definition"] = self.definition
        return d

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> CollectionMeta:
        return cls(
            name=name,
            shard_id=d["shard_id"],
            schema=schema_from_json(d["schema"]),
            data_source=d["data_source"],
            read_policy=policy_from_json(d.get("read_policy")),
            depends_on=tuple(d.get("depends_on", ())),
            definition=d.get("definition"),
        )

    def describes(self, desc: CollectionDesc) -> bool:
        """True iff re-creating `desc` is a no-op. The read policy is not compared:
        it is mutable through `set_read_policy`, and a re-create leaves it alone."""
        return (
            self.schema.equals(desc.schema)
            and self.data_source == desc.data_source
            and self.depends_on == desc.depends_on
            and self.definition == desc.definition
        )


@dataclass(frozen=True)
class CatalogState:
    seqno: int = -1  # -1: not written yet
    epoch: int = 0
    collections: Mapping[str, CollectionMeta] = field(default_factory=dict)
    unfinalized_shards: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """The stored form: canonical JSON (sorted keys) sealed with its sha256 (`storage.state.seal`)."""
        d = {
            "v": CATALOG_VERSION,
            "seqno": self.seqno,
            "epoch": self.epoch,
            "collections": {k: v.to_json() for k, v in sorted(self.collections.items())},
            "unfinalized_shards": list(self.unfinalized_shards),
        }
        return seal(json.dumps(d, separators=(",", ":"), sort_keys=True).encode())

    @classmethod
    def decode(cls, seqno: int, data: bytes) -> CatalogState:
        """Decode the catalog version `seqno`: checksum, fields, then `check_catalog`.

        Versions written before checksums (no envelope, no stored seqno) are still read.

        Raises:
            StateCorrupt: naming the catalog seqno (and the collection, where one is at fault).
        """
        where = f"catalog seqno {seqno}"
        try:
            d = json.loads(unseal(data, where, "catalog", _LEGACY_HEAD))
            if d.get("v") != CATALOG_VERSION:
                raise ValueError(f"unknown catalog version {d.get('v')!r}")
            cols = {}
            for k, v in d["collections"].items():
                try:
                    cols[k] = CollectionMeta.from_json(k, v)
                except Exception as e:  # noqa: BLE001
                    raise StateCorrupt(
                        f"{where}: collection {k!r} cannot be decoded ({type(e).__name__}: {e})"
                    ) from None
            state = cls(
                seqno=seqno,
                epoch=int(d["epoch"]),
                collections=cols,
                unfinalized_shards=tuple(d.get("unfinalized_shards", ())),
            )
            stored_seqno = d.get("seqno")  # absent in versions written before checksums
        except StateCorrupt:
            raise
        except Exception as e:  # noqa: BLE001 - any decoding failure is the same to the caller
            raise StateCorrupt(f"{where}: cannot decode ({type(e).__name__}: {e})") from None
        if stored_seqno is not None and stored_seqno != seqno:
            raise StateCorrupt(f"{where}: stored catalog says seqno {stored_seqno!r}, expected {seqno}")
        check_catalog(state, where)
        return state


def check_catalog(state: CatalogState, where: str) -> None:
    """Raise `StateCorrupt` if the catalog is not well formed (real checks, not `assert`).

    Every name is valid, every collection has a shard of its own and a known data
    source, every dependency exists, and the epoch is not negative.
    """
    if state.epoch < 0:
        raise StateCorrupt(f"{where}: epoch is {state.epoch}, expected >= 0")
    owners: dict[str, str] = {}
    for name, m in state.collections.items():
        try:
            validate_name(name, allow_system=True)
        except InvalidInput:
            raise StateCorrupt(f"{where}: collection name {name!r} is not a valid name") from None
        if not isinstance(m.shard_id, str) or not m.shard_id:
            raise StateCorrupt(f"{where}: collection {name!r} has shard id {m.shard_id!r}, expected a shard id")
        if m.shard_id in owners:
            raise StateCorrupt(
                f"{where}: collections {owners[m.shard_id]!r} and {name!r} both claim shard {m.shard_id}"
            )
        owners[m.shard_id] = name
        if m.data_source not in DATA_SOURCES:
            raise StateCorrupt(
                f"{where}: collection {name!r} has data source {m.data_source!r}, expected one of {list(DATA_SOURCES)}"
            )
        for dep in m.depends_on:
            if dep not in state.collections:
                raise StateCorrupt(f"{where}: collection {name!r} depends on {dep!r}, which is not in the catalog")
    for shard in state.unfinalized_shards:
        if shard in owners:
            raise StateCorrupt(
                f"{where}: shard {shard} is both dropped (unfinalized) and used by collection {owners[shard]!r}"
            )


def collection_of_shard(consensus: Consensus, shard_id: str) -> str | None:
    """The name of the collection whose shard is `shard_id` in the latest catalog, if any.

    For error messages (a corrupt shard state names its collection): None when
    there is no catalog, it is unreadable too, or no collection uses the shard.
    """
    try:
        h = consensus.head(CATALOG_KEY)
        if h is None:
            return None
        cat = CatalogState.decode(h.seqno, h.data)
    except Exception:  # noqa: BLE001 - only used to word another error
        return None
    for name, m in cat.collections.items():
        if m.shard_id == shard_id:
            return name
    return None


# ---- pure transitions ----


def plan_create(
    state: CatalogState, descs: Sequence[CollectionDesc], new_shard: Callable[[], str]
) -> tuple[CatalogState | None, list[CollectionMeta]]:
    """Add the collections in `descs`; return (new state or None if nothing is new, the new metas).

    Raises:
        SourceIdReused: one name with two descriptions in `descs`, or an existing
            name with a different description.
        IdentifierMissing: a `depends_on` names an unknown collection.
    """
    seen: dict[str, CollectionDesc] = {}
    for d in descs:
        prev = seen.get(d.name)
        if prev is not None and not prev.same_as(d):
            msg = f"collection {d.name!r}: created twice in one call with different descriptions"
            raise SourceIdReused(msg)
        seen[d.name] = d
    new: list[CollectionMeta] = []
    for d in seen.values():
        cur = state.collections.get(d.name)
        if cur is not None:
            if not cur.describes(d):
                msg = (
                    f"collection {d.name!r}: already exists with another description "
                    f"(exists: {_desc_str(cur.schema, cur.data_source, cur.depends_on)}; "
                    f"requested: {_desc_str(d.schema, d.data_source, d.depends_on)})"
                )
                raise SourceIdReused(msg)
            continue
        for dep in d.depends_on:
            if dep not in state.collections and dep not in seen:
                raise IdentifierMissing(f"collection {d.name!r}: depends on unknown collection {dep!r}")
            if dep == d.name:
                raise InvalidInput(f"collection {d.name!r}: cannot depend on itself")
        new.append(
            CollectionMeta(d.name, new_shard(), d.schema, d.data_source, d.read_policy, d.depends_on, d.definition)
        )
    if not new:
        return None, []
    cols = dict(state.collections)
    for m in new:
        cols[m.name] = m
    return replace(state, collections=cols), new


def _desc_str(schema: pa.Schema, data_source: str, depends_on: Iterable[str]) -> str:
    cols = ", ".join(f"{f.name} {f.type}{'' if f.nullable else ' not null'}" for f in schema)
    deps = list(depends_on)
    return f"({cols}) from {data_source}" + (f" depends_on {deps}" if deps else "")


def plan_drop(state: CatalogState, names: Sequence[str]) -> tuple[CatalogState, list[CollectionMeta]]:
    """Remove `names` and record their shards in `unfinalized_shards`.

    Raises:
        IdentifierMissing: a name is not in the catalog (nothing is dropped).
        InvalidInput: a remaining collection depends on one being dropped.
    """
    missing = [n for n in dict.fromkeys(names) if n not in state.collections]
    if missing:
        raise IdentifierMissing(f"cannot drop unknown collection(s) {missing}; nothing was dropped")
    drop = set(names)
    for m in state.collections.values():
        if m.name in drop:
            continue
        for dep in m.depends_on:
            if dep in drop:
                msg = f"cannot drop collection {dep!r}: collection {m.name!r} depends on it; drop both together"
                raise InvalidInput(msg)
    metas = [state.collections[n] for n in dict.fromkeys(names)]
    cols = {k: v for k, v in state.collections.items() if k not in drop}
    unfinalized = tuple(dict.fromkeys([*state.unfinalized_shards, *(m.shard_id for m in metas)]))
    return replace(state, collections=cols, unfinalized_shards=unfinalized), metas


def check_alter(name: str, old: pa.Schema, new: pa.Schema) -> None:
    """`new` must be `old` followed by nullable columns; anything else raises AlterError."""
    if not isinstance(new, pa.Schema):
        raise AlterError(f"collection {name!r}: new schema must be a pyarrow.Schema, got {type(new).__name__}")
    if len(new) < len(old):
        dropped = [n for n in old.names if n not in new.names]
        raise AlterError(f"collection {name!r}: columns cannot be removed (missing {dropped})")
    for i, f in enumerate(old):
        g = new.field(i)
        if g.name != f.name:
            raise AlterError(
                f"collection {name!r}: column {i} is {f.name!r}, the new schema has {g.name!r} "
                "(existing columns cannot be renamed or reordered)"
            )
        if not g.type.equals(f.type) or g.nullable != f.nullable:
            raise AlterError(
                f"collection {name!r}: column {f.name!r} is {f.type}{'' if f.nullable else ' not null'}, "
                f"the new schema says {g.type}{'' if g.nullable else ' not null'} (types cannot change)"
            )
    for g in list(new)[len(old) :]:
        if not g.nullable:
            raise AlterError(f"collection {name!r}: added column {g.name!r} must be nullable")
    check_row_schema(new, f"collection {name!r}")


def plan_alter(state: CatalogState, name: str, schema: pa.Schema) -> CatalogState | None:
    cur = state.collections.get(name)
    if cur is None:
        raise IdentifierMissing(f"cannot alter unknown collection {name!r}")
    check_alter(name, cur.schema, schema)
    if cur.schema.equals(schema):
        return None
    cols = dict(state.collections)
    cols[name] = replace(cur, schema=schema)
    return replace(state, collections=cols)


def plan_set_policies(state: CatalogState, policies: Mapping[str, ReadPolicy]) -> CatalogState | None:
    missing = [n for n in policies if n not in state.collections]
    if missing:
        raise IdentifierMissing(f"cannot set the read policy of unknown collection(s) {missing}")
    cols = dict(state.collections)
    changed = False
    for n, p in policies.items():
        stored = p if p.to_json() is not None else None  # in-memory-only policies are not stored
        if policy_to_json(cols[n].read_policy) != policy_to_json(stored):
            cols[n] = replace(cols[n], read_policy=stored)
            changed = True
    return replace(state, collections=cols) if changed else None


def plan_set_depends_on(state: CatalogState, name: str, depends_on: Sequence[str]) -> CatalogState | None:
    """Record that `name` is derived from `depends_on` (replacing what it was); None if unchanged.

    Raises:
        IdentifierMissing: `name` or an input is unknown.
        InvalidInput: `name` would depend on itself, directly or through its inputs.
    """
    cur = state.collections.get(name)
    if cur is None:
        raise IdentifierMissing(f"collection {name!r} does not exist")
    deps = tuple(dict.fromkeys(depends_on))
    for dep in deps:
        if dep not in state.collections:
            raise IdentifierMissing(f"collection {name!r}: depends on unknown collection {dep!r}")
    # INVARIANT: the catalog has no dependency cycles.
    todo, seen = list(deps), set()
    while todo:
        n = todo.pop()
        if n == name:
            raise InvalidInput(f"collection {name!r}: cannot depend on {list(deps)}: {n!r} is derived from {name!r}")
        if n not in seen:
            seen.add(n)
            todo.extend(state.collections[n].depends_on)
    if cur.depends_on == deps:
        return None
    cols = dict(state.collections)
    cols[name] = replace(cur, depends_on=deps)
    return replace(state, collections=cols)


def plan_finalized(state: CatalogState, shards: Iterable[str]) -> CatalogState | None:
    done = set(shards)
    left = tuple(s for s in state.unfinalized_shards if s not in done)
    return None if left == state.unfinalized_shards else replace(state, unfinalized_shards=left)


# ---- the store ----


class CatalogStore:
    """CAS access to the catalog for a controller at `epoch`.

    `apply(fn)` reads the head, refuses if a newer epoch took over (`Fenced`),
    runs `fn(state) -> (new | None, result)`, and CASes `seqno + 1`; a lost CAS
    retries with the fresh head (the transition re-validates against it).
    """

    def __init__(self, consensus: Consensus):
        self.consensus = consensus
        self._cache: CatalogState | None = None

    def head(self) -> CatalogState:
        h = self.consensus.head(CATALOG_KEY)
        if h is None:
            return CatalogState()
        c = self._cache
        if c is not None and c.seqno == h.seqno:
            return c
        c = CatalogState.decode(h.seqno, h.data)
        self._cache = c
        return c

    def check_epoch(self, epoch: int) -> CatalogState:
        s = self.head()
        if s.epoch > epoch:
            raise Fenced(f"catalog: controller epoch {epoch} was fenced by epoch {s.epoch}")
        return s

    def cas(self, cur: CatalogState, new: CatalogState) -> CatalogState | None:
        expected = None if cur.seqno < 0 else cur.seqno
        new = replace(new, seqno=cur.seqno + 1)
        if self.consensus.compare_and_set(CATALOG_KEY, expected, VersionedData(new.seqno, new.encode())):
            self._cache = new
            return new
        return None

    def apply(
        self, epoch: int | None, fn: Callable[[CatalogState], tuple[CatalogState | None, R]]
    ) -> tuple[CatalogState, R]:
        """Apply `fn` at `epoch` (None: do not check the epoch, e.g. to bump it)."""

        def attempt() -> tuple[CatalogState, R] | None:
            cur = self.head() if epoch is None else self.check_epoch(epoch)
            new, result = fn(cur)
            if new is None:
                return cur, result
            done = self.cas(cur, new)
            return None if done is None else (done, result)

        return cas_retry(attempt)

    def join_epoch(self) -> CatalogState:
        """Share the current epoch (creating the catalog at epoch 1 if there is none); fences no one."""
        s, _ = self.apply(None, lambda cur: (replace(cur, epoch=1), None) if cur.epoch == 0 else (None, None))
        return s

    def bump_epoch(self) -> CatalogState:
        """Take over: epoch = head epoch + 1 (creating the catalog if it does not exist)."""
        s, _ = self.apply(None, lambda cur: (replace(cur, epoch=cur.epoch + 1), None))
        return s

"""The storage controller: users name collections, not shards.

- **Catalog** (consensus key `catalog`, JSON, CAS-versioned): collection name ->
  `{shard_id, schema, data_source, read_policy, depends_on}`, plus
  `unfinalized_shards` and the controller `epoch`. Every call validates first and
  writes after; a call that fails changes nothing.
- **Frontiers**: a collection's write frontier is its shard's upper. Its implied
  capability is `read_policy.frontier(upper)` and never moves back. Its read
  capabilities are a `MutableAntichain` holding the implied capability, every
  `ReadHold`, and the read frontiers of the collections derived from it
  (`depends_on`); since is their minimum. Since goes to the shard's critical
  since handle (`opaque` = the controller epoch), and compaction follows.
- **Read policies**: `ValidFrom(f)`, `LagWriteFrontier(fn)` (in memory only: a
  Python function cannot be stored in the catalog), `lag_writes_by(lag,
  granularity)`, `Multiple([...])` (the minimum) and `step_back()` (upper - 1).
  The default is `lag_writes_by(1000, 1000)`: one second of history, in whole
  seconds, as Materialize's default compaction window.
- **Collection manager**: append-only collections (`monotonic_appender(name)`,
  one commit per batch duration) and differential collections
  (`differential_write(name, Append(rows) | Delete(filter_sql))`), whose desired
  state lives in a DuckDB file and which write `desired - persisted` at the
  upper, re-syncing from a snapshot at `upper - 1` after a lost race. Both tick
  idle uppers forward to now.
- **Introspection**: `system.frontiers`, `system.shard_mapping`,
  `system.statistics` (differential), `system.source_status_history`,
  `system.sink_status_history` (append-only); `introspection_shards()` names
  their shards for the query layer.
- **Read-only mode and fencing**: `open(client, read_only=True)` writes nothing;
  `allow_writes()` bumps the epoch and takes over (rebasing each since onto
  its shard's real since, and writing the differential corrections made
  while read-only at once); the previous writer gets `Fenced` at its next
  write and stops.
- **Tables**: `append_table(write_ts, advance_to, {name: rows})` commits all
  tables in one consensus transaction.

SUBTLE (fencing of data writes): the catalog and the critical since handles are
fenced by CAS. Data writes (appends, ticks, table appends) check the catalog
epoch just before they commit; a write racing the takeover inside that window
can still land, and the new writer's first differential write corrects it (it
re-syncs from the snapshot). Holds taken by a read-only controller only bind
that controller's own view: the shard's since is the writer's business until
`allow_writes()`, which rebases since onto the shard's, so holds taken after it
are readable (holds taken before it may stay below the shard's since).

Example:
    >>> import pyarrow as pa, storage, tempfile
    >>> from storage.controller import StorageController, CollectionDesc, Append
    >>> client = storage.open(tempfile.mkdtemp())
    >>> ctl = StorageController.open(client, tick_interval_ms=None, clock=lambda: 5000)
    >>> ctl.create_collections([CollectionDesc("kv", pa.schema([("k", pa.string())]), data_source="other")])
    >>> ctl.differential_write("kv", Append(pa.table({"k": ["a", "b"]})))
    Frontier(5000)
    >>> sorted(ctl.desired("kv").column("k").to_pylist())
    ['a', 'b']
    >>> ctl.frontiers("kv")
    (Frontier(4000), Frontier(5000))
    >>> ctl.close()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import storage

    from .catalog import CATALOG_KEY, DATA_SOURCES, CollectionDesc, CollectionMeta, validate_name
    from .collection_mgmt import Append, Delete, MonotonicAppender, Replace
    from .controller import StorageController
    from .holds import ReadHold
    from .introspection import FRONTIERS, SHARD_MAPPING, SINK_STATUS, SOURCE_STATUS, STATISTICS
    from .policy import (
        DEFAULT_POLICY,
        LagWriteFrontier,
        LagWritesBy,
        Multiple,
        MutableAntichain,
        ReadPolicy,
        StepBack,
        ValidFrom,
        lag_writes_by,
        step_back,
    )

# The names below are imported on first use (PEP 562): `read_catalog` (what `shardflow
# query` needs) loads the catalog module alone, not the controller and its collections.
_LAZY = {
    **dict.fromkeys(["CATALOG_KEY", "DATA_SOURCES", "CollectionDesc", "CollectionMeta", "validate_name"], "catalog"),
    **dict.fromkeys(["Append", "Delete", "MonotonicAppender", "Replace"], "collection_mgmt"),
    "StorageController": "controller",
    "ReadHold": "holds",
    **dict.fromkeys(["FRONTIERS", "SHARD_MAPPING", "SINK_STATUS", "SOURCE_STATUS", "STATISTICS"], "introspection"),
    **dict.fromkeys(["DEFAULT_POLICY", "LagWriteFrontier", "LagWritesBy", "Multiple", "MutableAntichain",
                     "ReadPolicy", "StepBack", "ValidFrom", "lag_writes_by", "step_back"], "policy"),
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


__all__ = [
    "CATALOG_KEY",
    "DATA_SOURCES",
    "DEFAULT_POLICY",
    "FRONTIERS",
    "SHARD_MAPPING",
    "SINK_STATUS",
    "SOURCE_STATUS",
    "STATISTICS",
    "Append",
    "CollectionDesc",
    "CollectionMeta",
    "Delete",
    "LagWriteFrontier",
    "LagWritesBy",
    "MonotonicAppender",
    "Multiple",
    "MutableAntichain",
    "ReadHold",
    "ReadPolicy",
    "Replace",
    "StepBack",
    "StorageController",
    "ValidFrom",
    "lag_writes_by",
    "read_catalog",
    "step_back",
    "validate_name",
]


def read_catalog(client: storage.Client) -> dict[str, str]:
    """Every collection's name -> shard id (`system.*` included), read straight from the catalog.

    No controller is opened: nothing is written, no epoch is joined or bumped, and
    no collection needs to be readable, so a tool that checks the collections one
    by one (`shardflow fsck`) can list them when a controller could not open.
    Raises what reading the catalog raises (e.g. `StateCorrupt` for a corrupt one);
    an empty dict when there is no catalog yet.
    """
    from .catalog import CatalogStore

    return {name: meta.shard_id for name, meta in CatalogStore(client.consensus).head().collections.items()}

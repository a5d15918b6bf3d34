"""shardflow flows: bytewax operators over `(row, time, diff)` updates, sinks into shards, and the job runner.

- `flows.operators`: `consolidate`, `sql` (items: `storage.UpdateBatch`, `storage.Progress`).
- `flows.sinks`: `persist_sink` (self-correcting), `append_sink` (blind appends).
- `flows.kafka_sink`: `kafka_sink`, a collection's changes to a Kafka topic with progress
  records (needs the `kafka` extra; not imported here).
- `flows.job`: load a flow file and run it in batch or continuous mode.

The names below are imported on first use (PEP 562): `import flows.cli` must not
load bytewax, so that `shardflow --help` and `shardflow query` start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .operators import FrontierTracker, consolidate, sql
    from .sinks import Committed, append_sink, persist_sink

_LAZY = {
    "FrontierTracker": "operators",
    "consolidate": "operators",
    "sql": "operators",
    "Committed": "sinks",
    "append_sink": "sinks",
    "persist_sink": "sinks",
}

__all__ = ["Committed", "FrontierTracker", "append_sink", "consolidate", "persist_sink", "sql"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

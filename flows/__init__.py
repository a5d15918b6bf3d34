"""shardflow flows: bytewax operators over `(row, time, diff)` updates, sinks into shards, and the job runner.

- `flows.operators`: `consolidate`, `sql` (items: `storage.UpdateBatch`, `storage.Progress`).
- `flows.sinks`: `persist_sink` (self-correcting), `append_sink` (blind appends).
- `flows.job`: load a flow file and run it in batch or continuous mode.
"""

from .operators import FrontierTracker, consolidate, sql
from .sinks import Committed, append_sink, persist_sink

__all__ = ["Committed", "FrontierTracker", "append_sink", "consolidate", "persist_sink", "sql"]

"""Startup stays lazy: `shardflow --help` loads no bytewax, `shardflow query` no controller,
bytewax or pyarrow.compute, unless it reads parts (timing is bench/query.py's; this guards the imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa

import storage
from storage.controller import CollectionDesc, StorageController

PROBE = """
import sys
from flows.cli import main
rc = main(sys.argv[1:])
heavy = [m for m in ("bytewax", "pyarrow.compute", "storage.controller.controller", "flows.operators") if m in sys.modules]
print("HEAVY", heavy, "RC", rc)
"""


def probe(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=False)
    return r.stdout.splitlines()[-1] if r.stdout else r.stderr


def test_help_imports_no_bytewax() -> None:
    r = subprocess.run([sys.executable, "-c", "import sys, flows.cli; print('bytewax' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_query_imports_nothing_heavy(tmp_path: Path) -> None:
    client = storage.open(tmp_path, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc("x", pa.schema([("k", pa.int64())]), data_source="other")])
    shard = ctl.collections()["x"].shard_id
    ctl.close()
    w = client.open_writer(shard, compact=False)
    u = client.state(shard).upper.time
    w.compare_and_append(pa.table({"k": [1, 2], "_time": [u, u], "_diff": [1, 1]}), u, u + 1)
    client.close()
    assert probe("query", "--data", str(tmp_path), "select 1") == "HEAVY [] RC 0"
    # A query over a collection reads its parts through pyarrow.dataset (which imports
    # pyarrow.compute): the views of a confined query may not open the store's files
    # themselves (README: Security).
    assert probe("query", "--data", str(tmp_path), "--format", "csv", "select count(*) from x") == \
        "HEAVY ['pyarrow.compute'] RC 0"


def test_lazy_names_still_import() -> None:
    import flows
    import storage.controller as sc

    assert callable(flows.persist_sink) and callable(flows.consolidate)
    assert sc.StorageController.__name__ == "StorageController" and callable(sc.step_back)

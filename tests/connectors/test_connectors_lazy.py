"""`import connectors` loads only the source contract: a flow pays for the connectors it uses."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import flows.job, connectors
heavy = [m for m in ("psycopg", "connectors.postgres", "connectors.files", "connectors.webhook",
                     "connectors.loadgen_source", "connectors.shard") if m in sys.modules]
print("HEAVY", heavy)
"""


def test_job_runner_imports_no_connector_it_does_not_use() -> None:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "HEAVY []"


def test_lazy_names_still_import() -> None:
    import connectors
    from connectors import FileSource, PostgresSource

    assert connectors.FileSource is FileSource and PostgresSource.__name__ == "PostgresSource"
    assert callable(connectors.split_errors) and callable(connectors.loadgen_sources)
    assert set(connectors.__all__) <= set(dir(connectors))

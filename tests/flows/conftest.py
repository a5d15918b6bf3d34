"""Helpers for flows tests: run a flow under run_main and a 2-worker cluster."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import cluster_main, run_main

RUNNERS: dict[str, Callable[[Dataflow], None]] = {
    "run_main": lambda f: run_main(f),
    "cluster2": lambda f: cluster_main(f, [], 0, worker_count_per_proc=2),
}


@pytest.fixture(params=sorted(RUNNERS))
def runner(request: pytest.FixtureRequest) -> Callable[[Dataflow], None]:
    return RUNNERS[request.param]

from flowtest_util import rows_of, upd  # noqa: E402,F401 - re-exported for older imports

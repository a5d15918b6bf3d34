"""Fixtures for the storage controller tests: a client, a settable clock, a controller."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ctl_helpers import Clock

import storage
from storage.controller import StorageController


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "data")


@pytest.fixture
def client(root: str, clock: Clock) -> Iterator[storage.Client]:
    c = storage.open(root, clock=clock, fsync=False)
    yield c
    c.close()


@pytest.fixture
def ctl(client: storage.Client, clock: Clock) -> Iterator[StorageController]:
    c = StorageController.open(client, clock=clock, tick_interval_ms=None, compact=False)
    yield c
    c.close()



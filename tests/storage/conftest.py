"""Fixtures shared by the storage tests (tests/storage/controller has its own `client`)."""

from __future__ import annotations

import pytest

import storage


@pytest.fixture
def client(tmp_path):  # noqa: ANN001, ANN201
    c = storage.open(tmp_path / "s", fsync=False)
    yield c
    c.wait_compaction(30)
    c.close()

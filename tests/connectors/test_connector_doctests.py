"""Docstring examples of connectors/ run in the suite (STYLE.md)."""

from __future__ import annotations

import doctest
import importlib
import os

import pytest

MODULES = ["connectors.loadgen_source", "connectors.files", "connectors.shard", "connectors.webhook"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", os.fspath(tmp_path))  # type: ignore[arg-type]
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0 and result.failed == 0

"""Docstring examples run in the suite (STYLE.md): every module under storage/."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil

import pytest

import storage


def _storage_modules() -> list[str]:
    names = ["storage"]
    for info in pkgutil.walk_packages(storage.__path__, prefix="storage."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _storage_modules())
def test_doctests(name: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # Examples use tempfile.mkdtemp(); keep what they write inside this test's tmp dir.
    monkeypatch.setenv("TMPDIR", os.fspath(tmp_path))  # type: ignore[arg-type]
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"

"""`pc`: pyarrow.compute, imported on first use.

pyarrow.compute builds a Python wrapper for each of its ~300 kernels on import
(~50 ms, a tenth of a short `shardflow query`), and most commands never call one.
The storage modules use `pc.<function>(...)` only, so a proxy is enough.
"""

from __future__ import annotations

from typing import Any


class _Compute:
    def __getattr__(self, name: str) -> Any:
        import pyarrow.compute

        return getattr(pyarrow.compute, name)


pc: Any = _Compute()

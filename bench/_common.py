"""Small shared helpers for benches: timing, RSS, summarising repeats, one-line ratios."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` then `t[0]` is the elapsed wall time in seconds."""
    out = [0.0]
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - t0


def repeat(fn: Callable[[], float], n: int) -> list[float]:
    """Run `fn` (returning seconds) `n` times; return all timings."""
    return [fn() for _ in range(max(1, n))]


def summarise(times: list[float], how: str = "best") -> float:
    """`best` (min) or `median` of timings."""
    if how == "best":
        return min(times)
    if how == "median":
        return statistics.median(times)
    raise ValueError(f"unknown summary {how!r} (best or median)")


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def fmt_rate(r: float, unit: str = "rows/s") -> str:
    return f"{r / 1e6:.2f}M {unit}" if r >= 1e6 else f"{r:,.0f} {unit}"


def ratio_line(label: str, ours: float, baseline: float, target: float | None = None) -> str:
    """`label: ratio 0.83 (target >= 0.7: OK)` for two rates where higher is better."""
    r = ours / baseline if baseline else float("nan")
    s = f"{label}: ratio {r:.2f}"
    if target is not None:
        s += f" (target >= {target}: {'OK' if r >= target else 'BELOW'})"
    return s


def machine() -> str:
    """One line about the machine the bench ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"

"""Durations for people (progress lines, ``daskem status``): no heavy imports, so that the CLI's
light commands can use it."""

from __future__ import annotations

import math


def format_seconds(seconds: float) -> str:
    """A duration for people: ``2.7 ms``, ``0.41 s``, ``36 s``, ``4 min 12 s``, ``2 h 05 min``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 0.1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"

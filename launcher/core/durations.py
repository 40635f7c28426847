"""Durations as people write and read them: `--deadline 6h` in, `2.31 h` out (one formatter for every command)."""

from __future__ import annotations

import re

from launcher.core.errors import FtlError

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'6h', '90m', '2d', '1h30m', '45s' or plain seconds -> seconds."""
    t = text.strip().lower().replace(" ", "")
    try:
        v = float(t)
        if v <= 0:
            raise ValueError
        return v
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(min|s|m|h|d)", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise FtlError(f"--deadline {text!r}: write a duration such as 6h, 90m, 2d or 1h30m")
    total = sum(float(a) * _UNITS[b] for a, b in parts)
    if total <= 0:
        raise FtlError(f"--deadline {text!r}: must be positive")
    return total


def format_duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.2f} h"
    return f"{s / 86400:.1f} days"

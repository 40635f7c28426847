"""Numbers for people: dates, durations, losses, FLOPs, bytes and money, one way everywhere the CLI shows them."""

from __future__ import annotations

import datetime as dt
import time

from launcher.core.files import iso_epoch


def sig4(x: float | None) -> str:
    """A loss or metric: 4 significant digits."""
    return "—" if x is None else f"{x:.4g}"


def clock(s: float | None) -> str:
    """A duration as a clock, M:SS or H:MM:SS (the bar's elapsed and ETA)."""
    if s is None:
        return "—"
    s = int(round(max(0.0, s)))
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def seconds(s: float | None) -> str:
    """A step or total time in the unit that reads best: ms, s, min, h, days."""
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def when(iso: str | None, now: float | None = None) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM UTC' (as state.json keeps it) with how long ago, within a week."""
    t = iso_epoch(iso)
    if t is None:
        return "—"
    now = time.time() if now is None else now
    stamp = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ago = now - t
    return f"{stamp} ({seconds(ago)} ago)" if 0 <= ago < 7 * 86400 else stamp


def flops(x: float | None) -> str:
    """FLOPs in G/T/P/E units."""
    if x is None:
        return "—"
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}FLOP"
    return f"{x:.3g} FLOP"


def gib1(n: int | float | None) -> str:
    """Bytes as GiB with one decimal."""
    return "—" if n is None else f"{n / 1024**3:,.1f} GiB"


def dollars(x: float | None) -> str:
    """Money in dollars and cents (under a cent: '<$0.01')."""
    if x is None:
        return "—"
    return "<$0.01" if 0 < x < 0.005 else f"${x:,.2f}"


def gpu_hours(x: float | None) -> str:
    """GPU-hours; a tiny amount (a CPU smoke run) as GPU-seconds or GPU-minutes rather than 2e-06."""
    if x is None:
        return "—"
    if x * 3600 < 120:
        return f"{x * 3600:.3g} GPU-s"
    if x < 2:
        return f"{x * 60:.3g} GPU-min"
    return f"{x:,.1f} GPU-h"


def rate(x: float | None, unit: str) -> str:
    """A throughput: 1.23k tok/s."""
    if x is None:
        return "—"
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{suffix} {unit}"
    return f"{x:.3g} {unit}"

"""Numbers as people read them, the same in the terminal, the report and notebooks."""

from __future__ import annotations

import datetime as dt

DASH = "—"


def sig(value: float | None) -> str:
    """Two significant digits, scientific below 1e-3 in magnitude (p-values, deviations);
    "0" for zero and a dash for a missing value."""
    if value is None:
        return DASH
    if value == 0:
        return "0"
    return f"{value:.2g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def fmt(value: float | None, spec: str | int = ".4f") -> str:
    """``format(value, spec)`` (an int: that many decimals), a dash for a missing value."""
    if value is None:
        return DASH
    return format(value, f".{spec}f" if isinstance(spec, int) else spec)


def timestamp(value: str | dt.datetime | None) -> str:
    """The one timestamp format, "2026-12-02 10:19:09 UTC" (seconds, no fraction): a datetime
    or an ISO string (naive = UTC, as run folders store it); a dash when missing."""
    if value is None:
        return DASH
    when = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"

"""Human-readable numbers for metrics and captions (decimal units, as GPU datasheets use)."""

from __future__ import annotations


def bytes_str(n: float) -> str:
    """1234567 -> '1.23 MB'. Decimal (SI) units, matching datasheets and the calculator's GB column."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def count_str(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"

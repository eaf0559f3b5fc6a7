"""Validation shared by the settings dataclasses: one message format for the common checks."""

from __future__ import annotations

import math
import numbers


def positive_ints(owner: object, *names: str) -> None:
    """Raise ValueError unless each named field of ``owner`` is an integer >= 1 (bools refused)."""
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{type(owner).__name__}.{name} must be an integer >= 1, got {value!r}")


def positive_numbers(owner: object, *names: str) -> None:
    """Raise ValueError unless each named field of ``owner`` is a finite number > 0."""
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{type(owner).__name__}.{name} must be a positive number, got {value!r}")

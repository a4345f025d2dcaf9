"""Checks of arguments, shared by the library: each failure is a ValueError naming the argument
and showing the value safely (a damaged checkpoint may hold a huge or deeply nested one)."""

from __future__ import annotations

import math
import numbers
import operator

__all__ = ["shown", "real", "checked_number", "checked_integer", "checked_count"]


def shown(value) -> str:
    """A short, safe rendering of ``value`` for an error message: numbers, None and short strings as
    written, anything else by its type (a damaged checkpoint may hold a huge or deeply nested value)."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, numbers.Integral):
        value = int(value)
        return repr(value) if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, numbers.Real):  # NumPy floats
        return repr(float(value))
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def real(value) -> float | None:
    """``value`` as a float when it is a real number (not a bool, not too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError):
        return None


_RULES = {
    "positive": ("a finite positive number", lambda v: math.isfinite(v) and v > 0),
    "non-negative": ("a finite non-negative number", lambda v: math.isfinite(v) and v >= 0),
    "fraction": ("a number in [0, 1)", lambda v: 0.0 <= v < 1.0),
}


def checked_number(name: str, value, rule: str, *, note: str = "") -> float:
    """``value`` as a float if it obeys ``rule`` ('positive', 'non-negative' or 'fraction'), else a
    ValueError naming ``name`` and the value: "lr must be a finite positive number, got inf"."""
    text, holds = _RULES[rule]
    number = real(value)
    if number is None or not holds(number):
        raise ValueError(f"{name} must be {text}{note}, got {shown(value)}")
    return number


def checked_integer(name: str, value, *, minimum: int) -> int:
    """``value`` as an int if it is an integer of at least ``minimum`` (NumPy integers too, bools
    not), else a ValueError naming ``name``: "seed must be a non-negative integer, got -1"."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer of at least {minimum}")
        raise ValueError(f"{name} must be {kind}, got {shown(value)}")
    return number


def checked_count(name: str, value) -> int:
    """``value`` as an int if it is a positive integer (NumPy integers too, bools not)."""
    return checked_integer(name, value, minimum=1)

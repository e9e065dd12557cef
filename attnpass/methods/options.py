"""Checks for method options, shared so every method words its errors the same way."""
from __future__ import annotations

import numbers


def check_int(method: str, name: str, value, minimum: int) -> None:
    """An int >= minimum (bool refused: True is not a cluster count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"method {method!r}: option {name}={value!r} must be an int >= {minimum}, "
                        f"got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"method {method!r}: option {name}={value!r} must be an int >= {minimum}")


def check_real(method: str, name: str, value, low: float, high: float, low_open: bool,
               high_open: bool = True) -> None:
    """A number in (low, high), [low, high), or with high included (NaN and bool refused)."""
    bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"method {method!r}: option {name}={value!r} must be a number in {bounds}, "
                        f"got {type(value).__name__}")
    above_low = value > low if low_open else value >= low
    below_high = value < high if high_open else value <= high
    if not (above_low and below_high):  # also refuses NaN
        raise ValueError(f"method {method!r}: option {name}={value!r} must be in {bounds}")


def check_known(method: str, options: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"method {method!r} got unknown option(s) {unknown}; it takes {list(known)}")


def check_choice(method: str, name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"method {method!r}: option {name}={value!r} must be one of {list(choices)}")

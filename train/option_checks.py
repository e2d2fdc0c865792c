"""Range checks for numeric command-line and config options, run before any model or data loads.

Python's float() accepts "nan" and "inf", and YAML configs can hold any type: every number a
training or data command takes goes through `check_number`, which raises one readable ValueError
naming the option, the allowed range and the value given.
"""

import math
import numbers


def check_number(name: str, value, *, integer: bool = False, low=None, high=None,
                 low_open: bool = False, high_open: bool = False):
    """`value` (as int or float) when it is a finite number in the range; ValueError otherwise.

    low/high are inclusive bounds unless low_open/high_open; None means unbounded.
    """
    wanted = _describe(integer, low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"--{name} must be {wanted}, got {value!r}")
    if integer:
        if isinstance(value, float) and not value.is_integer():  # also nan and inf
            raise ValueError(f"--{name} must be {wanted}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"--{name} must be {wanted}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"--{name} must be {wanted}, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _describe(integer, low, high, low_open, high_open) -> str:
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind

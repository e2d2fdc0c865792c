"""Checks of values that users and config files give: integers and finite reals within a range, choices.

Each check returns the value or raises ValueError("<name> must be ..., got <value>"), so a
command-line option, a config key and a Python argument get the same words. `problem` gives the
"must be ..., got ..." part alone (argparse puts the option's name in front itself).
"""

import math
import numbers


def _text(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_text(low)}, {_text(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_text(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_text(high)}"
    return ""


def problem(value, integer: bool, low=None, high=None, low_open: bool = False, high_open: bool = False) -> str | None:
    """What is wrong with `value` as an integer / finite real within [low, high] (a bound excluded
    when `low_open` / `high_open`), or None when nothing is."""
    kind = "an integer" if integer else "a finite number"
    wanted = f"must be {kind}{_range_text(low, high, low_open, high_open)}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        return wanted
    if not integer and not math.isfinite(value):
        return wanted
    if low is not None and (value <= low if low_open else value < low):
        return wanted
    if high is not None and (value >= high if high_open else value > high):
        return wanted
    return None


def number(name: str, value, integer: bool = False, low=None, high=None, low_open: bool = False,
           high_open: bool = False):
    """`value` as an int (`integer`: bools and floats refused) or a finite float (ints allowed, bools
    refused) within [low, high], a bound excluded when `low_open` / `high_open`."""
    found = problem(value, integer, low, high, low_open, high_open)
    if found:
        raise ValueError(f"{name} {found}")
    return int(value) if integer else float(value)


def integer(name: str, value, low=None, high=None) -> int:
    return number(name, value, True, low, high)


def real(name: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> float:
    return number(name, value, False, low, high, low_open, high_open)


def choice(name: str, value, choices):
    """`value` when it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value

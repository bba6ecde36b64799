"""Argument checks shared by every builder and command: one-line errors ending `Received: name=value`.

Python's bool is an int and NaN compares false with everything, so `isinstance(x, int)` and
`0 <= x < 1` alone let `classes=True` and `rate=nan` through: these helpers refuse both.
"""

import math
import numbers


def reason(error):
    """An exception as one line, `Type: message` (whitespace collapsed, the message cut at 300 characters)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def received(name, value):
    return f"Received: {name}={value!r}"


def integer(name, value, minimum=None, maximum=None):
    """`value` as an int (not a bool, not a float) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer. {received(name, value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be {bounds}. {received(name, value)}")
    return int(value)


def number(name, value, low=None, high=None, low_open=False, high_open=False):
    """`value` as a finite float within the interval; `*_open` excludes that end."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number. {received(name, value)}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = f"{'(' if low_open or low is None else '['}{'-inf' if low is None else low}, " \
                   f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}"
        raise ValueError(f"`{name}` must be in {interval}. {received(name, value)}")
    return float(value)


def boolean(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. {received(name, value)}")
    return value


def choice(name, value, options):
    if value not in options:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, options))}. {received(name, value)}")
    return value


def optional_str(name, value):
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{name}` must be a string or None. {received(name, value)}")
    return value

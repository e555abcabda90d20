"""The one exception type for expected failures (bad input, missing weights, limits).

Pages show `str(err)` as a short message; the CLI prints `error: <msg>` and exits 2.
Anything else is unexpected and gets logged with a reference.
"""
import math


class UserError(Exception):
    """An expected failure whose message tells the user what happened and how to fix it."""

class Cancelled(Exception):
    """Raised inside a job when the user pressed Cancel."""

def number_in(value, lo: float, hi: float, *, integer: bool = False) -> bool:
    """True when `value` is a real number (an int if `integer`; never a bool, NaN or a string) in [lo, hi].

    Settings arrive from widgets, the CLI and JSON rows in the workspace, so a type is never assumed.
    """

    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi

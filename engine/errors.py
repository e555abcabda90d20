"""The one exception type for expected failures (bad input, missing weights, limits).

Pages show `str(err)` as a short message; the CLI prints `error: <msg>` and exits 2.
Anything else is unexpected and gets logged with a reference.
"""


class UserError(Exception):
    """An expected failure whose message tells the user what happened and how to fix it."""


class Cancelled(Exception):
    """Raised inside a job when the user pressed Cancel."""

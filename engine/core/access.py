"""Who may do what when the app is shared with a room, and fair shares of the machine under load.

Roles without accounts: with TRANSFER_STUDIO_PRESENTER_PASSWORD set, a browser session is an
*audience member* until it gives that password; audience members browse, predict and generate, and
every destructive or costly action (delete, reset, import, training, downloads) asks for it. With no
password set there is one role, the machine's owner (a laptop needs no login). The password is read
from the environment only, compared in constant time, and never logged or written anywhere.

Fair sharing: per-session limits for what the audience may start (a sliding window of predictions
per minute, the upload size; a session runs one script at a time, so one generation in flight) and a
process-wide cap on generations running at once; a refusal says how long to wait instead of freezing the page.
"""
from __future__ import annotations

import hmac
import os
import threading
import time
from collections import deque

PASSWORD_ENV = "TRANSFER_STUDIO_PRESENTER_PASSWORD"

# audience limits (presenters and owners are not limited)
PREDICTIONS_PER_MINUTE = 30
AUDIENCE_UPLOAD_BYTES = 10 * 2**20  # per uploaded file
GENERATIONS_AT_ONCE = 4            # process-wide: more would only slow every one of them down on a small CPU


def password_set() -> bool:
    return bool(os.environ.get(PASSWORD_ENV))


def check_password(given: str) -> bool:
    """True when `given` is the presenter password (constant time; False when none is set)."""
    want = os.environ.get(PASSWORD_ENV, "")
    return bool(want) and hmac.compare_digest(given.encode("utf-8"), want.encode("utf-8"))


class RateLimit:
    """At most `limit` events per `window` seconds (a sliding window)."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self.times: deque[float] = deque()
        self.lock = threading.Lock()

    def wait_s(self, now: float | None = None) -> float:
        """0 if an event may happen now (and records it), else the seconds until one may."""
        now = time.monotonic() if now is None else now
        with self.lock:
            while self.times and now - self.times[0] >= self.window:
                self.times.popleft()
            if len(self.times) < self.limit:
                self.times.append(now)
                return 0.0
            return self.window - (now - self.times[0])


class Slots:
    """At most n holders at once; try() never blocks. Remembers how long a hold lasts, to say
    how long to wait when none is free."""

    def __init__(self, n: int):
        self.n, self.held = n, 0
        self.lock = threading.Lock()
        self.mean_s = 5.0  # until measured

    def try_acquire(self) -> bool:
        with self.lock:
            if self.held >= self.n:
                return False
            self.held += 1
            return True

    def release(self, seconds: float | None = None) -> None:
        with self.lock:
            self.held = max(0, self.held - 1)
            if seconds is not None:
                self.mean_s = 0.8 * self.mean_s + 0.2 * seconds

    def wait_hint_s(self) -> int:
        return max(1, round(self.mean_s))


GENERATION_SLOTS = Slots(GENERATIONS_AT_ONCE)

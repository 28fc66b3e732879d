"""Exim message ids (the 4.97+ format): TTTTTT-PPPPPPPPPPPP-FFFF in base 62.

T is the time in seconds, P the process id, F the fraction of the second in
units of 4 microseconds.  As Exim does, a process never hands out the same id
twice: if the clock has not moved on since the last id, the fraction is
bumped (Exim waits for the clock instead; bumping never stalls the hub).
"""
from __future__ import annotations

import re
import time

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FRACTION_UNITS = 250_000  # ids per second a single process can mint
MESSAGE_ID = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{11,12}-[0-9A-Za-z]{4}")


def base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def is_message_id(text: str) -> bool:
    return MESSAGE_ID.fullmatch(text) is not None


class MessageIdSource:
    """Hands out unique ids for one process (re-create it after fork)."""

    def __init__(self, pid: int) -> None:
        self._pid_digits = base62(pid, 12)
        self._last = (0, -1)
        self._seconds_digits = (-1, "")  # (seconds, their base-62 digits): minted once a second

    def next_id(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        seconds = int(now)
        fraction = int((now - seconds) * FRACTION_UNITS)
        last_seconds, last_fraction = self._last
        if seconds < last_seconds or (seconds == last_seconds and fraction <= last_fraction):
            seconds, fraction = last_seconds, last_fraction + 1
            if fraction >= FRACTION_UNITS:
                seconds, fraction = seconds + 1, 0
        self._last = (seconds, fraction)
        if self._seconds_digits[0] != seconds:
            self._seconds_digits = (seconds, base62(seconds, 6))
        return f"{self._seconds_digits[1]}-{self._pid_digits}-{base62(fraction, 4)}"

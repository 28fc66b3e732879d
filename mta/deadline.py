"""A connection's receive deadline, watched by one lazily re-armed timer.

`smtp_receive_timeout` bounds each line (Exim documents it so), and a
reply must leave within it too.  A gevent socket timeout would do that by
creating, starting and cancelling a `gevent.Timeout` around every blocking
recv and send: under smtp-source (one connection per message) that was a
tenth of a worker's CPU per message.  Here restarting the clock only stores
a number; the timer, armed once, finds the deadline moved when it fires and
re-arms itself for the rest, so it fires about once per timeout period of
an idle connection and never for a busy one.  When the deadline has truly
passed, it raises `socket.timeout` in the connection's greenlet, wherever
that greenlet is waiting (recv, send, TLS handshake).
"""
from __future__ import annotations

import socket
import time

import gevent


class Deadline:
    def __init__(self, seconds: float | None, greenlet: gevent.Greenlet | None = None) -> None:
        """`seconds` None or 0: no deadline.  `greenlet`: the one to
        interrupt (default: the caller's)."""
        self.seconds = seconds or None
        self.expires: float | None = 0.0
        self._greenlet = greenlet or gevent.getcurrent()
        self._timer = None

    def restart(self) -> None:
        """The full timeout again from now."""
        if self.seconds is None:
            return
        self.expires = time.monotonic() + self.seconds
        if self._timer is None:
            self._arm(self.seconds)

    def hold(self) -> None:
        """No interruption until the next `restart`: for waits on our own
        side (a commit), where giving up would leave the client unanswered
        about a message that may still reach the spool."""
        self.expires = None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _arm(self, seconds: float) -> None:
        self._timer = gevent.get_hub().loop.timer(seconds)
        self._timer.start(self._fire)

    def _fire(self) -> None:
        """In the hub: re-arm if the deadline moved, else interrupt."""
        self.cancel()
        if self.expires is None:  # held
            self._arm(self.seconds)
            return
        remaining = self.expires - time.monotonic()
        if remaining > 0:
            self._arm(remaining)
            return
        if not self._greenlet.dead:
            self._greenlet.throw(socket.timeout("no complete line within smtp_receive_timeout"))

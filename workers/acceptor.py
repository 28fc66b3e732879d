"""Accepting on a listener in turns, so that a connection is served by the
greenlet that accepted it.

The handler whose turn it is waits in accept(); when a connection comes it
passes the turn to another handler (an idle one, or a new one) and serves
the connection itself.  A dedicated accept loop handing each connection to
another greenlet made the banner wait for the hub's next loop iteration:
35-40 µs of the 170-210 µs a lone client waited for it.
"""
from __future__ import annotations

import os
import socket

import gevent.socket

from mta.log import Logs

ACCEPT_RETRY_DELAY = 0.1  # seconds after a failed accept() (EMFILE, ENOBUFS), as a pause before the retry


class Acceptor:
    """One inherited listening socket, as this worker accepts on it."""

    def __init__(self, listener: socket.socket, tls_on_connect: bool, logs: Logs) -> None:
        self.tls_on_connect = tls_on_connect
        self._socket = gevent.socket.socket(fileno=os.dup(listener.fileno()))
        self._logs = logs
        self._closed = False

    def accept(self) -> tuple[socket.socket, tuple] | None:
        """The next connection; None once `close` has been called (also
        while waiting: gevent wakes a waiter on a socket it closes)."""
        while not self._closed:
            try:
                return self._socket.accept()
            except OSError as exc:
                if self._closed:
                    break
                self._logs.main(f"accept() failed: {exc}")
                gevent.sleep(ACCEPT_RETRY_DELAY)
        return None

    def close(self) -> None:
        self._closed = True
        self._socket.close()

"""The receive deadline's timer, in a gevent hub (no server)."""
import socket
import time

import gevent
import gevent.socket
import pytest

from mta.deadline import Deadline


def _blocked_recv(deadline_seconds: float, during):
    """Run `during(deadline)` in a greenlet blocked in recv; (exception, seconds)."""
    left, right = gevent.socket.socketpair()
    outcome = {}

    def victim():
        deadline = Deadline(deadline_seconds)
        deadline.restart()
        gevent.spawn(during, deadline)
        started = time.monotonic()
        try:
            left.recv(10)
        except socket.timeout as exc:
            outcome["error"] = exc
        finally:
            deadline.cancel()
            outcome["seconds"] = time.monotonic() - started

    gevent.spawn(victim).join(5)
    left.close()
    right.close()
    return outcome.get("error"), outcome["seconds"]


def test_fires_once_the_deadline_has_passed():
    error, seconds = _blocked_recv(0.2, lambda deadline: None)
    assert isinstance(error, socket.timeout)
    assert 0.15 < seconds < 1.0


def test_restarting_moves_it_on():
    def keep_restarting(deadline):
        for _ in range(4):
            gevent.sleep(0.1)
            deadline.restart()

    error, seconds = _blocked_recv(0.2, keep_restarting)
    assert isinstance(error, socket.timeout)
    assert 0.5 < seconds < 1.5  # last restart at 0.4 s, + 0.2 s


def test_held_until_restarted():
    def hold_then_restart(deadline):
        deadline.hold()
        gevent.sleep(0.5)  # more than two periods held
        deadline.restart()

    error, seconds = _blocked_recv(0.2, hold_then_restart)
    assert isinstance(error, socket.timeout)
    assert 0.65 < seconds < 1.5


@pytest.mark.parametrize("seconds", [None, 0])
def test_no_timeout_never_fires(seconds):
    deadline = Deadline(seconds)
    deadline.restart()
    gevent.sleep(0.05)
    assert deadline._timer is None

"""The SMTP worker's pool of connection handlers (workers/handlers.py)."""
from __future__ import annotations

import gevent
import gevent.event

from workers.handlers import HandlerPool


def test_a_job_never_waits_for_a_busy_handler():
    pool = HandlerPool()
    release = gevent.event.Event()
    started = []
    for index in range(5):
        pool.submit(lambda index=index: (started.append(index), release.wait()))
    gevent.sleep(0.01)
    assert started == [0, 1, 2, 3, 4]
    assert pool.active == 5
    release.set()
    assert pool.drain(2)
    assert pool.active == 0


def test_a_finished_handler_serves_the_next_job():
    pool = HandlerPool()
    runners = []
    for _ in range(20):
        pool.submit(lambda: runners.append(gevent.getcurrent()))
        gevent.sleep(0)  # each job ends before the next arrives
    assert pool.drain(2)
    assert len(runners) == 20 and len(set(runners)) == 1


def test_idle_handlers_beyond_the_limit_end_after_a_burst():
    pool = HandlerPool(max_idle=3)
    release = gevent.event.Event()
    for _ in range(10):
        pool.submit(release.wait)
    gevent.sleep(0.01)
    release.set()
    gevent.sleep(0.01)
    assert pool.active == 0
    assert pool.handlers == 3
    for _ in range(3):
        pool.submit(gevent.sleep)
    gevent.sleep(0.01)
    assert pool.handlers == 3  # served by the idle ones, none spawned
    assert pool.drain(1)


def test_drain_gives_up_after_its_timeout_and_stops_what_is_left():
    pool = HandlerPool()
    stopped = []

    def stuck() -> None:
        try:
            gevent.sleep(60)
        finally:
            stopped.append(True)

    pool.submit(stuck)
    gevent.sleep(0)
    assert not pool.drain(0.05)
    gevent.sleep(0.01)
    assert stopped == [True]


def test_a_job_that_fails_does_not_stop_the_pool():
    pool = HandlerPool()
    pool.submit(lambda: 1 / 0)  # gevent prints its traceback; the handler ends
    gevent.sleep(0.01)
    assert pool.active == 0 and pool.handlers == 0
    done = []
    pool.submit(lambda: done.append(True))
    assert pool.drain(1)
    assert done == [True] and pool.active == 0

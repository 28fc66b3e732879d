"""Long-lived greenlets that serve one connection after another.

A greenlet spawned per connection gets a fresh interpreter data stack: an
mmap and a munmap of 16 KiB and a page fault every time, besides the
greenlet itself.  Under smtp-source (one connection per message) that was
about a tenth of a bare gevent loop's cost at 100 sessions.  Here a
handler that finishes a connection waits for the next one; a connection
never waits for a busy handler (a new one is spawned when none is idle),
and idle handlers beyond `max_idle` end, so a burst leaves nothing behind.
"""
from __future__ import annotations

from typing import Callable

import gevent
import gevent.event
import gevent.pool
import gevent.queue

Job = Callable[[], None]


class HandlerPool:
    def __init__(self, max_idle: int = 128) -> None:
        self.max_idle = max_idle
        self.active = 0
        self._idle = 0             # handlers waiting on the queue that no job is promised to yet
        self._jobs: gevent.queue.Queue = gevent.queue.Queue()
        self._greenlets = gevent.pool.Group()
        self._all_done = gevent.event.Event()
        self._all_done.set()

    @property
    def handlers(self) -> int:
        """Handler greenlets alive, busy or idle."""
        return len(self._greenlets)

    def submit(self, job: Job) -> None:
        """Run `job` in its own handler at once."""
        self.active += 1
        self._all_done.clear()
        if self._idle:
            self._idle -= 1
            self._jobs.put(job)
        else:
            self._greenlets.spawn(self._serve, job)

    def drain(self, timeout: float | None) -> bool:
        """Wait until every submitted job has finished (True) or `timeout`
        has passed (False); then end the idle handlers."""
        finished = self._all_done.wait(timeout)
        self._greenlets.kill(block=False)  # what is left is idle, or late past the timeout
        return finished

    def _serve(self, job: Job) -> None:
        while True:
            try:
                job()
            finally:
                self.active -= 1
                if not self.active:
                    self._all_done.set()
            if self._idle >= self.max_idle:
                return
            self._idle += 1
            job = self._jobs.get()

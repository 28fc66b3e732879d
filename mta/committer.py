"""Group commit: one greenlet per worker makes finished messages durable.

Sessions hand in an `IncomingMessage` and wait.  The committer takes every
message that arrived while the previous batch was syncing and commits them
together in gevent's thread pool (so fsync never blocks the hub): one fsync
per file, one rename each, one fsync of the spool directory for the batch.
No session gets its answer before its own batch is durable.
"""
from __future__ import annotations

import gevent
import gevent.event
from gevent.event import AsyncResult

from mta.spool import IncomingMessage, Spool, commit_batch


class GroupCommitter:
    def __init__(self, spool: Spool, method: str = "syncfs") -> None:
        self.spool = spool
        self.method = method
        self._waiting: list[tuple[IncomingMessage, AsyncResult]] = []
        self._wakeup = gevent.event.Event()
        self._greenlet = gevent.spawn(self._run)
        self.batches = 0
        self.messages = 0

    def commit(self, message: IncomingMessage) -> None:
        """Return once `message` is durable; raise the OSError if it is not."""
        result = AsyncResult()
        self._waiting.append((message, result))
        self._wakeup.set()
        error = result.get()
        if error is not None:
            raise error

    def _run(self) -> None:
        threadpool = gevent.get_hub().threadpool
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            batch, self._waiting = self._waiting, []
            if not batch:
                continue
            messages = [message for message, _ in batch]
            try:
                outcomes = threadpool.apply(commit_batch, (self.spool, messages, self.method))
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                outcomes = [exc] * len(batch)
            self.batches += 1
            self.messages += len(batch)
            for (_, result), outcome in zip(batch, outcomes):
                result.set(outcome)

    def close(self) -> None:
        self._greenlet.kill()

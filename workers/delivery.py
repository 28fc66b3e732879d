"""A queue runner's serving loop: `serve(ctx)` runs in the forked child.

Work arrives two ways: `{"queued": id}` datagrams from SMTP workers on this
runner's inbox (delivered at once, retry times ignored), and a scan of the
spool at start and every `queue_run_interval` (messages whose retry time
has come).  Up to `remote_max_parallel` messages are delivered at once, one
greenlet each.  Every runner scans the whole spool; the per-message flock in
`Deliverer.deliver` makes sure no message is delivered by two at once, and a
runner that dies mid-delivery loses nothing (the kernel drops its locks; its
journal says what was done).

On `ctx.stopping`: no new deliveries start, running ones finish, cached
SMTP connections are closed, and serve returns.
"""
from __future__ import annotations

import collections
import os
import traceback

import gevent
import gevent.event
import gevent.pool
import msgpack
from gevent import socket

from mta.delivery import Deliverer
from mta.delivery_config import compile_delivery
from mta.spool import Spool
from workers.context import WorkerContext

STATS_INTERVAL = 1.0
MAX_DATAGRAM = 65536


class QueueRunner:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        config = ctx.config
        self.spool = Spool(config.spool_directory)
        self.deliverer = Deliverer(config, compile_delivery(config), self.spool, ctx.logs,
                                   proxypool=ctx.shared.proxypool)
        self.deliverer.on_new_message = lambda message_id: self.enqueue(message_id, forced=True)
        self.pool = gevent.pool.Pool(max(config.remote_max_parallel, 1))
        self.urgent: collections.deque[str] = collections.deque()
        self.scanned: collections.deque[str] = collections.deque()
        self.queued: dict[str, bool] = {}          # id -> forced
        self.wakeup = gevent.event.Event()
        self.scans = 0

    # ------------------------------------------------------------ queueing

    def enqueue(self, message_id: str, forced: bool) -> None:
        if message_id in self.queued:
            if forced and not self.queued[message_id]:
                self.queued[message_id] = True
                self.urgent.append(message_id)
                self.wakeup.set()
            return
        if message_id in self.deliverer.in_flight and not forced:
            return
        self.queued[message_id] = forced
        (self.urgent if forced else self.scanned).append(message_id)
        self.wakeup.set()

    def _next(self) -> tuple[str, bool] | None:
        for queue in (self.urgent, self.scanned):
            while queue:
                message_id = queue.popleft()
                if message_id in self.queued:
                    return message_id, self.queued.pop(message_id)
        return None

    # ------------------------------------------------------------ loops

    def dispatch(self) -> None:
        while not self.ctx.stopping.is_set():
            item = self._next()
            if item is None:
                self.wakeup.clear()
                self.wakeup.wait(1.0)
                continue
            self.pool.wait_available()
            if self.ctx.stopping.is_set():
                return
            self.pool.spawn(self._deliver, *item)

    def _deliver(self, message_id: str, forced: bool) -> None:
        if message_id in self.deliverer.in_flight:
            return
        try:
            self.deliverer.deliver(message_id, forced)
        except Exception:  # noqa: BLE001 - a bug in one delivery is reported; the others go on
            self.ctx.logs.panic(f"queue runner {self.ctx.index}: delivery of {message_id} crashed "
                                f"(it stays in the spool):\n" + traceback.format_exc())

    def receive(self, inbox: socket.socket) -> None:
        while True:
            frame = inbox.recv(MAX_DATAGRAM)
            try:
                message = msgpack.unpackb(frame, raw=False)
            except (ValueError, msgpack.UnpackException):
                self.ctx.logs.panic(f"queue runner {self.ctx.index}: undecodable notification dropped")
                continue
            if isinstance(message, dict) and isinstance(message.get("queued"), str):
                self.enqueue(message["queued"], forced=True)

    def scan_periodically(self) -> None:
        interval = max(self.ctx.config.queue_run_interval, 0.1)
        while not self.ctx.stopping.is_set():
            self.scan()
            self.ctx.stopping.wait(interval)

    def scan(self) -> None:
        try:
            ids = self.spool.message_ids()
        except OSError as exc:
            self.ctx.logs.panic(f"queue runner {self.ctx.index}: cannot list the spool: {exc}")
            return
        self.scans += 1
        for message_id in ids:
            self.enqueue(message_id, forced=False)

    def housekeeping(self) -> None:
        while not self.ctx.stopping.is_set():
            self.deliverer.close_idle_connections()
            self.publish_stats()
            self.ctx.stopping.wait(STATS_INTERVAL)

    def publish_stats(self) -> None:
        counters = self.deliverer.counters
        stats = {
            "deliveries_in_flight": len(self.deliverer.in_flight),
            "queued": len(self.queued),
            "scans": self.scans,
            "delivered": counters["delivered"],
            "deferred": counters["deferred"],
            "failed": counters["failed"],
            "bounces": counters["bounces"],
            "completed": counters["completed"],
            "idle_connections": len(self.deliverer.services.connections),
            "hosts_in_retry": len(self.deliverer.services.host_retry),
            "delivery_latency": self.deliverer.latency.snapshot(),
        }
        pool = self.ctx.shared.proxypool
        if pool is not None:
            stats["socks_proxies"] = [dict(row, down_until=row["down_until"] or 0) for row in pool.snapshot()]
        self.ctx.stats.update(stats)


def serve(ctx: WorkerContext) -> None:
    """Run a queue runner until ctx.stopping is set and in-flight work is done."""
    runner = QueueRunner(ctx)
    inbox = _inbox(ctx)
    loops = [gevent.spawn(runner.housekeeping), gevent.spawn(runner.scan_periodically)]
    if inbox is not None:
        loops.append(gevent.spawn(runner.receive, inbox))
    dispatcher = gevent.spawn(runner.dispatch)
    try:
        ctx.stopping.wait()
        runner.wakeup.set()
        dispatcher.join()
        runner.pool.join()
    finally:
        gevent.killall(loops)
        runner.deliverer.close()
        runner.publish_stats()
        if inbox is not None:
            inbox.close()


def _inbox(ctx: WorkerContext) -> socket.socket | None:
    """Our notification socket as a gevent socket (on a duplicate descriptor)."""
    if len(ctx.runner_inboxes) < ctx.index:
        return None
    return socket.socket(fileno=os.dup(ctx.runner_inboxes[ctx.index - 1].fileno()))

"""The metrics worker: answers `GET /metrics` on the `metrics_listen` socket.

A worker like the others (forked and supervised by the master, heartbeat,
unprivileged, replaced on reload), so that the master itself never serves a
connection.  Each scrape reads the status files the master and the workers
rewrite every second (see workers/metrics.py); HTTP/1.0, one request per
connection, a few clients at once, each bounded by a timeout.
"""
from __future__ import annotations

import os
import socket
from typing import Callable

import gevent.pool
import gevent.server
import gevent.socket

from workers import status_files
from workers.context import WorkerContext
from workers.metrics import render

REQUEST_TIMEOUT = 5.0
MAX_HEAD = 8192
MAX_CLIENTS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def serve(ctx: WorkerContext) -> None:
    ctx.stats["scrapes"] = 0
    listener = gevent.socket.socket(fileno=os.dup(ctx.listeners[0][0].fileno()))
    server = gevent.server.StreamServer(listener, lambda sock, _: _answer(ctx, sock),
                                        spawn=gevent.pool.Pool(MAX_CLIENTS))
    server.start()
    ctx.stopping.wait()
    server.stop(timeout=REQUEST_TIMEOUT)


def _answer(ctx: WorkerContext, sock: socket.socket) -> None:
    sock.settimeout(REQUEST_TIMEOUT)
    try:
        head = _read_head(sock)
        sock.sendall(http_response(head, lambda: scrape(ctx)))
    except OSError as exc:  # timeouts included: the client went away or stalled
        ctx.stats["scrape_errors"] = ctx.stats.get("scrape_errors", 0) + 1
        if not isinstance(exc, (TimeoutError, ConnectionError)):
            ctx.logs.panic(f"metrics: {exc}")
    finally:
        sock.close()


def _read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_HEAD:
        chunk = sock.recv(MAX_HEAD - len(head))
        if not chunk:
            break
        head += chunk
    return head


def scrape(ctx: WorkerContext) -> str:
    config = ctx.config
    ctx.stats["scrapes"] += 1
    master = status_files.master_status(config)
    statuses = status_files.worker_statuses(master)
    if not all(statuses.values()):
        # A worker that has just exited: the master rewrote its status (counting
        # the worker as retired) before removing the worker's file.  (Or one
        # that is starting, and is read once more for nothing.)
        master = status_files.master_status(config)
        statuses = status_files.worker_statuses(master)
    return render(master, statuses, status_files.queue_size(config), status_files.ratelimit_fill(config),
                  ctx.shared.proxypool.snapshot())


def http_response(head: bytes, body_of: Callable[[], str]) -> bytes:
    """The whole HTTP/1.0 response to a request head; `body_of` is called
    only for a request for /metrics."""
    words = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
    if len(words) != 3 or not words[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", "bad request\n")
    method, target = words[0], words[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", "only GET\n", extra="Allow: GET, HEAD\r\n")
    if target == b"/metrics":
        return _response("200 OK", body_of(), CONTENT_TYPE, include_body=method == b"GET")
    if target == b"/":
        return _response("200 OK", "mta-server metrics: /metrics\n", include_body=method == b"GET")
    return _response("404 Not Found", "not found\n")


def _response(status: str, body: str, content_type: str = "text/plain; charset=utf-8",
              extra: str = "", include_body: bool = True) -> bytes:
    payload = body.encode()
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
            f"{extra}Connection: close\r\n\r\n")
    return head.encode() + (payload if include_body else b"")

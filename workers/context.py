"""What the master hands to every worker it forks."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import gevent.event

from mta.config import Config
from mta.log import Logs


@dataclass
class SharedState:
    """Cross-process regions created by the master before forking.

    Attributes are filled by the master; a worker uses only what it needs.
    `ratetable`: shared.ratetable.RateTable (file-backed, survives restarts)
    `conncounts`: shared.conncount.ConnCounts (one slot per SMTP worker)
    `proxypool`: shared.proxypool.ProxyPool (SOCKS5 proxy health)
    """

    ratetable: Any = None
    conncounts: Any = None
    proxypool: Any = None
    conncounts_slots: int = 0


@dataclass
class WorkerContext:
    kind: str                       # "smtp" or "delivery"
    index: int                      # 1-based, stable across respawns (slot number)
    generation: int                 # bumped by every successful reload
    config: Config
    logs: Logs
    shared: SharedState
    runner_inboxes: list[socket.socket] = field(default_factory=list)
    """Datagram sockets: an SMTP worker sends msgpack {"queued": id} frames to
    them; a queue runner receives on runner_inboxes[index - 1]."""
    listeners: list[tuple[socket.socket, bool]] = field(default_factory=list)
    """(listening socket, tls_on_connect) for SMTP workers."""
    stopping: gevent.event.Event = field(default_factory=gevent.event.Event)
    """Set on a graceful stop: accept no new work, finish what runs, return."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Published to the heartbeat file every second for `mta-server status`."""
    cpu: int | None = None
    """The CPU an SMTP worker is bound to (`smtp_worker_cpu_affinity`), if any."""

"""A thousand connections that send nothing or a byte a second.

Other clients still get a banner and deliver; every flooding connection is
closed with 421 at `smtp_receive_timeout` (per line, so trickling does not
help); connections from a `hosts_proxy` host that send no PROXY header get
their banner once `proxy_protocol_timeout` has passed.  The server is
started with a soft descriptor limit of 1024: the master raises it.
"""
from __future__ import annotations

import resource
import selectors
import smtplib
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

from reliability_helpers import wait_until
from test_smtp_server import MESSAGE

RECEIVE_TIMEOUT = 4.0
PROXY_TIMEOUT = 1.0
SILENT, TRICKLING, PROXY_SILENT = 500, 400, 100
PROXY_HOST = "127.0.0.3"
TRICKLE = b"NOOP\r\n"


@dataclass
class FloodConnection:
    sock: socket.socket
    kind: str
    opened: float
    received: bytes = b""
    first_reply: float | None = None
    closed: float | None = None
    sent: int = 0


@dataclass
class Flood:
    port: int
    connections: list[FloodConnection] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def open(self, kind: str, count: int, source: str) -> None:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10, source_address=(source, 0))
            sock.setblocking(False)
            self.connections.append(FloodConnection(sock, kind, time.monotonic()))

    def trickle(self) -> None:
        """One byte a second to every trickling connection still open."""
        while not self.stop.wait(1.0):
            for connection in self.connections:
                if connection.kind == "trickling" and connection.closed is None:
                    self._send_one_byte(connection)

    @staticmethod
    def _send_one_byte(connection: FloodConnection) -> None:
        byte = TRICKLE[connection.sent % len(TRICKLE): connection.sent % len(TRICKLE) + 1]
        try:
            connection.sent += connection.sock.send(byte)
        except OSError:
            connection.closed = connection.closed or time.monotonic()

    def read_until_closed(self, deadline: float) -> None:
        """Read every connection until the server closes it (or the deadline)."""
        selector = selectors.DefaultSelector()
        for connection in self.connections:
            selector.register(connection.sock, selectors.EVENT_READ, connection)
        while len(selector.get_map()) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                connection = key.data
                if self._read(connection):
                    continue
                selector.unregister(connection.sock)
        selector.close()

    @staticmethod
    def _read(connection: FloodConnection) -> bool:
        """False once the connection is closed."""
        try:
            data = connection.sock.recv(4096)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            data = b""
        if data and connection.first_reply is None:
            connection.first_reply = time.monotonic()
        connection.received += data
        if not data:
            connection.closed = time.monotonic()
            return False
        return True

    def close(self) -> None:
        self.stop.set()
        for connection in self.connections:
            connection.sock.close()


def send_messages(port: int, count: int) -> list[float]:
    """Seconds per message (connect, banner, EHLO, one message, QUIT)."""
    durations = []
    for _ in range(count):
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as smtp:
            smtp.ehlo("good.example")
            smtp.sendmail("a@example.org", ["u@localhost"], MESSAGE)
        durations.append(time.monotonic() - started)
    return durations


def start_with_low_fd_limit(mta, extra: str, workers: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        return mta(extra, workers=workers)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limit(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as handle:
        row = next(line for line in handle if line.startswith("Max open files"))
    return tuple(row.split()[3:5])


def test_thousand_silent_and_trickling_connections(mta, report):
    server = start_with_low_fd_limit(mta, f"""
smtp_accept_max = 3000
smtp_receive_timeout = {RECEIVE_TIMEOUT:g}s
hosts_proxy = {PROXY_HOST}
proxy_protocol_timeout = {PROXY_TIMEOUT:g}s
""", workers=2)
    for pid in server.worker_pids("smtp"):
        soft, hard = open_files_limit(pid)
        assert soft == hard, "the master did not raise the descriptor limit"
    quiet = send_messages(server.port, 10)

    flood = Flood(server.port)
    flood.open("silent", SILENT, "127.0.0.1")
    flood.open("trickling", TRICKLING, "127.0.0.1")
    flood.open("proxy, no header", PROXY_SILENT, PROXY_HOST)
    trickler = threading.Thread(target=flood.trickle, daemon=True)
    trickler.start()
    reader = threading.Thread(target=flood.read_until_closed,
                              args=(time.monotonic() + RECEIVE_TIMEOUT + PROXY_TIMEOUT + 15,), daemon=True)
    reader.start()
    try:
        flooded = send_messages(server.port, 10)
        reader.join()
    finally:
        flood.close()

    by_kind: dict[str, list[FloodConnection]] = {}
    for connection in flood.connections:
        by_kind.setdefault(connection.kind, []).append(connection)
    still_open = [c for c in flood.connections if c.closed is None]
    assert still_open == [], f"{len(still_open)} flooding connections never closed"
    for kind, connections in by_kind.items():
        assert all(c.received.startswith(b"220 ") for c in connections), f"{kind}: no banner"
        assert all(b"421 " in c.received for c in connections), f"{kind}: closed without 421"
    proxied = by_kind["proxy, no header"]
    assert all(c.first_reply - c.opened >= PROXY_TIMEOUT * 0.9 for c in proxied)
    assert "PROXY protocol failure" in server.log()
    assert wait_until(lambda: sum(s["stats"].get("connections", 0) for s in server.worker_statuses("smtp")) == 0,
                      5), "connection counts did not return to zero"

    def lifetimes(kind: str) -> str:
        spans = [c.closed - c.opened for c in by_kind[kind]]
        return f"{min(spans):.1f}-{max(spans):.1f}s"

    banner_waits = [c.first_reply - c.opened for c in proxied]
    print(f"\nper message: {statistics.median(quiet) * 1000:.0f} ms quiet, "
          f"{statistics.median(flooded) * 1000:.0f} ms under the flood; silent closed after {lifetimes('silent')}, "
          f"trickling after {lifetimes('trickling')}; proxy banner after {min(banner_waits):.1f}-"
          f"{max(banner_waits):.1f}s")
    report("1000 idle/trickling conns", f"{SILENT} silent + {TRICKLING} 1 byte/s + {PROXY_SILENT} proxy w/o header",
           len(flood.connections), 0,
           f"10 msgs delivered meanwhile ({statistics.median(flooded) * 1000:.0f} ms vs "
           f"{statistics.median(quiet) * 1000:.0f} ms); closed at {lifetimes('silent')}/{lifetimes('trickling')}")

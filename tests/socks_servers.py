"""Real SOCKS5 servers (danted, microsocks) and small destinations for tests, on loopback.

    proxy = start_danted(tmp_path, auth=True)      # Server(host, port, stop)
    proxy = start_microsocks(auth=False)
    dest = start_banner_server()                   # sends "220 test\\r\\n", echoes lines
    silent = start_silent_listener()               # accepts TCP, never says a word
    port = closed_port()                           # nothing listens there
    ...
    proxy.stop()

danted's `socksmethod: username` checks system passwords, so auth=True creates
(once) the system user TEST_USER with TEST_PASSWORD; that needs root.
Waits use gevent.sleep, so a gevent server in the same test process keeps running.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gevent
from gevent import socket as gsocket
from gevent.server import StreamServer

from harness import free_port

TEST_USER = "mtasockstest"
TEST_PASSWORD = "s3cret-pw"
MICROSOCKS_USER = "mtauser"
MICROSOCKS_PASSWORD = "mtapass"
DANTED = shutil.which("danted") or "/usr/sbin/danted"
MICROSOCKS = shutil.which("microsocks") or "/usr/bin/microsocks"
START_TIMEOUT = 10.0


@dataclass
class Server:
    """A running server; `stop()` is idempotent.  `peers` lists client addresses (banner server)."""

    host: str
    port: int
    stop: Callable[[], None]
    log_path: Path | None = None
    peers: list[tuple] = field(default_factory=list)


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on which nothing listens (bound and released: connect gets RST)."""
    return free_port(host)


def ensure_test_user(user: str = TEST_USER, password: str = TEST_PASSWORD) -> None:
    """Create the system user danted authenticates against (if missing) and set its password."""
    if subprocess.run(["id", "-u", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                       check=True, capture_output=True)
    subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True,
                   capture_output=True)


def danted_config(port: int, auth: bool, log_path: Path, block_port: int | None = None) -> str:
    """danted.conf for 127.0.0.1:port; block_port makes CONNECTs to that port fail with REP 2."""
    block = (f"socks block {{ from: 127.0.0.0/8 to: 0.0.0.0/0 port = {block_port} }}\n"
             if block_port else "")
    return (
        f"logoutput: {log_path}\n"
        f"internal: 127.0.0.1 port = {port}\n"
        "external: 127.0.0.1\n"
        f"socksmethod: {'username' if auth else 'none'}\n"
        "clientmethod: none\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        f"{block}"
        "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }\n"
    )


def start_danted(tmp_path: Path, auth: bool, user: str = TEST_USER,
                 password: str = TEST_PASSWORD, block_port: int | None = None) -> Server:
    """Start danted on a free loopback port (username method when auth)."""
    if auth:
        ensure_test_user(user, password)
    tmp_path = Path(tmp_path)
    for _ in range(3):
        port = free_port()
        log_path = tmp_path / f"danted-{port}.log"
        conf = tmp_path / f"danted-{port}.conf"
        conf.write_text(danted_config(port, auth, log_path, block_port))
        command = [DANTED, "-f", str(conf), "-p", str(tmp_path / f"danted-{port}.pid"), "-N", "1"]
        server = _start_process(command, "127.0.0.1", port, log_path)
        if server is not None:
            return server
    raise RuntimeError(f"danted did not start; see {log_path}:\n{_tail(log_path)}")


def start_microsocks(auth: bool = False, user: str = MICROSOCKS_USER,
                     password: str = MICROSOCKS_PASSWORD, host: str = "127.0.0.1",
                     log_dir: Path | None = None) -> Server:
    """Start microsocks on a free port of host (with -u/-P when auth); logs to log_dir if given."""
    for _ in range(3):
        port = free_port(host)
        log_path = Path(log_dir) / f"microsocks-{port}.log" if log_dir else Path(os.devnull)
        command = [MICROSOCKS, "-i", host, "-p", str(port)]
        if auth:
            command += ["-u", user, "-P", password]
        server = _start_process(command, host, port, log_path)
        if server is not None:
            return server
    raise RuntimeError(f"microsocks did not start:\n{_tail(log_path)}")


def _start_process(command: list[str], host: str, port: int, log_path: Path) -> Server | None:
    """Run command in its own process group; None if it exited before listening (port race)."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        if _accepts(host, port):
            return Server(host, port, lambda: _stop_group(process), log_path)
        gevent.sleep(0.02)
    _stop_group(process)
    raise RuntimeError(f"{command[0]} not listening on {port} after {START_TIMEOUT}s")


def _accepts(host: str, port: int) -> bool:
    try:
        gsocket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def _stop_group(process: subprocess.Popen) -> None:
    """TERM the whole process group (danted forks children), KILL it if it lingers."""
    if process.poll() is not None:
        return
    _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while process.poll() is None and time.monotonic() < deadline:
        gevent.sleep(0.02)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return


def _tail(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")[-2000:]
    except OSError as exc:
        return f"(no log: {exc})"


def start_banner_server(banner: bytes = b"220 test\r\n", host: str = "127.0.0.1") -> Server:
    """A gevent TCP server: sends banner, then echoes what it receives until EOF."""
    peers: list[tuple] = []

    def handle(sock: gsocket.socket, address: tuple) -> None:
        peers.append(address)
        sock.sendall(banner)
        while data := sock.recv(4096):
            sock.sendall(data)

    server = StreamServer((host, 0), handle)
    server.start()
    return Server(host, server.server_port, server.stop, peers=peers)


def start_silent_listener(host: str = "127.0.0.1") -> Server:
    """Completes TCP handshakes (via the backlog) and never sends or accepts anything."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(64)
    return Server(host, listener.getsockname()[1], listener.close)

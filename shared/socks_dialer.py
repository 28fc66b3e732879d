"""Dial a destination through a list of SOCKS5 proxies, with failover (gevent I/O shell).

Rules (the byte formats and the order are pure, in `shared.socks5`):

* Proxies are tried in `selection_order`; down proxies (per the shared pool)
  come last, as probes.
* Each proxy gets its `tmo` for the TCP connect and again its `tmo` for the
  SOCKS handshake, so one that accepts and then stays silent is abandoned in
  time to try the next.  `deadline` bounds everything, all proxies included.
* A proxy that fails on its own (connect error or timeout, no acceptable
  method, auth refused, protocol error, REP 1/2/7/8/unassigned, silence) is
  recorded as an attempt, marked down in the pool, and the next one is tried.
  REP 2 (not allowed by ruleset) counts as the proxy's failure: another proxy's
  rules may allow the destination.
* REP 3/4/5/6 (network/host unreachable, refused, TTL expired) are the
  destination's fault: we stop at once with `destination_fault=True`, and the
  proxy, which did its job, is marked up.
* A proxy is not marked down when it only failed because the overall deadline
  ran out before its own `tmo` (it was not given a fair chance).
"""

from __future__ import annotations

import random
import socket as stdlib_socket
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import gevent
from gevent import socket

from shared import socks5
from shared.proxypool import ProxyLease, ProxyPool
from shared.socks5 import ProxySpec, SocksError, SocksProtocolError, SocksReplyError

T = TypeVar("T")


class SocksDialError(Exception):
    """No proxy delivered a connection; `attempts` lists (proxy, reason) per failure."""

    def __init__(self, reason: str, attempts: list[tuple[ProxySpec, str]],
                 destination_fault: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.destination_fault = destination_fault


@dataclass
class DialResult:
    """A connection through `proxy` to the destination, ready for the SMTP banner.

    Call `close()` (or use it as a context manager) when done; it closes the
    socket and releases the pool's in_use count.  If the socket is handed on
    (e.g. wrapped in TLS), close that and call `release()`.
    """

    sock: socket.socket
    proxy: ProxySpec
    bound_address: str
    bound_port: int
    attempts: list[tuple[ProxySpec, str]] = field(default_factory=list)
    lease: ProxyLease | None = None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def close(self) -> None:
        self.sock.close()
        self.release()

    def __enter__(self) -> "DialResult":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _AttemptFailed(Exception):
    """One proxy failed; `fair` is False when only the overall deadline cut it short."""

    def __init__(self, reason: str, fair: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fair = fair


def dial(specs: list[ProxySpec], dest_ip: str, dest_port: int, deadline: float,
         pool: ProxyPool | None = None, rng: random.Random | None = None,
         source_address: tuple[str, int] | None = None) -> DialResult:
    """Connect to dest_ip:dest_port through the first proxy that works (see module doc)."""
    request = socks5.build_connect(dest_ip, dest_port)
    now = time.monotonic()
    end = now + deadline
    is_down = (lambda spec: pool.is_down(spec, now)) if pool else (lambda spec: False)
    order = socks5.selection_order(specs, is_down, rng or random.SystemRandom())
    attempts: list[tuple[ProxySpec, str]] = []
    for spec in order:
        if end - time.monotonic() <= 0:
            attempts.append((spec, f"not tried: overall deadline of {deadline:g}s expired"))
            continue
        result = _attempt(spec, request, end, pool, source_address, attempts)
        if result is not None:
            return result
    raise SocksDialError(_summary(dest_ip, dest_port, attempts), attempts, destination_fault=False)


def _attempt(spec: ProxySpec, request: bytes, end: float, pool: ProxyPool | None,
             source_address: tuple[str, int] | None,
             attempts: list[tuple[ProxySpec, str]]) -> DialResult | None:
    """Try one proxy: a DialResult, None to go on, or SocksDialError for the destination."""
    lease = pool.begin_dial(spec, probe_window=end - time.monotonic()) if pool else None
    sock = None
    try:
        sock = _connect(spec, end, source_address)
        bound = _bounded(spec, end, "SOCKS handshake", _handshake, sock, spec, request)
    except SocksReplyError as exc:
        sock.close()
        if exc.destination_fault:
            raise _blame_destination(spec, exc.reason, pool, lease, attempts) from None
        _record_failure(spec, exc.reason, True, pool, lease, attempts)
        return None
    except (_AttemptFailed, SocksError) as exc:
        if sock is not None:
            sock.close()
        _record_failure(spec, exc.reason, getattr(exc, "fair", True), pool, lease, attempts)
        return None
    except BaseException:
        # not the proxy's doing (the caller's own timeout, a kill): clean up, pass it on
        if sock is not None:
            sock.close()
        if lease is not None:
            lease.release()
        raise
    sock.settimeout(None)
    if pool:
        pool.mark_up(spec)
    return DialResult(sock, spec, bound[0], bound[1], attempts, lease)


def _blame_destination(spec: ProxySpec, reason: str, pool: ProxyPool | None,
                       lease: ProxyLease | None,
                       attempts: list[tuple[ProxySpec, str]]) -> "SocksDialError":
    """The proxy worked and the destination refused: stop here, the proxy stays up."""
    attempts.append((spec, reason))
    if pool:
        pool.mark_up(spec)
        lease.release()
    return SocksDialError(f"{reason} via proxy {spec}", attempts, destination_fault=True)


def _record_failure(spec: ProxySpec, reason: str, fair: bool, pool: ProxyPool | None,
                    lease: ProxyLease | None, attempts: list[tuple[ProxySpec, str]]) -> None:
    attempts.append((spec, reason))
    if pool:
        lease.fail()
        if fair:
            pool.mark_down(spec)


def _connect(spec: ProxySpec, end: float, source_address: tuple[str, int] | None) -> socket.socket:
    family = stdlib_socket.AF_INET6 if ":" in spec.address else stdlib_socket.AF_INET
    try:
        sock = socket.socket(family, stdlib_socket.SOCK_STREAM)
    except OSError as exc:  # out of descriptors: our trouble, not the proxy's
        raise _AttemptFailed(f"creating a socket failed: {exc.strerror or exc}", fair=False) from None
    try:
        if source_address is not None:
            _bind(sock, source_address)
        _bounded(spec, end, "connect to proxy", sock.connect, (spec.address, spec.port))
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, source_address: tuple[str, int]) -> None:
    """A bind failure is our configuration's fault, not the proxy's (fair=False)."""
    try:
        sock.bind(source_address)
    except OSError as exc:
        raise _AttemptFailed(f"binding source address {source_address[0]} failed: "
                             f"{exc.strerror or exc}", fair=False) from None


def _bounded(spec: ProxySpec, end: float, stage: str, func: Callable[..., T], *args: object) -> T:
    """Run func under min(spec.tmo, time left), turning timeouts and OSError into _AttemptFailed."""
    left = end - time.monotonic()
    timer = gevent.Timeout(max(min(spec.tmo, left), 0.0))
    timer.start()
    try:
        return func(*args)
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        if spec.tmo < left:
            raise _AttemptFailed(f"{stage} timed out after {spec.tmo:g}s") from None
        raise _AttemptFailed(f"{stage} cut short by the overall deadline", fair=False) from None
    except OSError as exc:
        raise _AttemptFailed(f"{stage} failed: {exc.strerror or exc}") from None
    finally:
        timer.close()


def _handshake(sock: socket.socket, spec: ProxySpec, request: bytes) -> tuple[str, int]:
    """RFC 1928 negotiation (+ RFC 1929 auth) and CONNECT; returns the bound address."""
    sock.sendall(socks5.build_greeting(spec.method))
    method = socks5.parse_method_reply(_recv_exact(sock, 2, "method reply"))
    if method != spec.method:
        raise SocksProtocolError(f"proxy chose method {method:#04x}, we offered {spec.method:#04x}")
    if method == socks5.METHOD_USERPASS:
        sock.sendall(socks5.build_userpass(spec.name, spec.password))
        socks5.parse_auth_reply(_recv_exact(sock, 2, "authentication reply"))
    sock.sendall(request)
    reply = _read_connect_reply(sock)
    _ack_now(sock)
    return socks5.parse_connect_reply(reply)


def _ack_now(sock: socket.socket) -> None:
    """Acknowledge the CONNECT reply at once instead of after the delayed-ACK timer.

    A proxy with Nagle on (microsocks) holds the first relayed bytes (the SMTP
    banner) until its reply is acknowledged; we send nothing before the banner,
    so without this every connection would wait ~40 ms for the delayed ACK.
    """
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_QUICKACK, 1)


def _read_connect_reply(sock: socket.socket) -> bytes:
    reply = bytearray()
    need = 4
    while need:
        chunk = sock.recv(need)
        if not chunk:
            raise socks5.truncated_reply_error(bytes(reply))
        reply += chunk
        need = 4 - len(reply) if len(reply) < 4 else socks5.reply_length(bytes(reply))
    return bytes(reply)


def _recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SocksProtocolError(f"proxy closed the connection after {len(data)} of "
                                     f"{size} bytes of the {what}")
        data += chunk
    return bytes(data)


def _summary(dest_ip: str, dest_port: int, attempts: list[tuple[ProxySpec, str]]) -> str:
    if not attempts:
        return "no SOCKS proxy configured"
    tried = "; ".join(f"{spec}: {reason}" for spec, reason in attempts)
    return f"no SOCKS proxy could reach {dest_ip}:{dest_port} ({tried})"

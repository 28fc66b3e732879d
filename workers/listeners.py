"""Binding the listening sockets (done once by the master, before forking)."""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from mta.configfile import ConfigError

BACKLOG = 4096


@dataclass(frozen=True)
class ListenAddress:
    address: str
    port: int
    tls_on_connect: bool

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}"


def listen_addresses(interfaces: tuple[str, ...], ports: tuple[int, ...], tls_ports: tuple[int, ...]) -> list[ListenAddress]:
    """Every (interface, port) pair.  An interface may carry its own port as
    Exim writes it (`127.0.0.1.2525`, `::1.2525`) or as `[addr]:port`.
    TLS-on-connect ports are listened on even if not in daemon_smtp_ports."""
    all_ports = tuple(dict.fromkeys(ports + tls_ports))
    result = []
    for interface in interfaces:
        address, own_port = split_interface(interface)
        for port in (own_port,) if own_port else all_ports:
            result.append(ListenAddress(address, port, port in tls_ports))
    return result


def split_interface(text: str) -> tuple[str, int | None]:
    bracketed = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text)
    if bracketed:
        return _checked(bracketed.group(1)), int(bracketed.group(2))
    try:
        return _checked(text), None
    except ConfigError:
        head, dot, port = text.rpartition(".")
        if dot and port.isdigit():
            return _checked(head), int(port)
        raise


def _checked(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise ConfigError(f'local_interfaces: "{address}" is not an IP address') from None


def bind(where: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in where.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((where.address, where.port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock

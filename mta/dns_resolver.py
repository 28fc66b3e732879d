"""A small DNS stub resolver over gevent sockets (dnspython builds and parses).

Only what routing needs: MX records and host addresses (A, AAAA).  Queries
go over UDP (TCP when the answer is truncated) to the configured servers in
turn; each wait is a gevent socket timeout, so the hub never blocks.

Results: an answer (possibly empty: NODATA), `DnsNotFound` for NXDOMAIN,
`DnsTemporaryError` when no server gave a usable answer (SERVFAIL, REFUSED,
timeouts): that is a reason to defer, not to fail.
"""
from __future__ import annotations

import socket as stdlib_socket
import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from gevent import socket

DEFAULT_TIMEOUT = 5.0
RESOLV_CONF = "/etc/resolv.conf"
MAX_UDP_SIZE = 65535


class DnsTemporaryError(Exception):
    """No usable answer now; try again later."""


class DnsNotFound(Exception):
    """The name does not exist (NXDOMAIN)."""


@dataclass(frozen=True)
class MxRecord:
    preference: int
    exchange: str


def system_nameservers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf, port 53."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    servers.append((words[1], 53))
    except OSError:
        return []
    return servers


class Resolver:
    """Stub resolver; one per process is enough (it keeps no sockets open)."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT,
                 attempts: int = 2) -> None:
        self.servers = servers
        self.timeout = timeout
        self.attempts = attempts

    def mx(self, domain: str) -> list[MxRecord]:
        """MX records, unsorted; [] when the domain exists without MX records."""
        answer = self._records(domain, dns.rdatatype.MX)
        return [MxRecord(r.preference, _name_text(r.exchange)) for r in answer]

    def addresses(self, name: str, ipv4_only: bool = False) -> list[str]:
        """IPv4 then IPv6 addresses of `name`.

        NXDOMAIN for the name raises DnsNotFound; a temporary failure of one
        family is tolerated when the other gave addresses.
        """
        found: list[str] = []
        temporary: DnsTemporaryError | None = None
        types = (dns.rdatatype.A,) if ipv4_only else (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdtype in types:
            try:
                found += [r.address for r in self._records(name, rdtype)]
            except DnsTemporaryError as exc:
                temporary = exc
        if not found and temporary is not None:
            raise temporary
        return found

    def _records(self, name: str, rdtype: dns.rdatatype.RdataType) -> list:
        response = self.query(name, rdtype)
        if response.rcode() == dns.rcode.NXDOMAIN:
            raise DnsNotFound(f"{name}: no such domain")
        return [rdata for rrset in response.answer if rrset.rdtype == rdtype for rdata in rrset]

    def query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """A NOERROR or NXDOMAIN response from one of the servers."""
        if not self.servers:
            raise DnsTemporaryError("no DNS servers configured")
        query = dns.message.make_query(name, rdtype)
        problems = []
        for _ in range(self.attempts):
            for server in self.servers:
                try:
                    response = self._ask(query, server)
                except (OSError, dns.exception.DNSException) as exc:
                    problems.append(f"{server[0]}:{server[1]}: {exc or type(exc).__name__}")
                    continue
                if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return response
                problems.append(f"{server[0]}:{server[1]}: {dns.rcode.to_text(response.rcode())}")
        raise DnsTemporaryError(f"DNS lookup of {name} ({dns.rdatatype.to_text(rdtype)}) failed: "
                                + "; ".join(problems[-len(self.servers):]))

    def _ask(self, query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
        response = self._udp(query, server)
        if response.flags & dns.flags.TC:
            response = self._tcp(query, server)
        return response

    def _udp(self, query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
        with socket.socket(_family(server[0]), stdlib_socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(server)
            sock.send(query.to_wire())
            while True:
                data = sock.recv(MAX_UDP_SIZE)
                try:
                    response = dns.message.from_wire(data, ignore_trailing=True)
                except dns.exception.DNSException:
                    continue  # garbage on our port: keep waiting for the answer
                if query.is_response(response):
                    return response

    def _tcp(self, query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
        wire = query.to_wire()
        with socket.socket(_family(server[0]), stdlib_socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(server)
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", _recv_exact(sock, 2))
            return dns.message.from_wire(_recv_exact(sock, length))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("DNS server closed the TCP connection")
        data += chunk
    return bytes(data)


def _family(address: str) -> int:
    return stdlib_socket.AF_INET6 if ":" in address else stdlib_socket.AF_INET


def _name_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)

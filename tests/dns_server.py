"""A tiny authoritative DNS server on loopback UDP for tests (a real OS thread).

    server = DnsServer({"example.test": {"MX": ["10 mx1.example.test."]},
                        "mx1.example.test": {"A": ["127.0.0.1"]}}).start()
    ... Resolver([("127.0.0.1", server.port)]) ...
    server.stop()

Names not in the zone get NXDOMAIN; a known name without the asked type gets
an empty NOERROR answer; names in `servfail` get SERVFAIL.  `queries` records
(name, type) of everything asked, so tests can check that no DNS was used.
"""
from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, zone: dict[str, dict[str, list[str]]], servfail: tuple[str, ...] = (),
                 host: str = "127.0.0.1") -> None:
        self.zone = {name.lower().rstrip("."): records for name, records in zone.items()}
        self.servfail = {name.lower().rstrip(".") for name in servfail}
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "DnsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            self._sock.sendto(self.answer(dns.message.from_wire(data)).to_wire(), peer)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif self.zone[name].get(rdtype):
            response.answer.append(dns.rrset.from_text_list(question.name, 300, "IN", rdtype,
                                                            self.zone[name][rdtype]))
        return response

"""Reading a PROXY header off a socket without reading a byte past it.

The bytes after the header may be a TLS ClientHello (TLS-on-connect ports),
which must reach the TLS layer untouched, so this reader peeks: it looks at
what has arrived with MSG_PEEK, asks the pure parser whether a header is
complete, and then takes exactly the header's bytes off the socket.  While
the header is incomplete, everything that arrived belongs to it (the parser
said so), so those bytes are consumed and kept, and the next wait is for new
data rather than a busy loop over the same peeked bytes.  When the header
is bad, what has arrived of it is dropped, so that it is not then read as
SMTP commands.
"""
from __future__ import annotations

import socket

import gevent

from mta.proxy_protocol import ProxyHeader, ProxyProtocolError, parse
from mta.smtp_session import ConnectionInfo

MAX_HEADER = 16 + 65535


def read_exact_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """The PROXY header that starts the stream, within `timeout` seconds."""
    received = bytearray()
    try:
        with gevent.Timeout(timeout):
            while True:
                peeked = sock.recv(MAX_HEADER - len(received), socket.MSG_PEEK)
                if not peeked:
                    raise ProxyProtocolError("connection closed before the PROXY header was complete")
                try:
                    result = parse(bytes(received) + peeked)
                except ProxyProtocolError:
                    _consume(sock, len(peeked))  # a failed header is dropped whole, not read as commands
                    raise
                if result is not None:
                    header, consumed = result
                    _consume(sock, consumed - len(received))
                    return header
                received += _consume(sock, len(peeked))
    except gevent.Timeout:
        raise ProxyProtocolError(f"no complete PROXY header within {timeout:g}s") from None


def _consume(sock: socket.socket, count: int) -> bytes:
    """Take `count` bytes that are known to be in the socket's buffer."""
    taken = bytearray()
    while len(taken) < count:
        chunk = sock.recv(count - len(taken))
        if not chunk:
            raise ProxyProtocolError("connection closed inside the PROXY header")
        taken += chunk
    return bytes(taken)


def apply_header(info: ConnectionInfo, header: ProxyHeader) -> None:
    """Make the real client the session's host; the TCP peer becomes the proxy.

    For LOCAL and UNKNOWN the socket's own endpoints stay, as the
    specification says; `proxy_external_*` is then the address the proxy
    connected to (ours), so that an empty `$proxy_external_address` still
    means exactly "negotiation failed", as in Exim.
    """
    if header.transport == "DGRAM":
        raise ProxyProtocolError("PROXY header announces a datagram (DGRAM) connection, not usable for SMTP")
    if not header.carries_addresses:
        info.proxy_external_address = info.interface_address
        info.proxy_external_port = info.interface_port
        return
    info.host_address = header.source_address
    info.host_port = header.source_port
    info.proxy_external_address = header.destination_address
    info.proxy_external_port = header.destination_port
    info.proxy_tlvs = {
        "authority": header.authority,
        "alpn": header.alpn,
        "unique_id": header.unique_id.hex(),
        "ssl_version": header.ssl_version,
        "ssl_cn": header.ssl_cn,
        "ssl_cipher": header.ssl_cipher,
        "ssl_verified": "" if header.ssl_verified is None else ("yes" if header.ssl_verified else "no"),
    }

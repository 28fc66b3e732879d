"""What a session does with a PROXY header (the parsing and the exact-length
reading are `mta.proxy_protocol`'s)."""
from __future__ import annotations

import socket

from mta.proxy_protocol import ProxyHeader, ProxyProtocolError
from mta.smtp_session import ConnectionInfo

DRAIN_LIMIT = 16 + 65535


def drop_failed_header(sock: socket.socket) -> None:
    """After a bad header, throw away what has already arrived of it, so
    that it is not then read as SMTP commands (the session goes on, as in
    Exim, answering 503 to everything but QUIT)."""
    dropped = 0
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # a gevent socket would wait for data even with MSG_DONTWAIT
    try:
        while dropped < DRAIN_LIMIT:
            chunk = sock.recv(DRAIN_LIMIT - dropped)
            if not chunk:
                return
            dropped += len(chunk)
    except OSError:
        return  # nothing more has arrived (or the connection is gone: the session will notice)
    finally:
        sock.settimeout(timeout)


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

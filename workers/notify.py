"""systemd's readiness protocol (sd_notify), without a library.

Under `Type=notify` systemd passes a UNIX datagram socket in `$NOTIFY_SOCKET`
(a path, or an abstract name written with a leading `@`); the master sends
`READY=1` once it serves, `RELOADING=1` ... `READY=1` around a reload and
`STOPPING=1` when it begins to stop.  Without the variable nothing is sent.
"""
from __future__ import annotations

import os
import socket


def notify_address(value: str) -> str | bytes | None:
    """The socket address `$NOTIFY_SOCKET` names: a path, or an abstract
    name (`@name` becomes `\\0name`); None for an unusable value."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd if it asked for it.

    False when `$NOTIFY_SOCKET` is unset or unusable; raises OSError when the
    send fails.  A datagram to a local socket does not block.
    """
    address = notify_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)
    return True

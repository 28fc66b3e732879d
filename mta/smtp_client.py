"""The SMTP client protocol: pure reply parsing and dot-stuffing, and a thin
connection class over a gevent socket (plain, TLS, or through a SOCKS proxy).

The connection knows the protocol, not the policy: what a 4xx after RCPT
means for a recipient is decided in `mta.transports.smtp`.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket as stdlib_socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from gevent import select

READ_SIZE = 65536
DATA_CHUNK = 256 * 1024
MAX_REPLY_BYTES = 1024 * 1024
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)")


class SmtpProtocolError(Exception):
    """The server's reply is not SMTP."""


class SmtpConnectionLost(Exception):
    """The server closed the connection, or the network failed."""


class SmtpTimeout(Exception):
    """No reply (or no progress sending) within the timeout."""


@dataclass(frozen=True)
class SmtpReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as sent, lines joined by newlines (for bounces)."""
        return "\n".join(f"{self.code} {line}".rstrip() for line in self.lines)

    @property
    def one_line(self) -> str:
        """The reply on one line (for log lines)."""
        return " ".join(f"{self.code} {line}".rstrip() if i == 0 else line
                        for i, line in enumerate(self.lines))

    @property
    def enhanced_status(self) -> str:
        """The RFC 3463 status code at the start of the text, or ""."""
        match = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.lines[0] if self.lines else "")
        return match.group(1) if match else ""

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400


# ---------------------------------------------------------------- pure parts

def parse_reply(buffer: bytes | bytearray) -> tuple[SmtpReply | None, int]:
    """The first complete reply at the start of `buffer` and the bytes it
    took, or (None, 0) while it is incomplete."""
    lines: list[str] = []
    code = 0
    position = 0
    while True:
        end = buffer.find(b"\n", position)
        if end < 0:
            return None, 0
        raw = bytes(buffer[position:end]).rstrip(b"\r")
        position = end + 1
        match = _REPLY_LINE.fullmatch(raw)
        if not match or (match.group(2) == b"" and match.group(3)):
            raise SmtpProtocolError(f"malformed SMTP reply line: {raw[:100]!r}")
        line_code = int(match.group(1))
        if lines and line_code != code:
            raise SmtpProtocolError(f"reply code changed within a multi-line reply: {raw[:100]!r}")
        code = line_code
        lines.append(match.group(3).decode("utf-8", "replace"))
        if match.group(2) != b"-":
            return SmtpReply(code, tuple(lines)), position


def parse_capabilities(reply: SmtpReply) -> dict[str, str]:
    """EHLO keywords (upper case) -> their parameters; the first line is the greeting."""
    capabilities = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.strip().partition(" ")
        if keyword:
            capabilities[keyword.upper()] = parameters.strip()
    return capabilities


def dot_stuff(chunk: bytes, previous_tail: bytes) -> bytes:
    """Double every dot that starts a line in `chunk`.

    `previous_tail` is the last two bytes of the message data before this
    chunk (b"\\r\\n" at the start of the message), so lines that begin at a
    chunk boundary, or whose CRLF is split across two chunks, are handled.
    """
    stuffed = chunk.replace(b"\r\n.", b"\r\n..")
    if chunk.startswith(b".") and previous_tail.endswith(b"\n"):
        return b"." + stuffed
    if chunk.startswith(b"\n.") and previous_tail.endswith(b"\r"):
        return b"\n.." + stuffed[2:]
    return stuffed


def data_terminator(tail: bytes) -> bytes:
    """What ends the DATA stream, given the message's last two bytes."""
    return b".\r\n" if tail.endswith(b"\r\n") else b"\r\n.\r\n"


def mail_from_command(sender: str, size: int, capabilities: dict[str, str], body_type: str) -> str:
    command = f"MAIL FROM:<{sender}>"
    if "SIZE" in capabilities:
        command += f" SIZE={size}"
    if body_type.upper() == "8BITMIME" and "8BITMIME" in capabilities:
        command += " BODY=8BITMIME"
    return command


# ---------------------------------------------------------------- the connection

@dataclass
class PeerInfo:
    """Who we are talking to, for log lines and variables."""

    name: str
    address: str
    port: int
    proxy_address: str = ""
    proxy_port: int = 0
    proxy_bound_address: str = ""
    proxy_bound_port: int = 0


@dataclass
class SmtpConnection:
    """An open SMTP client connection (after connect, before the banner)."""

    sock: Any
    peer: PeerInfo
    release: Any = None            # called once when the socket is closed (proxy lease)
    capabilities: dict[str, str] = field(default_factory=dict)
    tls_cipher: str = ""
    tls_verified: bool = False
    messages_sent: int = 0
    idle_since: float = 0.0
    clean: bool = True             # between transactions, nothing outstanding
    _buffer: bytearray = field(default_factory=bytearray)

    def read_reply(self, timeout: float, stage: str) -> SmtpReply:
        while True:
            reply, consumed = parse_reply(self._buffer)
            if reply is not None:
                del self._buffer[:consumed]
                return reply
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise SmtpProtocolError(f"reply {stage} longer than {MAX_REPLY_BYTES} bytes")
            self._buffer += self._recv(timeout, stage)

    def _recv(self, timeout: float, stage: str) -> bytes:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(READ_SIZE)
        except (stdlib_socket.timeout, TimeoutError):
            raise SmtpTimeout(f"timed out waiting for a reply {stage}") from None
        except (OSError, ssl.SSLError) as exc:
            raise SmtpConnectionLost(f"connection lost {stage}: {exc.strerror or exc}") from None
        if not data:
            raise SmtpConnectionLost(f"Remote host closed connection {stage}")
        return data

    def send(self, data: bytes, timeout: float, stage: str) -> None:
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except (stdlib_socket.timeout, TimeoutError):
            raise SmtpTimeout(f"timed out sending {stage}") from None
        except (OSError, ssl.SSLError) as exc:
            raise SmtpConnectionLost(f"connection lost sending {stage}: {exc.strerror or exc}") from None

    def command(self, line: str, timeout: float) -> SmtpReply:
        stage = f"after {line}"
        self.send(line.encode("utf-8") + b"\r\n", timeout, line)
        return self.read_reply(timeout, stage)

    def pipeline(self, lines: list[str], timeout: float) -> list[SmtpReply]:
        """Send several commands at once (PIPELINING) and read one reply each."""
        self.send("".join(line + "\r\n" for line in lines).encode("utf-8"), timeout, lines[0])
        return [self.read_reply(timeout, f"after {line}") for line in lines]

    def send_data_file(self, path: str, timeout: float) -> None:
        """Stream the spool -D file, dot-stuffed, and the final dot."""
        tail = b"\r\n"
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                chunk = os.read(fd, DATA_CHUNK)
                if not chunk:
                    break
                self.send(dot_stuff(chunk, tail), timeout, "message data")
                tail = (tail + chunk)[-2:]
        finally:
            os.close(fd)
        self.send(data_terminator(tail), timeout, "end of data")

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None, timeout: float) -> None:
        """Wrap the socket after a 220 to STARTTLS; the handshake is bounded by `timeout`."""
        if self._buffer:
            raise SmtpProtocolError("data received after the STARTTLS reply (possible injection)")
        self.sock.settimeout(timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except (stdlib_socket.timeout, TimeoutError):
            raise SmtpTimeout("timed out in the TLS handshake") from None
        cipher = self.sock.cipher()
        if cipher:
            name, version, bits = cipher
            self.tls_cipher = f"{version}:{name}:{bits}"
        self.tls_verified = context.verify_mode == ssl.CERT_REQUIRED

    def readable(self) -> bool:
        """True if the peer has sent something (an EOF or a 421) while idle."""
        if self._buffer:
            return True
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(ready)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.release is not None:
                self.release()
                self.release = None

    def quit(self, timeout: float) -> None:
        """Polite QUIT.  The transactions are over, so a peer that fails to
        answer it changes nothing: its error is deliberately not reported."""
        with contextlib.suppress(SmtpConnectionLost, SmtpTimeout, SmtpProtocolError):
            self.command("QUIT", timeout)
        self.close()

    def mark_idle(self) -> None:
        self.idle_since = time.monotonic()

"""The I/O shell around `SmtpSession`: one greenlet per connection.

Per connection: PROXY header (from `hosts_proxy` hosts), TLS-on-connect,
connection limits on the real client, connect ACL, banner, then commands.
Commands are split from one receive buffer; every complete command in it is
answered before the next `recv`, and the replies to a pipelined group leave
in one `send`.  DATA goes through `DataDecoder` into the spool, and `250`
is sent only after the group committer has made the message durable.
"""
from __future__ import annotations

import errno
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable

import gevent

from mta import proxy_reader
from mta.dataread import DataDecoder
from mta.deadline import Deadline
from mta.log import Logs, host_field, tod_full
from mta.policy import Policy, Verdict, refusal_reply
from mta.proxy_failures import failure_kind
from mta.proxy_protocol import ProxyProtocolError, read_header
from mta.smtp_commands import MAX_COMMAND_LINE
from mta.smtp_session import ConnectionInfo, Limits, SmtpSession
from mta.spool import Envelope, IncomingMessage, is_disk_full
from mta.committer import GroupCommitter
from mta.connection_gate import ConnectionGate, LimitReached
from mta.message_id import MessageIdSource

RECV_SIZE = 65536
FAREWELL_TIMEOUT = 10.0  # seconds for the 421 sent when a client has timed out
MESSAGE_ID_HEADER = re.compile(rb"(?im)^message-id:[ \t]*(.*?)\r?$")


class ConnectionRefused(Exception):
    """The connection is turned away before the banner (limits, drop)."""


@dataclass
class ServerResources:
    """Everything one worker's connections share; built once per worker."""

    limits: Limits
    logs: Logs
    committer: GroupCommitter
    ids: MessageIdSource
    hosts_proxy: object                      # mta.lists.HostList or None
    proxy_timeout: float
    receive_timeout: float
    banner: Callable[[SmtpSession], str]
    make_policy: Callable[[], Policy]
    connection_gate: ConnectionGate
    tls_context: ssl.SSLContext | None
    message_queued: Callable[[str], None]
    stats: dict


class SmtpConnection:
    def __init__(self, resources: ServerResources, sock: socket.socket, peer: tuple, tls_on_connect: bool) -> None:
        self.res = resources
        self.sock = sock
        self.buffer = bytearray()
        self.replies: list[str] = []
        local = sock.getsockname()
        self.info = ConnectionInfo(_plain_ip(peer[0]), peer[1], _plain_ip(local[0]), local[1])
        self.tls_on_connect = tls_on_connect
        self.session: SmtpSession | None = None
        self.end_reason = "lost"
        self.skipping_long_line = False
        self.timeout = resources.receive_timeout or None  # 0: no timeout, as in Exim
        self.deadline: Deadline | None = None
        self.tls_handshaking = False

    # -- the connection's life -------------------------------------------------

    def run(self) -> None:
        self.deadline = Deadline(self.timeout)
        stats = self.res.stats
        stats["connections"] = stats.get("connections", 0) + 1
        try:
            self._serve()
        except (socket.timeout, TimeoutError):
            self._timeout()
        except ssl.SSLError as exc:
            self.res.logs.main(f"TLS error on connection from {self._host()} ({exc.reason or exc})")
        except ConnectionRefused:
            self.end_reason = "refused"
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, None):
                raise
        finally:
            # Closed first: the client waits for the close after 221, and the
            # bookkeeping below cost a lone client 35 µs per connection.
            self.sock.close()
            self.deadline.cancel()
            stats["connections"] -= 1
            self.res.connection_gate.leave(id(self))
            self._log_close()

    def _serve(self) -> None:
        gate = self.res.connection_gate
        hosts = self.res.hosts_proxy
        from_proxy = hosts is not None and hosts.match(self.info.host_address)
        try:
            gate.admit_peer(id(self), self.info.host_address, from_proxy)
            if from_proxy:
                self._read_proxy_header()
            gate.admit_client(id(self), self.info.host_address)
        except LimitReached as limit:
            self._send_now(limit.reply)
            self.res.logs.reject(limit.log)
            raise ConnectionRefused() from None
        if self.tls_on_connect:
            self._start_tls()
        self.session = SmtpSession(self.info, self.res.limits, self.res.make_policy())
        if self.res.logs.selected("smtp_connection"):
            self.res.logs.main(
                f"SMTP connection from {self._host()} (TCP/IP connection count = {self.res.stats['connections']})"
            )
        verdict = self.session.policy.check("connect", self.session)
        if not verdict.accepted:
            self._refuse_connection(verdict)
            return
        self._send_now(f"220 {self.res.banner(self.session)}")
        self._restart_line_clock()
        self._command_loop()

    def _read_proxy_header(self) -> None:
        info = self.info
        info.proxy_session = True
        info.proxy_local_address, info.proxy_local_port = info.host_address, info.host_port
        try:
            header, _ = read_header(self.sock, self.res.proxy_timeout)
            proxy_reader.apply_header(info, header)
        except ProxyProtocolError as exc:
            proxy_reader.drop_failed_header(self.sock)
            reasons = self.res.stats.setdefault("proxy_failure_reasons", {})
            kind = failure_kind(exc.reason)
            reasons[kind] = reasons.get(kind, 0) + 1
            self.info.proxy_failed = True
            self.res.stats["proxy_failures"] = self.res.stats.get("proxy_failures", 0) + 1
            if self.res.logs.selected("proxy_failure"):
                self.res.logs.main(
                    f"PROXY protocol failure from [{self.info.host_address}]:{self.info.host_port}: {exc.reason}"
                )
            return
        self.res.stats["proxy_sessions"] = self.res.stats.get("proxy_sessions", 0) + 1

    def _refuse_connection(self, verdict: Verdict) -> None:
        text, _ = refusal_reply("connect", verdict)
        self._send_now(text)
        reason = verdict.log_message or verdict.message
        temporarily = "temporarily " if verdict.action == "defer" else ""
        self.res.logs.reject(f'{self._log_host()} {temporarily}rejected connection in "connect" ACL'
                             + (f": {reason}" if reason else ""))
        self.end_reason = "refused"

    def _timeout(self) -> None:
        hostname = self.res.limits.hostname
        mid_handshake = self.tls_handshaking
        self.deadline = Deadline(None)  # it has fired: the farewell below is bounded by the socket timeout alone
        if not mid_handshake:  # a reply there would wait for the handshake first
            self.sock.settimeout(FAREWELL_TIMEOUT)
            try:
                self._send_now(f"421 {hostname} SMTP incoming data timeout - closing connection.")
            except OSError:
                pass  # the client is gone as well; the log line below says what happened
        what = "TLS negotiation" if mid_handshake else "SMTP command"
        self.res.logs.main(f"{what} timeout on connection from {self._host()}")
        self.end_reason = "timeout"

    # -- commands --------------------------------------------------------------

    def _command_loop(self) -> None:
        session = self.session
        while True:
            line = self._next_line()
            if line is None:
                self._flush()
                if not self._fill():
                    self.end_reason = "lost"
                    return
                continue
            reply = session.handle(line)
            self.replies.append(reply.text)
            if reply.close:
                self._flush()
                self.end_reason = "QUIT" if reply.text.startswith("221") else "dropped"
                return
            if reply.start_data:
                self._flush()
                self._receive_message()
            elif reply.start_tls:
                self._flush()
                self.buffer.clear()  # RFC 3207: nothing pipelined before TLS counts
                self._start_tls()

    def _next_line(self) -> bytes | None:
        """The next complete command line, or None when more input is needed.

        A line longer than the limit is answered 500 and skipped without
        holding it in memory: its bytes are dropped up to the next LF.
        """
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > MAX_COMMAND_LINE:
                self.buffer.clear()
                self.skipping_long_line = True
            return None
        line = bytes(self.buffer[:end]).rstrip(b"\r")
        del self.buffer[: end + 1]
        self._restart_line_clock()
        if self.skipping_long_line:
            self.skipping_long_line = False
            return b"\xff" * (MAX_COMMAND_LINE + 1)
        return line

    def _fill(self) -> bool:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            return False
        self.buffer += data
        return True

    def _restart_line_clock(self) -> None:
        """smtp_receive_timeout bounds each line, command or data (Exim's
        documentation says so): a client trickling a byte at a time cannot
        hold a connection longer than that per line."""
        self.deadline.restart()

    def _flush(self) -> None:
        if self.replies:
            payload = ("\r\n".join(self.replies) + "\r\n").encode("utf-8", "replace")
            self.replies.clear()
            self.deadline.restart()  # a reply gets the whole timeout to leave
            # One send() nearly always takes a reply whole; gevent's sendall
            # would first ask the kernel for the buffer size, every time.
            sent = self.sock.send(payload)
            if sent < len(payload):
                self.sock.sendall(payload[sent:])

    def _send_now(self, text: str) -> None:
        self.replies.append(text)
        self._flush()

    # -- DATA --------------------------------------------------------------------

    def _receive_message(self) -> None:
        session = self.session
        envelope = self._new_envelope()
        message = IncomingMessage(self.res.committer.spool, envelope.id)
        try:
            message.write(self._received_header(envelope))
            oversize, spool_error, header_id = self._read_data(message)
            if spool_error is not None:
                message.discard()
                reply = self._spool_failure(spool_error, envelope)
            else:
                reply = self._finish_message(message, envelope, oversize, header_id)
        except BaseException:
            message.discard()
            raise
        session.message_done()
        self.replies.append(reply)

    def _read_data(self, message: IncomingMessage) -> tuple[bool, OSError | None, str]:
        """Read to the end of the data: (too big, spool write error, Message-ID).

        Once the message is too big or the spool cannot take it, the rest
        is read and dropped, so that the client hears the reply."""
        decoder = DataDecoder()
        limit = self.res.limits.message_size_limit
        oversize = False
        spool_error = None
        header_id = None
        pending = bytes(self.buffer)
        self.buffer.clear()
        while True:
            decoded, after = decoder.feed(pending)
            if decoded:
                self._restart_line_clock()
                if header_id is None:
                    header_id = _message_id_header(decoded)
            if not oversize and spool_error is None:
                if message.size + len(decoded) > limit + 4096:
                    oversize = True
                else:
                    spool_error = _store(message, decoded)
            if decoder.done:
                self.buffer += after
                return oversize, spool_error, header_id or ""
            pending = self.sock.recv(RECV_SIZE)
            if not pending:
                raise ConnectionResetError(errno.ECONNRESET, "connection lost during DATA")

    def _finish_message(self, message: IncomingMessage, envelope: Envelope, oversize: bool, header_id: str) -> str:
        session = self.session
        if oversize:
            message.discard()
            self.res.logs.reject(f"{self._host()} F=<{envelope.sender}> rejected after DATA: message too big")
            return "552 5.3.4 Message size exceeds maximum permitted"
        envelope.size = message.size
        envelope.message_id_header = header_id
        verdict = session.data_received()
        if not verdict.accepted:
            message.discard()
            return self._data_refused(verdict, envelope)
        if session.transaction.discard or not session.transaction.recipients:
            message.discard()
            self.res.logs.main(f"{envelope.id} <= {envelope.sender or '<>'} {self._log_host()} discarded")
            return f"250 2.0.0 OK id={envelope.id}"
        envelope.variables = dict(session.transaction.variables)
        try:
            message.finish(envelope)
            self.deadline.hold()  # until the reply: a slow disk must not turn a stored message into a 421
            self.res.committer.commit(message)
        except OSError as exc:
            message.discard()
            return self._spool_failure(exc, envelope)
        self._log_received(envelope)
        self.res.message_queued(envelope.id)
        self.res.stats["received"] = self.res.stats.get("received", 0) + 1
        return f"250 OK id={envelope.id}"

    def _data_refused(self, verdict: Verdict, envelope: Envelope) -> str:
        text, close = refusal_reply("data", verdict)
        reason = verdict.log_message or verdict.message or verdict.action
        temporarily = "temporarily " if verdict.action == "defer" else ""
        self.res.logs.reject(f"{self._log_host()} F=<{envelope.sender}> {temporarily}rejected after DATA: {reason}")
        if close:
            self.replies.append(text)
            raise ConnectionRefused()
        return text

    def _spool_failure(self, exc: OSError, envelope: Envelope) -> str:
        if is_disk_full(exc):
            self.res.logs.main(f"{self._host()} F=<{envelope.sender}> temporarily rejected: spool disk full")
            return "452 4.3.1 Insufficient system storage"
        self.res.logs.panic(f"spool write failed for message from {self._host()}: {exc}")
        return "451 4.3.0 Temporary local problem - please try later"

    def _new_envelope(self) -> Envelope:
        session, info = self.session, self.info
        transaction = session.transaction
        return Envelope(
            id=self.res.ids.next_id(),
            sender=transaction.sender,
            recipients=list(transaction.recipients),
            received_time=time.time(),
            host_address=info.host_address,
            host_port=info.host_port,
            helo=session.helo,
            protocol=session.protocol,
            interface_address=info.interface_address,
            interface_port=info.interface_port,
            proxy_address=info.proxy_local_address if info.proxy_session and not info.proxy_failed else "",
            proxy_port=info.proxy_local_port,
            body_type=transaction.body_type,
            tls_cipher=info.tls_cipher,
        )

    def _received_header(self, envelope: Envelope) -> bytes:
        helo = f" (helo={envelope.helo})" if envelope.helo else ""
        recipient = f"\r\n\tfor {envelope.recipients[0]}" if len(envelope.recipients) == 1 else ""
        sender = f"\r\n\t(envelope-from <{envelope.sender}>)" if envelope.sender else ""
        tls = f" ({self.info.tls_version})\r\n\ttls {self.info.tls_cipher}" if self.info.tls_cipher else ""
        text = (
            f"Received: from [{envelope.host_address}]{helo}\r\n"
            f"\tby {self.res.limits.hostname} with {envelope.protocol}{tls} (mta-server){sender}\r\n"
            f"\tid {envelope.id}{recipient};\r\n\t{tod_full(envelope.received_time)}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")

    # -- TLS ---------------------------------------------------------------------

    def _start_tls(self) -> None:
        context = self.res.tls_context
        if context is None:
            raise ConnectionRefused()
        tls_sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls_sock  # it owns the descriptor now: a failed handshake closes this one
        self._restart_line_clock()  # the handshake is bounded like a line
        self.tls_handshaking = True
        tls_sock.do_handshake()
        self.tls_handshaking = False
        cipher = tls_sock.cipher()
        version = tls_sock.version() or ""
        cipher_text = f"{version}:{cipher[0]}:{cipher[2]}" if cipher else version
        if self.session is not None:
            self.session.tls_started(cipher_text, version)
        else:
            self.info.tls_cipher, self.info.tls_version = cipher_text, version

    # -- logging -------------------------------------------------------------------

    def _host(self) -> str:
        helo = self.session.helo if self.session else ""
        return host_field(self.info.host_address, self.info.host_port, helo, self.res.logs.selected("incoming_port"))

    def _log_host(self) -> str:
        return "H=" + self._host()

    def _log_received(self, envelope: Envelope) -> None:
        logs = self.res.logs
        parts = [f"{envelope.id} <= {envelope.sender or '<>'} {self._log_host()} P={envelope.protocol}"]
        if envelope.tls_cipher:
            parts.append(f" X={envelope.tls_cipher}")
        if envelope.proxy_address and logs.selected("proxy"):
            parts.append(f" PRX={envelope.proxy_address}")
        parts.append(f" S={envelope.size}")
        if envelope.message_id_header:
            parts.append(f" id={envelope.message_id_header}")
        if logs.selected("received_recipients"):
            parts.append(" for " + " ".join(envelope.recipients))
        logs.main("".join(parts))

    def _log_close(self) -> None:
        if not self.res.logs.selected("smtp_connection") or self.end_reason == "refused":
            return
        how = {"QUIT": "closed by QUIT", "lost": "lost"}.get(self.end_reason, f"closed ({self.end_reason})")
        self.res.logs.main(f"SMTP connection from {self._host()} {how}")


def _store(message: IncomingMessage, decoded: bytes) -> OSError | None:
    """Add to the message; a large one goes to disk as it arrives (in a
    thread).  A spool that cannot take it (disk full) is returned, not raised."""
    message.write(decoded)
    if not message.needs_spill:
        return None
    try:
        gevent.get_hub().threadpool.apply(message.spill)
    except OSError as exc:
        message.discard()
        return exc
    return None


def _message_id_header(decoded: bytes) -> str | None:
    """The Message-ID header's value, if the header block is in this piece."""
    end = decoded.find(b"\r\n\r\n")
    headers = decoded if end < 0 else decoded[:end + 2]
    match = MESSAGE_ID_HEADER.search(headers)
    if match:
        return match.group(1).decode("utf-8", "replace").strip()
    return "" if end >= 0 else None


def _plain_ip(address: str) -> str:
    """IPv4-mapped IPv6 (`::ffff:1.2.3.4`) is reported as plain IPv4."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address.split("%", 1)[0]

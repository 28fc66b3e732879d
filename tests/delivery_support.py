"""A recording SMTP server (gevent, loopback) for delivery tests.

    server = SmtpRecorder(rcpt_reply=lambda rcpt: "550 5.1.1 no such user" if "bad" in rcpt else None)
    server.start()
    ... deliver to 127.0.0.1:server.port ...
    server.messages[0].recipients, .data (dot-stuffing undone), .wire (as sent), .tls
    server.stop()

Replies can be changed per test: `mail_reply`, `rcpt_reply(address)`, `data_reply`
(returning None means the normal 250), `banner`.  `batches` records the
commands that arrived in each recv() (to see pipelining).
"""
from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from typing import Callable

import gevent
from gevent.server import StreamServer


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    wire: bytes
    helo: str
    tls: bool
    connection: int


@dataclass
class SmtpRecorder:
    host: str = "127.0.0.1"
    banner: str = "220 recorder.test ESMTP"
    capabilities: tuple[str, ...] = ("PIPELINING", "SIZE 100000000", "8BITMIME")
    reject_ehlo: bool = False
    tls_context: ssl.SSLContext | None = None
    mail_reply: Callable[[str], str | None] = lambda sender: None
    rcpt_reply: Callable[[str], str | None] = lambda recipient: None
    data_reply: Callable[[bytes], str | None] = lambda data: None
    messages: list[Received] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    connections: int = 0
    peers: list[str] = field(default_factory=list)
    port: int = 0
    _server: StreamServer | None = None
    _sessions: set = field(default_factory=set)

    def start(self) -> "SmtpRecorder":
        self._server = StreamServer((self.host, self.port), self._handle)
        self._server.start()
        self.port = self._server.server_port
        return self

    def stop(self) -> None:
        """Stop listening and close every open session (no QUIT is answered after this)."""
        if self._server is not None:
            self._server.stop(timeout=1)
        for session in list(self._sessions):
            session.sock.close()
        gevent.sleep(0.01)  # gevent closes a socket a greenlet waits on in the next loop turn

    def recipients(self) -> list[str]:
        return [r for message in self.messages for r in message.recipients]

    def _handle(self, sock, address) -> None:
        self.connections += 1
        self.peers.append(address[0])
        session = _Session(self, sock, self.connections)
        self._sessions.add(session)
        try:
            session.run()
        finally:
            self._sessions.discard(session)
            session.sock.close()


class _Session:
    def __init__(self, server: SmtpRecorder, sock, number: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number
        self.buffer = bytearray()
        self.helo = ""
        self.tls = False
        self.sender: str | None = None
        self.recipients: list[str] = []

    def run(self) -> None:
        self.send(self.server.banner)
        if not self.server.banner.startswith("2"):
            self.sock.close()
            return
        while True:
            lines = self.read_lines()
            if lines is None:
                return
            self.server.batches.append(lines)
            for line in lines:
                if not self.handle(line):
                    return

    def read_lines(self) -> list[str] | None:
        while b"\r\n" not in self.buffer:
            data = self.recv()
            if not data:
                return None
            self.buffer += data
        end = self.buffer.rfind(b"\r\n") + 2
        text, self.buffer = bytes(self.buffer[:end]), self.buffer[end:]
        return text.decode("utf-8", "replace").split("\r\n")[:-1]

    def recv(self) -> bytes:
        """b"" at the end of the connection, also when stop() closed it under us."""
        try:
            return self.sock.recv(65536)
        except OSError:
            return b""

    def send(self, reply: str) -> None:
        self.sock.sendall(reply.encode() + b"\r\n")

    def handle(self, line: str) -> bool:
        self.server.commands.append(line)
        verb = line[:4].upper()
        if verb == "EHLO" and self.server.reject_ehlo:
            self.send("502 no EHLO here")
        elif verb in ("EHLO", "HELO"):
            self.helo = line[5:]
            capabilities = list(self.server.capabilities)
            if self.server.tls_context is not None and not self.tls:
                capabilities.append("STARTTLS")
            if verb == "HELO" or not capabilities:
                self.send("250 recorder.test")
            else:
                self.send("\r\n".join(["250-recorder.test"] + [f"250-{c}" for c in capabilities[:-1]]
                                      + [f"250 {capabilities[-1]}"]))
        elif verb == "STAR":
            self.send("220 go ahead")
            try:
                self.sock = self.server.tls_context.wrap_socket(self.sock, server_side=True)
            except (ssl.SSLError, OSError):
                self.sock.close()
                return False
            self.tls = True
        elif verb == "MAIL":
            sender = line[10:].split(">")[0].lstrip("<")
            reply = self.server.mail_reply(sender)
            self.sender = sender if reply is None else None
            self.recipients = []
            self.send(reply or "250 OK")
        elif verb == "RCPT":
            recipient = line[8:].split(">")[0].lstrip("<")
            reply = self.server.rcpt_reply(recipient) if self.sender is not None else "503 no MAIL"
            if reply is None:
                self.recipients.append(recipient)
            self.send(reply or "250 Accepted")
        elif verb == "DATA":
            if not self.recipients:
                self.send("503 no valid recipients")
                return True
            self.send("354 go ahead")
            return self.receive_data()
        elif verb == "RSET":
            self.sender, self.recipients = None, []
            self.send("250 reset")
        elif verb == "QUIT":
            self.send("221 bye")
            self.sock.close()
            return False
        else:
            self.send("500 unknown command")
        return True

    def receive_data(self) -> bool:
        while True:
            end = self.buffer.find(b"\r\n.\r\n")
            if end >= 0 or self.buffer.startswith(b".\r\n"):
                break
            data = self.recv()
            if not data:
                return False
            self.buffer += data
        if self.buffer.startswith(b".\r\n"):
            wire, self.buffer = b"", self.buffer[3:]
        else:
            wire, self.buffer = bytes(self.buffer[:end + 2]), self.buffer[end + 5:]
        data = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in wire.split(b"\r\n"))
        reply = self.server.data_reply(data)
        if reply is None:
            self.server.messages.append(Received(self.sender or "", list(self.recipients), data, wire,
                                                 self.helo, self.tls, self.number))
            reply = f"250 OK id=rec{len(self.server.messages)}"
        self.sender, self.recipients = None, []
        self.send(reply)
        return True


# ---------------------------------------------------------------- spool and config helpers

def write_config(directory, body: str, selector: str = "") -> str:
    """A configuration file in `directory` with our spool and the given sections."""
    import os

    os.makedirs(str(directory), exist_ok=True)
    path = os.path.join(str(directory), "mta.conf")
    with open(path, "w") as handle:
        handle.write(f"primary_hostname = mta.test\n"
                     f"spool_directory = {directory}/spool\n"
                     f"log_selector = {selector}\n"
                     "domainlist local_domains = localhost : mta.test\n"
                     + body)
    return path


def make_deliverer(directory, body: str, selector: str = "", proxypool=None):
    """(Deliverer, Spool, Logs) for a configuration built by write_config."""
    from mta.config import load_config
    from mta.delivery import Deliverer
    from mta.delivery_config import compile_delivery
    from mta.log import Logs
    from mta.spool import Spool

    config = load_config(write_config(directory, body, selector))
    spool = Spool(config.spool_directory)
    spool.create_directories()
    logs = Logs(config.log_file_path, config.log_selector)
    return Deliverer(config, compile_delivery(config), spool, logs, proxypool=proxypool), spool, logs


_counter = [0]


def spool_message(spool, sender: str, recipients: list[str], body: bytes = b"Hello.\r\n",
                  headers: bytes = b"", received_time: float | None = None, body_type: str = "7BIT") -> str:
    """Put a message in the spool as the SMTP side would; returns its id."""
    import os
    import time

    from mta.message_id import MessageIdSource
    from mta.spool import Envelope, IncomingMessage, commit_batch

    _counter[0] += 1
    message_id = MessageIdSource(os.getpid()).next_id(time.time() + _counter[0] / 1000)
    data = (b"Received: from test by mta.test with esmtp id " + message_id.encode() + b"\r\n"
            + b"Subject: test message\r\nFrom: " + sender.encode() + b"\r\n" + headers + b"\r\n" + body)
    message = IncomingMessage(spool, message_id)
    message.write(data)
    message.finish(Envelope(id=message_id, sender=sender, recipients=list(recipients),
                            received_time=time.time() if received_time is None else received_time,
                            size=len(data), host_address="127.0.0.1", body_type=body_type))
    assert commit_batch(spool, [message]) == [None]
    return message_id


def main_log(logs) -> str:
    try:
        with open(logs.template.replace("%s", "main"), encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def log_lines(logs, message_id: str) -> list[str]:
    """Main log lines about message_id, without the timestamp."""
    return [line[20:] for line in main_log(logs).splitlines() if message_id in line]


def smarthost_config(hosts: str, transport_options: str = "", retry: str = "* * F,1h,10m") -> str:
    """A manualroute smart host and its smtp transport, for delivery tests."""
    return f"""
begin routers
smarthost:
  driver = manualroute
  route_list = * {hosts}
  transport = remote_smtp

begin transports
remote_smtp:
  driver = smtp
  command_timeout = 5s
  connect_timeout = 5s
{transport_options}

begin retry
{retry}
"""


def wait_until(condition, timeout: float = 15.0) -> None:
    """Poll `condition` (yielding to the hub, where a recorder may be serving)
    until it is true; AssertionError after `timeout` seconds."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.05)

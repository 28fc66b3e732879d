"""The SMTP server protocol state machine (RFC 5321), without I/O.

`SmtpSession.handle(line)` takes one command line and returns a `Reply`
telling the I/O layer what to send and what to do next (read DATA, start
TLS, close).  The session holds the connection facts (`ConnectionInfo`) and
the message being built (`Transaction`): aiosmtpd's session/envelope split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mta import smtp_commands as cmds
from mta.policy import DISCARD, Policy, Verdict, refusal_reply
from mta.smtp_commands import SmtpSyntaxError

PROXY_FAILED_REPLY = "503 Command refused, required Proxy negotiation failed"


@dataclass
class ConnectionInfo:
    """Who is on the other end.  With PROXY, host_* is the real client."""

    host_address: str
    host_port: int
    interface_address: str
    interface_port: int
    proxy_session: bool = False
    proxy_failed: bool = False
    proxy_local_address: str = ""
    proxy_local_port: int = 0
    proxy_external_address: str = ""
    proxy_external_port: int = 0
    proxy_tlvs: dict[str, str] = field(default_factory=dict)
    tls_cipher: str = ""
    tls_version: str = ""


@dataclass
class Transaction:
    sender: str
    size_hint: int | None = None
    body_type: str = "7BIT"
    recipients: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    discard: bool = False          # the whole message (discard at MAIL, predata or data)
    discarded_recipients: int = 0  # accepted at RCPT with "discard": never delivered


@dataclass(frozen=True)
class Reply:
    text: str
    close: bool = False
    start_data: bool = False
    start_tls: bool = False
    error: bool = False   # counts towards smtp_max_synprot_errors


@dataclass(frozen=True)
class Limits:
    hostname: str
    message_size_limit: int
    recipients_max: int
    max_synprot_errors: int
    tls_available: bool
    qualify_domain: str


class SmtpSession:
    def __init__(self, info: ConnectionInfo, limits: Limits, policy: Policy) -> None:
        self.info = info
        self.limits = limits
        self.policy = policy
        self.helo = ""
        self.esmtp = False
        self.transaction: Transaction | None = None
        self.current_recipient = ""
        self.connection_variables: dict[str, str] = {}
        self.synprot_errors = 0
        self.messages_received = 0
        self.last_verdict: Verdict | None = None

    # -- facts the policy and the log use -------------------------------------

    @property
    def current_domain(self) -> str:
        return cmds.split_address(self.current_recipient)[1]

    @property
    def tls_active(self) -> bool:
        return bool(self.info.tls_cipher)

    @property
    def protocol(self) -> str:
        """Exim's $received_protocol: smtp, esmtp, esmtps."""
        if not self.esmtp:
            return "smtps" if self.tls_active else "smtp"
        return "esmtps" if self.tls_active else "esmtp"

    # -- dispatch ------------------------------------------------------------

    def handle(self, line: bytes) -> Reply:
        if len(line) > cmds.MAX_COMMAND_LINE:
            return self._protocol_error("500 5.5.2 Line too long")
        command = cmds.split_command(line)
        if self.info.proxy_failed and command.verb != "QUIT":
            return Reply(PROXY_FAILED_REPLY, error=True)
        handler = getattr(self, "do_" + command.verb, None) if command.verb.isalpha() else None
        if handler is None:
            return self._protocol_error("500 5.5.1 Unrecognized command")
        try:
            reply = handler(command.argument)
        except SmtpSyntaxError as exc:
            return self._protocol_error(exc.reply)
        if reply.error:
            return self._protocol_error(reply.text)
        return reply

    def _protocol_error(self, text: str) -> Reply:
        self.synprot_errors += 1
        if self.synprot_errors > self.limits.max_synprot_errors:
            return Reply(
                f"{text}\r\n421 4.7.0 {self.limits.hostname} Too many syntax or protocol errors", close=True
            )
        return Reply(text, error=True)

    def _refuse(self, stage: str, verdict: Verdict) -> Reply:
        text, close = refusal_reply(stage, verdict)
        return Reply(text, close=close)

    # -- commands ------------------------------------------------------------

    def do_HELO(self, argument: str) -> Reply:
        return self._greet(argument, esmtp=False)

    def do_EHLO(self, argument: str) -> Reply:
        return self._greet(argument, esmtp=True)

    def _greet(self, argument: str, esmtp: bool) -> Reply:
        name = argument.split(" ", 1)[0] if argument else ""
        cmds.check_helo_name(name)
        self.helo, self.esmtp = name, esmtp
        verdict = self.policy.check("helo", self)
        if not verdict.accepted:
            self.helo = ""
            return self._refuse("helo", verdict)
        self.transaction = None
        first = f"{self.limits.hostname} Hello {name} [{self.info.host_address}]"
        if not esmtp:
            return Reply(f"250 {first}")
        return Reply(_reply_lines("250", "\n".join([first, *self.extensions()])))

    def extensions(self) -> list[str]:
        extensions = [f"SIZE {self.limits.message_size_limit}", "8BITMIME", "PIPELINING"]
        if self.limits.tls_available and not self.tls_active:
            extensions.append("STARTTLS")
        return [*extensions, "ENHANCEDSTATUSCODES", "HELP"]

    def do_MAIL(self, argument: str) -> Reply:
        if not self.helo:
            return Reply("503 5.5.1 EHLO or HELO first", error=True)
        if self.transaction is not None:
            return Reply("503 5.5.1 Sender already given", error=True)
        address, params = cmds.parse_path(argument, "FROM")
        if not self.esmtp and params:
            raise SmtpSyntaxError("501 5.5.4 parameters need EHLO")
        size = cmds.parse_size_parameter(params)
        body_type = cmds.parse_body_parameter(params)
        unknown = set(params) - {"SIZE", "BODY"}
        if unknown:
            raise SmtpSyntaxError(f"555 5.5.4 unsupported parameter {sorted(unknown)[0]}")
        if size is not None and size > self.limits.message_size_limit:
            return Reply("552 5.3.4 Message size exceeds maximum permitted")
        self.transaction = Transaction(self._qualify(cmds.strip_source_route(address)), size, body_type)
        verdict = self.policy.check("mail", self)
        if not verdict.accepted:
            self.transaction = None
            return self._refuse("mail", verdict)
        return Reply("250 2.1.0 OK")

    def do_RCPT(self, argument: str) -> Reply:
        if self.transaction is None:
            return Reply("503 5.5.1 sender not yet given", error=True)
        address, params = cmds.parse_path(argument, "TO")
        if params:
            raise SmtpSyntaxError(f"555 5.5.4 unsupported parameter {sorted(params)[0]}")
        address = self._qualify(cmds.strip_source_route(address))
        if not address:
            raise SmtpSyntaxError("501 5.1.3 empty recipient address")
        if len(self.transaction.recipients) >= self.limits.recipients_max:
            return Reply("452 4.5.3 Too many recipients")
        self.current_recipient = address
        verdict = self.policy.check("rcpt", self)
        if not verdict.accepted:
            return self._refuse("rcpt", verdict)
        if verdict.action == DISCARD:
            self.transaction.discarded_recipients += 1  # Exim: accepted, then dropped
        else:
            self.transaction.recipients.append(address)
        return Reply("250 2.1.5 Accepted")

    def do_DATA(self, argument: str) -> Reply:
        if argument:
            raise SmtpSyntaxError("501 5.5.4 DATA takes no argument")
        if self.transaction is None:
            return Reply("503 5.5.1 sender not yet given", error=True)
        if not self.transaction.recipients and not self.transaction.discarded_recipients:
            return Reply("554 5.5.1 No valid recipients", error=True)
        verdict = self.policy.check("predata", self)
        if not verdict.accepted:
            return self._refuse("predata", verdict)
        return Reply('354 Enter message, ending with "." on a line by itself', start_data=True)

    def do_RSET(self, argument: str) -> Reply:
        self.transaction = None
        return Reply("250 2.0.0 Reset OK")

    def do_NOOP(self, argument: str) -> Reply:
        return Reply("250 2.0.0 OK")

    def do_QUIT(self, argument: str) -> Reply:
        return Reply(f"221 2.0.0 {self.limits.hostname} closing connection", close=True)

    def do_HELP(self, argument: str) -> Reply:
        return Reply("214-Commands supported:\r\n214 HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY STARTTLS")

    def do_VRFY(self, argument: str) -> Reply:
        return Reply("252 2.1.5 Administrative prohibition")

    def do_EXPN(self, argument: str) -> Reply:
        return Reply("550 5.7.1 Administrative prohibition")

    def do_STARTTLS(self, argument: str) -> Reply:
        if not self.limits.tls_available:
            return Reply("500 5.5.1 Unrecognized command", error=True)
        if self.tls_active:
            return Reply("503 5.5.1 TLS already active", error=True)
        if argument:
            raise SmtpSyntaxError("501 5.5.4 STARTTLS takes no argument")
        return Reply("220 2.0.0 TLS go ahead", start_tls=True)

    def do_BDAT(self, argument: str) -> Reply:
        return Reply("500 5.5.1 Unrecognized command (CHUNKING is not offered)", error=True)

    do_AUTH = do_ETRN = do_BDAT

    # -- state changes driven by the I/O layer --------------------------------

    def tls_started(self, cipher: str, version: str) -> None:
        """RFC 3207: after STARTTLS the client starts over with EHLO."""
        self.info.tls_cipher, self.info.tls_version = cipher, version
        self.helo, self.esmtp, self.transaction = "", False, None

    def data_received(self) -> Verdict:
        """The data ACL's verdict on the complete message."""
        return self.policy.check("data", self)

    def message_done(self) -> None:
        self.transaction = None
        self.messages_received += 1

    def _qualify(self, address: str) -> str:
        if address and "@" not in address and address != "":
            return f"{address}@{self.limits.qualify_domain}"
        return address


def _reply_lines(code: str, text: str) -> str:
    """Format a possibly multi-line reply: `250-a`, `250-b`, `250 c`."""
    lines = text.split("\n")
    return "\r\n".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines))

"""Host checking, as Exim's `-bh`: an SMTP session on a pair of streams as if
it came from a given address (optionally through a PROXY-protocol proxy),
run through the real ACLs and the real ratelimit records, printing what
each ACL decided and why (`>>> ` lines) and what would be logged (`LOG: `).
Nothing is spooled: DATA is read and thrown away.  No server need run.

The session is `mta.smtp_session.SmtpSession`, the same state machine the
server runs; this module is the plain blocking I/O around it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, TextIO

from mta.acl import Decision
from mta.config import Config
from mta.dataread import DataDecoder
from mta.expand import ExpansionError, compile_expansion
from mta.lists import HostList
from mta.log import host_field
from mta.lookups import LookupCache
from mta.message_id import MessageIdSource
from mta.policy import Verdict, refusal_reply
from mta.policy_setup import build_policy_factory
from mta.smtp_session import ConnectionInfo, Limits, SmtpSession
from mta.variables import SessionVariables


@dataclass(frozen=True)
class Peer:
    """Who connects: the client, and the proxy it comes through ("" for none)."""

    client: str
    proxy: str
    interface: tuple[str, int]       # where the server would have accepted


@dataclass(frozen=True)
class _Shared:
    ratetable: Any


class OverlayRateStore:
    """Ratelimit records read from the real table (when there is one) and
    updated in memory only: each condition computes what the server would,
    and the table is never written."""

    def __init__(self, table: Any | None, blob_size: int = 128) -> None:
        self.table = table
        self.blob_size = table.blob_size if table is not None else blob_size
        self.written: dict[str, Any] = {}

    def update(self, key: str, fn: Callable[[Any], Any]) -> Any:
        if key in self.written:
            current = self.written[key]
        else:
            current = self.table.get(key) if self.table is not None else None
        new = fn(current)
        if new is not None:
            self.written[key] = new
        return new

    def close(self) -> None:
        if self.table is not None:
            self.table.close()


class PrintingLogs:
    """`mta.log.Logs` for host checking: every line is printed, none written."""

    def __init__(self, selector: frozenset[str], out: TextIO) -> None:
        self.selector = selector
        self.out = out

    def selected(self, item: str) -> bool:
        return item in self.selector

    def set_process(self, pid: int) -> None:
        """Nothing to do: the lines are not written to a shared file."""

    def main(self, text: str) -> None:
        self._print("MAIN", text)

    def reject(self, text: str) -> None:
        self._print("REJECT", text)

    def panic(self, text: str) -> None:
        self._print("PANIC", text)

    def _print(self, kind: str, text: str) -> None:
        print(f"LOG: {kind}: {text}", file=self.out, flush=True)


def describe_decision(stage: str, verdict: Verdict, decision: Decision) -> str:
    """`>>> rcpt ACL "check_rcpt": deny at FILE:LINE "deny" (reason)`."""
    reason = (verdict.log_message or verdict.message).split("\n", 1)[0]
    because = f" ({reason})" if reason else ""
    if not decision.acl:
        rule = "built-in rule: +local_domains only" if stage == "rcpt" else "nothing to check"
        return f">>> {stage}: no ACL set ({rule}): {verdict.action}{because}"
    statement = decision.statement
    if statement is None:
        where = " (end of ACL: implicit deny)" if verdict.action != "accept" else ""
    else:
        where = f' at {statement.line.filename}:{statement.line.number} "{statement.verb}"'
    return f'>>> {stage} ACL "{decision.acl}": {verdict.action}{where}{because}'


def run_host_check(config: Config, store: Any, peer: Peer, stdin: BinaryIO, out: TextIO) -> None:
    """Run one session from `stdin` to `out` until QUIT, a drop or end of input.
    `store` holds the ratelimit records (`OverlayRateStore`, or the table itself)."""
    logs = PrintingLogs(config.log_selector, out)
    lookups = LookupCache()
    info = _connection_info(config, peer, out)
    make_policy = build_policy_factory(
        config, _Shared(store), logs, lookups,
        observer=lambda stage, verdict, decision: _say(out, describe_decision(stage, verdict, decision)),
        sleep=lambda seconds: _say(out, f">>> delay of {seconds:g}s skipped in host-check mode"),
    )
    limits = Limits(hostname=config.primary_hostname, message_size_limit=config.message_size_limit,
                    recipients_max=config.recipients_max, max_synprot_errors=config.smtp_max_synprot_errors,
                    tls_available=False, qualify_domain=config.qualify_domain)
    session = SmtpSession(info, limits, make_policy())
    _HostCheck(config, session, logs, lookups, stdin, out).run()


def _connection_info(config: Config, peer: Peer, out: TextIO) -> ConnectionInfo:
    """The connection as the server would see it after the PROXY header."""
    tcp_peer = peer.proxy or peer.client
    info = ConnectionInfo(tcp_peer, 0, *peer.interface)
    hosts_proxy = config.hosts_proxy and HostList(config.hosts_proxy, config.compiled_lists,
                                                  config.primary_hostname)
    if not hosts_proxy or not hosts_proxy.match(tcp_peer):
        _say(out, f">>> host {tcp_peer} in hosts_proxy? no" + (
            f": a PROXY header from it would be an unknown command; the session is from {tcp_peer}"
            if peer.proxy else ""))
        return info
    _say(out, f">>> host {tcp_peer} in hosts_proxy? yes")
    info.proxy_session = True
    info.proxy_local_address = tcp_peer
    if not peer.proxy:
        _say(out, ">>> no --proxy given: the PROXY negotiation fails; every command but QUIT gets 503")
        info.proxy_failed = True
        return info
    info.host_address = peer.client
    info.proxy_external_address, info.proxy_external_port = peer.interface
    return info


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


class _HostCheck:
    def __init__(self, config: Config, session: SmtpSession, logs: PrintingLogs, lookups: LookupCache,
                 stdin: BinaryIO, out: TextIO) -> None:
        self.config = config
        self.session = session
        self.logs = logs
        self.lookups = lookups
        self.stdin = stdin
        self.out = out
        self.ids = MessageIdSource(0)

    def run(self) -> None:
        session, info = self.session, self.session.info
        _say(self.out, f"**** SMTP testing session as if from host {info.host_address}"
             + (f" through proxy {info.proxy_local_address}" if info.proxy_session and not info.proxy_failed else ""))
        _say(self.out, "**** This is not for real! Nothing is spooled"
             + ("; STARTTLS is not offered" if self.config.tls_certificate else "")
             + ("; connection limits are not checked" if self._has_connection_limits() else ""))
        if self.logs.selected("smtp_connection"):
            self.logs.main(f"SMTP connection from {self._host()} (TCP/IP connection count = 1)")
        verdict = session.policy.check("connect", session)
        if not verdict.accepted:
            self._refuse_connection(verdict)
            return
        self._reply(f"220 {self._banner()}")
        self._command_loop()

    def _has_connection_limits(self) -> bool:
        config = self.config
        return bool(config.smtp_accept_max_per_host or config.smtp_accept_max_per_proxy)

    def _command_loop(self) -> None:
        while True:
            line = self.stdin.readline()
            if not line:
                _say(self.out, "**** end of input")
                return
            reply = self.session.handle(line.rstrip(b"\r\n"))
            self._reply(reply.text)
            if reply.close:
                return
            if reply.start_data and not self._data():
                return

    def _data(self) -> bool:
        """Read the message and throw it away; False if the session ends."""
        decoder = DataDecoder()
        size = 0
        while not decoder.done:
            chunk = self.stdin.readline()
            if not chunk:
                _say(self.out, "**** end of input in DATA")
                return False
            decoded, _ = decoder.feed(chunk if chunk.endswith(b"\r\n") else chunk.rstrip(b"\n") + b"\r\n")
            size += len(decoded)
        session = self.session
        if size > self.config.message_size_limit:
            self._reply("552 5.3.4 Message size exceeds maximum permitted")
            session.message_done()
            return True
        verdict = session.data_received()
        if not verdict.accepted:
            return self._data_refused(verdict)
        self._reply(f"250 OK id={self.ids.next_id()}")
        _say(self.out, "**** SMTP testing: that is not a real message id!")
        session.message_done()
        return True

    def _data_refused(self, verdict: Verdict) -> bool:
        text, close = refusal_reply("data", verdict)
        sender = self.session.transaction.sender if self.session.transaction else ""
        reason = verdict.log_message or verdict.message or verdict.action
        temporarily = "temporarily " if verdict.action == "defer" else ""
        self.logs.reject(f"H={self._host()} F=<{sender}> {temporarily}rejected after DATA: {reason}")
        self._reply(text)
        self.session.message_done()
        return not close

    def _refuse_connection(self, verdict: Verdict) -> None:
        text, _ = refusal_reply("connect", verdict)
        reason = verdict.log_message or verdict.message
        temporarily = "temporarily " if verdict.action == "defer" else ""
        self.logs.reject(f'H={self._host()} {temporarily}rejected connection in "connect" ACL'
                         + (f": {reason}" if reason else ""))
        self._reply(text)

    def _banner(self) -> str:
        try:
            return compile_expansion(self.config.smtp_banner).expand(SessionVariables(self.session, self.lookups))
        except ExpansionError as exc:
            self.logs.panic(f"smtp_banner expansion failed: {exc}")
            return f"{self.config.primary_hostname} ESMTP"

    def _host(self) -> str:
        info = self.session.info
        return host_field(info.host_address, info.host_port, self.session.helo, self.logs.selected("incoming_port"))

    def _reply(self, text: str) -> None:
        _say(self.out, text.replace("\r\n", "\n"))


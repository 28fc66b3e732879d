"""The smtp transport: deliver one message to its recipients' hosts.

Per host, in the router's order (hosts in their retry wait are skipped):
connect (directly, or through `socks_proxy` with the shared dialer), banner,
EHLO (HELO if refused), STARTTLS when offered (required for
`hosts_require_tls`, skipped for `hosts_avoid_tls`; a refused STARTTLS
goes on in clear, a failed handshake is retried in clear on a new
connection, unless TLS is required or the host is in `tls_verify_hosts`;
certificates are verified only for `tls_verify_hosts`, against
`tls_verify_certificates`, a CA file or "system", as in Exim), then
transactions of up to `max_rcpt` recipients: MAIL and every RCPT sent
together when PIPELINING is offered, SIZE and BODY=8BITMIME when offered,
DATA streamed from the spool file with dot-stuffing.

What a reply means (Exim's rules):
- connection refused or timed out, 4xx banner/EHLO/MAIL, connection lost
  before the final dot: the host's fault; its retry time is recorded and the
  next host is tried; when none is left the recipients are deferred.
- all SOCKS proxies failing: deferred at once (the next host would need the
  same proxies); the proxy refusing the destination is a host failure.
- 5xx banner, HELO or MAIL: every recipient of the transaction fails.
- RCPT 4xx/5xx: that recipient is deferred/failed.  DATA or end-of-data
  4xx/5xx: every accepted recipient is deferred/failed.
- no reply after the final dot: deferred, no other host is tried (the
  message may have been delivered).

Connection reuse: after a clean transaction the connection is parked in the
process's `ConnectionCache` (key: transport, host address and port,
`socks_proxy` value, interface, HELO name) for `IDLE_SECONDS`, and the next
message for the same key uses it (up to `connection_max` messages per
connection).  A parked connection the peer has written to or closed is
discarded; one that fails at the first command is replaced once.
"""
from __future__ import annotations

import errno as errno_codes
import os
import socket as stdlib_socket
import ssl
import time
from dataclasses import dataclass, field

import gevent
from gevent import socket
from gevent import ssl as gevent_ssl

from mta.expand import DictContext, Expansion, ExpansionError
from mta.lists import HostList
from mta.lookups import LookupFailed, parse_ip
from mta.retry import find_retry_rule
from mta.routers import Address, DnsTemporaryError, Host, HostNotFound, parse_host_list, resolve_by_name
from mta.smtp_client import (
    PeerInfo, SmtpConnection, SmtpConnectionLost, SmtpProtocolError, SmtpReply, SmtpTimeout,
    mail_from_command, parse_capabilities,
)
from mta.transports import (
    DEFERRED, DELIVERED, ERRNO_EXPANDFAIL, ERRNO_HRETRY, FAILED, DeliveryJob, HostUsed, Result,
    TransportServices,
)
from shared.socks5 import SocksConfigError, parse_proxy_list
from shared.socks_dialer import SocksDialError, dial

IDLE_SECONDS = 5.0
ERRNO_SMTPCLOSED = -18
ERRNO_SMTPFORMAT = -19
ERRNO_UNKNOWNHOST = -32
ERRNO_TLSFAILURE = -37
ERRNO_TLSREQUIRED = -38
ERRNO_RCPT4XX = -44
ERRNO_MAIL4XX = -45
ERRNO_DATA4XX = -46
ERRNO_PROXYFAIL = -47

OPTIONS = {
    "hosts": "expand",
    "hosts_override": "bool",
    "port": "port",
    "interface": "expand",
    "helo_data": "expand",
    "connect_timeout": "time",
    "command_timeout": "time",
    "data_timeout": "time",
    "final_timeout": "time",
    "hosts_require_tls": "hostlist",
    "hosts_avoid_tls": "hostlist",
    "tls_verify_hosts": "hostlist",
    "tls_verify_certificates": "string",
    "socks_proxy": "socks",
    "max_rcpt": "int",
    "connection_max": "int",
}


class HostFailure(Exception):
    """This host cannot take the message now; maybe the next one can.

    `host_error`: record a retry time for the host.  `permanent`: fail the
    recipients (5xx banner/HELO/MAIL).  `next_host`: another host may be
    tried.  `replied`: the host said something (its reply is in `text`).
    """

    def __init__(self, text: str, errno: int, retry_error: str, *, host_error: bool = True,
                 permanent: bool = False, next_host: bool = True, reply: SmtpReply | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.errno = errno
        self.retry_error = retry_error
        self.host_error = host_error
        self.permanent = permanent
        self.next_host = next_host
        self.reply = reply
        self.done: list[Result] = []


class _StaleConnection(Exception):
    """A parked connection turned out to be dead at its first command."""


# ---------------------------------------------------------------- connection cache

class ConnectionCache:
    """Idle SMTP connections of one process, reused for the next message."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS, quit_timeout: float = 5.0) -> None:
        self.idle_seconds = idle_seconds
        self.quit_timeout = quit_timeout
        self._idle: dict[tuple, list[SmtpConnection]] = {}

    def take(self, key: tuple) -> SmtpConnection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()
            if not connections:
                del self._idle[key]
            if connection.readable():
                connection.close()
                continue
            return connection
        return None

    def put(self, key: tuple, connection: SmtpConnection) -> None:
        connection.mark_idle()
        self._idle.setdefault(key, []).append(connection)

    def close_idle(self, now: float | None = None) -> int:
        """QUIT connections idle for longer than idle_seconds; returns how many."""
        now = time.monotonic() if now is None else now
        expired = []
        for key, connections in list(self._idle.items()):
            keep = [c for c in connections if now - c.idle_since < self.idle_seconds]
            expired += [c for c in connections if now - c.idle_since >= self.idle_seconds]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self._quit(expired)
        return len(expired)

    def close_all(self) -> None:
        connections = [c for group in self._idle.values() for c in group]
        self._idle.clear()
        self._quit(connections)

    def _quit(self, connections: list[SmtpConnection]) -> None:
        """QUIT all at once, so one silent peer delays none of the others."""
        gevent.joinall([gevent.spawn(c.quit, self.quit_timeout) for c in connections])

    def __len__(self) -> int:
        return sum(len(group) for group in self._idle.values())


# ---------------------------------------------------------------- the transport

@dataclass
class _Attempt:
    """One message's delivery to one host: the state shared by its steps."""

    job: DeliveryJob
    host: Host
    port: int
    variables: dict[str, str]
    proxies: list
    proxy_text: str
    interface: str
    services: TransportServices


@dataclass
class SmtpTransport:
    name: str
    driver: str = "smtp"
    hosts: Expansion | None = None
    hosts_override: bool = False
    port: int = 25
    interface: Expansion | None = None
    helo_data: Expansion | None = None
    connect_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 300.0
    final_timeout: float = 600.0
    hosts_require_tls: HostList | None = None
    hosts_avoid_tls: HostList | None = None
    tls_verify_hosts: HostList | None = None
    tls_verify_certificates: str = "system"
    socks_proxy: Expansion | None = None
    max_rcpt: int = 100
    connection_max: int = 500
    local: bool = False
    _tls_contexts: dict[bool, ssl.SSLContext] = field(default_factory=dict, repr=False)

    def problems(self) -> str:
        if self.max_rcpt < 1 or self.connection_max < 1:
            return "max_rcpt and connection_max must be at least 1"
        return ""

    # ------------------------------------------------------------ per message

    def deliver(self, job: DeliveryJob, services: TransportServices) -> list[Result]:
        variables = self._message_variables(job)
        try:
            hosts = self._hosts(job, variables)
            proxy_text = self._expand(self.socks_proxy, variables)
            proxies = parse_proxy_list(proxy_text)
            interface = self._expand(self.interface, variables)
        except (ExpansionError, LookupFailed, SocksConfigError) as exc:
            return self._all(job.addresses, DEFERRED, f"{self.name} transport: {exc}", ERRNO_EXPANDFAIL)
        except _NoHosts as exc:
            return self._all(job.addresses, DEFERRED, str(exc), ERRNO_UNKNOWNHOST)
        return self._deliver_to_hosts(job, hosts, variables, proxies, proxy_text, interface, services)

    def _deliver_to_hosts(self, job: DeliveryJob, hosts: list[Host], variables: dict[str, str],
                          proxies: list, proxy_text: str, interface: str,
                          services: TransportServices) -> list[Result]:
        results: dict[str, Result] = {}
        pending = list(job.addresses)
        failure: tuple[HostFailure, Host, int] | None = None
        waiting_until: list[float] = []
        for host in hosts:
            port = host.port or self.port
            until = services.host_retry.waiting_until(f"{host.address}:{port}", time.time())
            if until is not None:
                waiting_until.append(until)
                continue
            attempt = _Attempt(job, host, port, variables, proxies, proxy_text, interface, services)
            try:
                done = self._deliver_to_host(attempt, pending)
            except HostFailure as exc:
                results.update({result.address.address: result for result in exc.done})
                pending = [address for address in pending if address.address not in results]
                self._note_host_failure(attempt, exc, pending)
                failure = (exc, host, port)
                if exc.permanent or not exc.next_host:
                    return list(results.values()) + self._from_failure(pending, exc, host, port)
                continue
            results.update({result.address.address: result for result in done})
            pending = [address for address in pending if address.address not in results]
            if not pending:
                break
        return list(results.values()) + self._left_over(pending, failure, waiting_until)

    def _left_over(self, pending: list[Address], failure, waiting_until: list[float]) -> list[Result]:
        if not pending:
            return []
        if failure is not None:
            exc, host, port = failure
            return self._from_failure(pending, exc, host, port)
        if waiting_until:
            return [Result(address, DEFERRED, "retry time not reached for any host", ERRNO_HRETRY,
                           retry_error="*", not_before=min(waiting_until)) for address in pending]
        return self._all(pending, DEFERRED, "no hosts to deliver to", ERRNO_UNKNOWNHOST)

    @staticmethod
    def _from_failure(pending: list[Address], exc: HostFailure, host: Host, port: int) -> list[Result]:
        status = FAILED if exc.permanent else DEFERRED
        used = HostUsed(host.name, host.address, port)
        reply = exc.reply
        return [Result(address, status, exc.text, exc.errno, used, exc.retry_error,
                       status_code=_status_code(reply, status), diagnostic=_diagnostic(reply, exc.text))
                for address in pending]

    def _note_host_failure(self, attempt: _Attempt, exc: HostFailure, pending: list[Address]) -> None:
        if not exc.host_error or exc.permanent or not pending:
            return
        rule = find_retry_rule(attempt.services.retry_rules, pending[0].address, exc.retry_error)
        attempt.services.host_retry.failed(f"{attempt.host.address}:{attempt.port}", rule, time.time())

    # ------------------------------------------------------------ per host

    def _deliver_to_host(self, attempt: _Attempt, pending: list[Address]) -> list[Result]:
        cache = attempt.services.connections
        key = (self.name, attempt.host.address, attempt.port, attempt.proxy_text, attempt.interface)
        connection = cache.take(key)
        if connection is not None:
            try:
                return self._transactions(attempt, connection, pending, key, reused=True)
            except _StaleConnection:
                connection.close()
        connection = self._open(attempt)
        return self._transactions(attempt, connection, pending, key, reused=False)

    def _transactions(self, attempt: _Attempt, connection: SmtpConnection, pending: list[Address],
                      key: tuple, reused: bool) -> list[Result]:
        results: list[Result] = []
        try:
            for start in range(0, len(pending), self.max_rcpt):
                batch = pending[start:start + self.max_rcpt]
                results += self._transaction(attempt, connection, batch, reused and start == 0)
        except HostFailure as exc:
            connection.close()
            if results:
                self._succeeded(attempt)
            exc.done = results
            raise
        self._succeeded(attempt)
        connection.messages_sent += 1
        if connection.clean and connection.messages_sent < self.connection_max:
            attempt.services.connections.put(key, connection)
        else:
            connection.quit(self.command_timeout)
        return results

    def _succeeded(self, attempt: _Attempt) -> None:
        attempt.services.host_retry.succeeded(f"{attempt.host.address}:{attempt.port}")

    # ------------------------------------------------------------ opening a session

    def _open(self, attempt: _Attempt, try_tls: bool = True) -> SmtpConnection:
        connection = self._connect(attempt)
        try:
            return self._start_session(attempt, connection, try_tls)
        except _RetryInClear:
            connection.close()
            return self._open(attempt, try_tls=False)
        except HostFailure:
            connection.close()
            raise

    def _connect(self, attempt: _Attempt) -> SmtpConnection:
        host, port = attempt.host, attempt.port
        if attempt.proxies:
            return self._connect_via_proxy(attempt)
        family = stdlib_socket.AF_INET6 if ":" in host.address else stdlib_socket.AF_INET
        sock = socket.socket(family, stdlib_socket.SOCK_STREAM)
        try:
            if attempt.interface:
                sock.bind((attempt.interface, 0))
            sock.settimeout(self.connect_timeout)
            sock.connect((host.address, port))
            sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        except (stdlib_socket.timeout, TimeoutError):
            sock.close()
            raise HostFailure("Connection timed out", errno_codes.ETIMEDOUT,
                              f"timeout_connect_{_mx_or_a(host)}") from None
        except OSError as exc:
            sock.close()
            kind = "refused" if exc.errno == errno_codes.ECONNREFUSED else "timeout_connect"
            raise HostFailure(exc.strerror or str(exc), exc.errno or -1, f"{kind}_{_mx_or_a(host)}") from None
        return SmtpConnection(sock, PeerInfo(host.name, host.address, port))

    def _connect_via_proxy(self, attempt: _Attempt) -> SmtpConnection:
        host, port = attempt.host, attempt.port
        source = (attempt.interface, 0) if attempt.interface else None
        try:
            result = dial(attempt.proxies, host.address, port, self.connect_timeout,
                          attempt.services.proxypool, source_address=source)
        except SocksDialError as exc:
            if exc.destination_fault:
                raise HostFailure(f"SOCKS proxy: {exc.reason}", errno_codes.ECONNREFUSED,
                                  f"refused_{_mx_or_a(host)}") from None
            raise HostFailure(f"SOCKS proxy: all proxies failed: {exc.reason}", ERRNO_PROXYFAIL,
                              "socks", host_error=False, next_host=False) from None
        peer = PeerInfo(host.name, host.address, port, result.proxy.address, result.proxy.port,
                        result.bound_address, result.bound_port)
        return SmtpConnection(result.sock, peer, release=result.release)

    def _start_session(self, attempt: _Attempt, connection: SmtpConnection, try_tls: bool) -> SmtpConnection:
        banner = self._read(connection, "initial connection")
        self._check(banner, "initial connection", fatal_5xx=True)
        variables = _connection_variables(attempt.variables, connection.peer)
        try:
            helo = self._expand(self.helo_data, variables) or variables.get("primary_hostname", "")
        except (ExpansionError, LookupFailed) as exc:
            raise HostFailure(f"failed to expand helo_data: {exc}", ERRNO_EXPANDFAIL, "*",
                              host_error=False, next_host=False) from None
        self._hello(connection, helo)
        address = attempt.host.address
        require = self.hosts_require_tls is not None and self.hosts_require_tls.match(address)
        avoid = self.hosts_avoid_tls is not None and self.hosts_avoid_tls.match(address)
        if "STARTTLS" in connection.capabilities and try_tls and not avoid:
            self._start_tls(attempt, connection, helo, require)
        if require and not connection.tls_cipher:
            raise HostFailure("a TLS session is required, but the server did not offer STARTTLS",
                              ERRNO_TLSREQUIRED, "tls_required")
        return connection

    def _hello(self, connection: SmtpConnection, helo: str) -> None:
        reply = self._command(connection, f"EHLO {helo}", self.command_timeout)
        if reply.code // 100 == 2:
            connection.capabilities = parse_capabilities(reply)
            return
        reply = self._command(connection, f"HELO {helo}", self.command_timeout)
        self._check(reply, f"HELO {helo}", fatal_5xx=True)
        connection.capabilities = {}

    def _start_tls(self, attempt: _Attempt, connection: SmtpConnection, helo: str, require: bool) -> None:
        verify = self.tls_verify_hosts is not None and self.tls_verify_hosts.match(attempt.host.address)
        reply = self._command(connection, "STARTTLS", self.command_timeout)
        if reply.code != 220:
            if require:
                raise HostFailure(_smtp_error("STARTTLS", reply), ERRNO_TLSFAILURE, "tls_required",
                                  reply=reply)
            return  # refused: the session simply goes on in clear
        try:
            hostname = attempt.host.name if verify else _sni(attempt.host)
            connection.start_tls(self._tls_context(verify), hostname, self.command_timeout)
        except (ssl.SSLError, OSError, SmtpTimeout) as exc:
            if require or verify:
                raise HostFailure(f"TLS session: {exc}", ERRNO_TLSFAILURE, "tls_required") from None
            raise _RetryInClear() from None
        self._hello(connection, helo)

    def _tls_context(self, verify: bool) -> ssl.SSLContext:
        """gevent's SSLContext: its sockets wait cooperatively (the stdlib's would block the hub)."""
        context = self._tls_contexts.get(verify)
        if context is None:
            context = gevent_ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if verify:
                if self.tls_verify_certificates == "system":
                    context.load_default_certs()
                else:
                    context.load_verify_locations(self.tls_verify_certificates)
            else:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_contexts[verify] = context
        return context

    # ------------------------------------------------------------ one transaction

    def _transaction(self, attempt: _Attempt, connection: SmtpConnection, batch: list[Address],
                     first_on_reused: bool) -> list[Result]:
        envelope = attempt.job.envelope
        mail = mail_from_command(envelope.sender, _data_size(attempt.job), connection.capabilities,
                                 envelope.body_type)
        rcpts = [f"RCPT TO:<{address.address}>" for address in batch]
        connection.clean = False
        try:
            replies = self._envelope_replies(connection, mail, rcpts)
        except HostFailure as exc:
            if first_on_reused and exc.errno == ERRNO_SMTPCLOSED:
                raise _StaleConnection() from None
            raise
        mail_reply, rcpt_replies = replies[0], replies[1:]
        if first_on_reused and mail_reply.code == 421:
            raise _StaleConnection()
        used = self._host_used(attempt, connection)
        if mail_reply.code // 100 != 2:
            return self._mail_refused(connection, mail, mail_reply, batch, used)
        results, accepted = self._rcpt_results(batch, rcpts, rcpt_replies, used)
        if not accepted:
            self._reset(connection)
            return results
        return results + self._data(attempt, connection, accepted, used)

    def _envelope_replies(self, connection: SmtpConnection, mail: str, rcpts: list[str]) -> list[SmtpReply]:
        if "PIPELINING" in connection.capabilities:
            return self._guard(lambda: connection.pipeline([mail] + rcpts, self.command_timeout), mail)
        replies = [self._command(connection, mail, self.command_timeout)]
        if replies[0].code // 100 != 2:
            return replies
        return replies + [self._command(connection, rcpt, self.command_timeout) for rcpt in rcpts]

    def _mail_refused(self, connection: SmtpConnection, mail: str, reply: SmtpReply,
                      batch: list[Address], used: HostUsed) -> list[Result]:
        if reply.code // 100 == 5:
            self._reset(connection)
            text = _smtp_error(mail, reply)
            return [Result(address, FAILED, text, 0, used, status_code=_status_code(reply, FAILED),
                           diagnostic=_diagnostic(reply, text)) for address in batch]
        raise HostFailure(_smtp_error(mail, reply), ERRNO_MAIL4XX, f"mail_{reply.code}",
                          host_error=False, reply=reply)

    def _rcpt_results(self, batch: list[Address], rcpts: list[str], replies: list[SmtpReply],
                      used: HostUsed) -> tuple[list[Result], list[Address]]:
        results, accepted = [], []
        for address, rcpt, reply in zip(batch, rcpts, replies):
            if reply.code // 100 == 2:
                accepted.append(address)
                continue
            text = _smtp_error(rcpt, reply)
            status = FAILED if reply.code // 100 == 5 else DEFERRED
            results.append(Result(address, status, text, ERRNO_RCPT4XX if status == DEFERRED else 0, used,
                                  f"rcpt_{reply.code}", status_code=_status_code(reply, status),
                                  diagnostic=_diagnostic(reply, text)))
        return results, accepted

    def _data(self, attempt: _Attempt, connection: SmtpConnection, accepted: list[Address],
              used: HostUsed) -> list[Result]:
        reply = self._command(connection, "DATA", self.command_timeout)
        if reply.code != 354:
            return self._data_refused(connection, "DATA", reply, accepted, used, reset=True)
        self._guard(lambda: connection.send_data_file(attempt.job.data_path, self.data_timeout),
                    "message data")
        try:
            final = connection.read_reply(self.final_timeout, "after end of data")
        except (SmtpConnectionLost, SmtpTimeout, SmtpProtocolError) as exc:
            raise HostFailure(str(exc), ERRNO_SMTPCLOSED, "lost_connection", host_error=False,
                              next_host=False) from None
        connection.clean = True
        if final.code // 100 == 2:
            return [Result(address, DELIVERED, final.one_line, 0, used) for address in accepted]
        return self._data_refused(connection, "end of data", final, accepted, used, reset=False)

    def _data_refused(self, connection: SmtpConnection, stage: str, reply: SmtpReply,
                      accepted: list[Address], used: HostUsed, reset: bool) -> list[Result]:
        if reset:
            self._reset(connection)
        text = _smtp_error(stage, reply)
        status = FAILED if reply.code // 100 == 5 else DEFERRED
        return [Result(address, status, text, ERRNO_DATA4XX if status == DEFERRED else 0, used,
                       f"data_{reply.code}", status_code=_status_code(reply, status),
                       diagnostic=_diagnostic(reply, text)) for address in accepted]

    def _reset(self, connection: SmtpConnection) -> None:
        reply = self._command(connection, "RSET", self.command_timeout)
        connection.clean = reply.code // 100 == 2

    # ------------------------------------------------------------ helpers

    def _command(self, connection: SmtpConnection, line: str, timeout: float) -> SmtpReply:
        return self._guard(lambda: connection.command(line, timeout), line)

    def _read(self, connection: SmtpConnection, stage: str) -> SmtpReply:
        return self._guard(lambda: connection.read_reply(self.command_timeout, f"after {stage}"), stage)

    @staticmethod
    def _guard(operation, stage: str):
        """Run a protocol step, turning transport errors into a HostFailure."""
        try:
            return operation()
        except SmtpConnectionLost as exc:
            raise HostFailure(str(exc), ERRNO_SMTPCLOSED, "lost_connection") from None
        except SmtpTimeout as exc:
            raise HostFailure(str(exc), errno_codes.ETIMEDOUT, "timeout_A") from None
        except SmtpProtocolError as exc:
            raise HostFailure(f"{exc} (after {stage})", ERRNO_SMTPFORMAT, "*") from None

    @staticmethod
    def _check(reply: SmtpReply, stage: str, fatal_5xx: bool) -> None:
        if reply.code // 100 == 2:
            return
        permanent = fatal_5xx and reply.code // 100 == 5
        raise HostFailure(_smtp_error(stage, reply), 0, "*", permanent=permanent, reply=reply)

    @staticmethod
    def _host_used(attempt: _Attempt, connection: SmtpConnection) -> HostUsed:
        peer = connection.peer
        return HostUsed(peer.name, peer.address, peer.port, peer.proxy_address, peer.proxy_port,
                        connection.tls_cipher)

    def _message_variables(self, job: DeliveryJob) -> dict[str, str]:
        variables = dict(job.variables)
        domains = {address.domain for address in job.addresses}
        if len(domains) == 1:
            variables["domain"] = domains.pop()
        if len(job.addresses) == 1:
            variables["local_part"] = job.addresses[0].local_part
        return variables

    def _hosts(self, job: DeliveryJob, variables: dict[str, str]) -> list[Host]:
        if job.hosts and not (self.hosts_override and self.hosts is not None):
            return list(job.hosts)
        if self.hosts is None:
            raise _NoHosts(f"no hosts for {self.name} transport (router gave none, no hosts option)")
        try:
            items = parse_host_list(self._expand(self.hosts, variables))
        except ValueError as exc:
            raise _NoHosts(f"{self.name} transport: bad hosts list: {exc}") from None
        return _resolve_items(items)

    @staticmethod
    def _expand(expansion: Expansion | None, variables: dict[str, str]) -> str:
        if expansion is None:
            return ""
        return expansion.expand(DictContext(variables))

    @staticmethod
    def _all(addresses: list[Address], status: str, text: str, errno: int) -> list[Result]:
        return [Result(address, status, text, errno) for address in addresses]


class _NoHosts(Exception):
    pass


class _RetryInClear(Exception):
    """STARTTLS failed on a host that does not require TLS: try again without."""


def _resolve_items(items: list[tuple[str, int | None]]) -> list[Host]:
    hosts = []
    for name, port in items:
        try:
            addresses = [name] if _is_ip(name) else resolve_by_name(name)
        except (HostNotFound, DnsTemporaryError):
            continue
        hosts += [Host(name, ip, port) for ip in addresses]
    if not hosts:
        raise _NoHosts("no host in the transport's hosts list could be found")
    return hosts


def _is_ip(text: str) -> bool:
    return parse_ip(text) is not None


def _connection_variables(variables: dict[str, str], peer: PeerInfo) -> dict[str, str]:
    """$host, $host_address, $host_port and the $proxy_* variables of a connection."""
    values = dict(variables, host=peer.name, host_address=peer.address, host_port=str(peer.port))
    if peer.proxy_address:
        values.update(proxy_session="yes", proxy_local_address=peer.proxy_address,
                      proxy_local_port=str(peer.proxy_port),
                      proxy_external_address=peer.proxy_bound_address,
                      proxy_external_port=str(peer.proxy_bound_port))
    else:
        values.update(proxy_session="", proxy_local_address="", proxy_local_port="",
                      proxy_external_address="", proxy_external_port="")
    return values


def _mx_or_a(host: Host) -> str:
    return "MX" if host.via_mx else "A"


def _sni(host: Host) -> str | None:
    return None if _is_ip(host.name) else host.name


def _data_size(job: DeliveryJob) -> int:
    try:
        return os.stat(job.data_path).st_size
    except OSError:
        return job.envelope.size


def _smtp_error(stage: str, reply: SmtpReply) -> str:
    return f"SMTP error from remote mail server after {stage}: {reply.one_line}"


def _status_code(reply: SmtpReply | None, status: str) -> str:
    if reply is not None and reply.enhanced_status:
        return reply.enhanced_status
    return "5.0.0" if status == FAILED else "4.0.0"


def _diagnostic(reply: SmtpReply | None, text: str) -> str:
    return f"smtp; {reply.one_line}" if reply is not None else f"X-mta-server; {text}"

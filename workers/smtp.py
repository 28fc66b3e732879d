"""The SMTP worker: accepts on the inherited listeners, one greenlet per
connection (the one that accepted it), until told to stop; then it
finishes its sessions and returns."""
from __future__ import annotations

import functools
import os
import socket
import ssl
from typing import Callable

import gevent.ssl
import msgpack

from mta.acl import Decision
from mta.committer import GroupCommitter
from mta.connection_gate import ConnectionGate, ConnectionLimits
from mta.expand import ExpansionError, compile_expansion
from mta.lists import HostList, ListError
from mta.lookups import LookupCache
from mta.message_id import MessageIdSource
from mta.policy import DEFER, Verdict
from mta.policy_setup import build_policy_factory
from mta.smtp_server import ServerResources, SmtpConnection
from mta.smtp_session import Limits
from mta.spool import Spool
from mta.variables import SessionVariables
from workers.acceptor import Acceptor
from workers.context import WorkerContext
from workers.handlers import HandlerPool
from workers.process import BootError


def serve(ctx: WorkerContext) -> None:
    for counter in ("connections", "connections_total", "ratelimit_defers", "received"):
        ctx.stats.setdefault(counter, 0)
    resources = build_resources(ctx)
    handlers = HandlerPool()
    acceptors = [Acceptor(listener, tls, ctx.logs) for listener, tls in ctx.listeners]
    for acceptor in acceptors:
        _offer_turn(ctx.stats, resources, handlers, acceptor)
    ctx.stopping.wait()
    for acceptor in acceptors:
        acceptor.close()
    for listener, _ in ctx.listeners:
        listener.close()
    handlers.drain(ctx.config.shutdown_timeout)


def _offer_turn(stats: dict, resources: ServerResources, handlers: HandlerPool, acceptor: Acceptor) -> None:
    """Have a handler wait for the next connection on `acceptor`."""
    handlers.submit(functools.partial(_take_turn, stats, resources, handlers, acceptor))


def _take_turn(stats: dict, resources: ServerResources, handlers: HandlerPool, acceptor: Acceptor) -> None:
    """Wait for a connection on `acceptor`, pass the turn on, serve it here
    (workers/acceptor.py says why)."""
    accepted = acceptor.accept()
    if accepted is None:
        return
    _offer_turn(stats, resources, handlers, acceptor)
    sock, peer = accepted
    stats["connections_total"] += 1
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = SmtpConnection(resources, sock, peer, acceptor.tls_on_connect)
    except OSError:  # reset by the client before we looked at it
        sock.close()
        return
    connection.run()


def build_resources(ctx: WorkerContext) -> ServerResources:
    config = ctx.config
    spool = Spool(config.spool_directory)
    lookups = LookupCache()
    limits = Limits(
        hostname=config.primary_hostname,
        message_size_limit=config.message_size_limit,
        recipients_max=config.recipients_max,
        max_synprot_errors=config.smtp_max_synprot_errors,
        tls_available=bool(config.tls_certificate),
        qualify_domain=config.qualify_domain,
    )
    gate = ConnectionGate(
        ConnectionLimits(config.smtp_accept_max, config.smtp_accept_max_per_host, config.smtp_accept_max_per_proxy),
        ctx.shared.conncounts,
        ctx.shared.conncounts.slot(ctx.stats["slot"]),
        ctx.logs,
    )
    return ServerResources(
        limits=limits,
        logs=ctx.logs,
        committer=GroupCommitter(spool, config.spool_sync, alone=lambda: ctx.stats.get("connections", 0) <= 1),
        ids=MessageIdSource(os.getpid()),
        hosts_proxy=_hosts_proxy(config),
        proxy_timeout=config.proxy_protocol_timeout,
        receive_timeout=config.smtp_receive_timeout,
        banner=_banner(config, ctx.logs, lookups),
        make_policy=build_policy_factory(config, ctx.shared, ctx.logs, lookups, observer=_verdict_counter(ctx.stats)),
        connection_gate=gate,
        tls_context=_tls_context(config),
        message_queued=_notifier(ctx),
        stats=ctx.stats,
    )


def _verdict_counter(stats: dict) -> Callable[[str, Verdict, Decision], None]:
    """Count each stage's verdict (`stats["acl"]["rcpt:deny"]`), and the
    defers decided by a statement with a ratelimit condition."""
    verdicts = stats.setdefault("acl", {})

    def count(stage: str, verdict: Verdict, decision: Decision) -> None:
        key = f"{stage}:{verdict.action}"
        verdicts[key] = verdicts.get(key, 0) + 1
        statement = decision.statement
        if verdict.action == DEFER and statement is not None and \
                any(item.name == "ratelimit" for item in statement.items):
            stats["ratelimit_defers"] += 1

    return count


def _hosts_proxy(config) -> HostList | None:
    if not config.hosts_proxy:
        return None
    try:
        return HostList(config.hosts_proxy, config.compiled_lists, config.primary_hostname)
    except ListError as exc:
        raise BootError(f"hosts_proxy: {exc}") from None


def _banner(config, logs, lookups):
    try:
        expansion = compile_expansion(config.smtp_banner)
    except ExpansionError as exc:
        raise BootError(f"smtp_banner: {exc}") from None

    def banner(session) -> str:
        try:
            return expansion.expand(SessionVariables(session, lookups))
        except ExpansionError as exc:
            logs.panic(f"smtp_banner expansion failed: {exc}")
            return f"{config.primary_hostname} ESMTP"

    return banner


def _tls_context(config) -> ssl.SSLContext | None:
    if not config.tls_certificate:
        return None
    # gevent's SSLContext: its sockets wait cooperatively.  The stdlib's
    # would make the accepted socket blocking, and one client slow to
    # finish its handshake would stall every session of the worker.
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_certificate, config.tls_privatekey)
    except (OSError, ssl.SSLError) as exc:
        raise BootError(f"cannot load tls_certificate/tls_privatekey: {exc}") from None
    return context


def _notifier(ctx: WorkerContext):
    """Tell a queue runner about a new message; if its inbox is full the
    spool scan will find the message anyway, so a failed send is only counted."""
    inboxes = ctx.runner_inboxes
    stats = ctx.stats

    def message_queued(message_id: str) -> None:
        if not inboxes:
            return
        inbox = inboxes[hash(message_id) % len(inboxes)]
        try:
            inbox.send(msgpack.packb({"queued": message_id}), socket.MSG_DONTWAIT)
        except OSError:
            stats["notify_dropped"] = stats.get("notify_dropped", 0) + 1

    return message_queued

"""Deliver one spooled message: route, transport, journal, log, retry, bounce.

`Deliverer.deliver(id)` runs one delivery attempt under the message's lock.
The order of events per recipient is what makes a crash safe:

1. a successful delivery is journalled (fsynced -J line), then logged `=>`
   (when it completes the message, removing the message takes the place of
   the journal line: one fsync fewer);
2. failures are collected; at the end of the attempt the bounce is spooled
   (durably), then the failures are journalled, then logged `**`, then the
   bounce's `<=` line;
3. deferrals update the -R retry state (written atomically) and are logged
   `==`; a deferral past its retry time-out becomes a failure;
4. when every recipient is journalled the message is removed, `Completed`.

A crash re-delivers only recipients without a journal line.  The one
duplicate a crash can cause is a second bounce, if it strikes between
spooling a bounce and journalling its failures.

Host retry times live in memory per process (`mta.retry.HostRetryTable`),
message retry times in the message's -R file.
"""
from __future__ import annotations

import os
import pwd
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import gevent

from mta.histogram import Histogram
from mta.bounce import BounceError, FailedRecipient, inject_bounce
from mta.config import Config
from mta.delivery_config import DeliveryConfig
from mta.dns_resolver import Resolver, system_nameservers
from mta.log import Logs
from mta.lookups import LookupCache
from mta.message_id import MessageIdSource
from mta.retry import (
    HostRetryTable, RecipientRetry, find_retry_rule, is_due, pack_retry_state, record_deferral,
    unpack_retry_state,
)
from mta.routers import (
    Address, Host, RouteFailed, Routed, RoutingContext, resolve_by_name, route_address,
)
from mta.spool import Envelope, Spool, SpoolError
from mta.transports import (
    DEFERRED, DELIVERED, ERRNO_HRETRY, FAILED, DeliveryJob, HostUsed, Result, TransportServices,
)
from mta.transports.smtp import ConnectionCache

COMPLETED = "completed"
DEFERRED_MESSAGE = "deferred"
NOT_DUE = "not_due"
LOCKED = "locked"
GONE = "gone"

ERRNO_UNKNOWN = -1


# ---------------------------------------------------------------- log lines (pure)

def format_duration(seconds: float) -> str:
    """Exim's QT= style: 3s, 1m2s, 1h0m5s, 2d3h0m0s."""
    seconds = int(max(seconds, 0))
    parts = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size or parts:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    parts.append(f"{seconds}s")
    return "".join(parts)


def host_fields(host: HostUsed | None, selector: frozenset[str]) -> str:
    """` H=name [ip]:port PRX=[proxy]:port X=cipher` as selected."""
    if host is None:
        return ""
    with_port = "outgoing_port" in selector
    text = f" H={host.name} [{host.address}]"
    if with_port:
        text += f":{host.port}"
    if host.proxy_address and "proxy" in selector:
        text += f" PRX=[{host.proxy_address}]"
        if with_port:
            text += f":{host.proxy_port}"
    if host.tls_cipher and "tls_cipher" in selector:
        text += f" X={host.tls_cipher.replace('TLSv', 'TLS', 1)}"
    return text


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class LogInfo:
    """Message facts some log items need."""

    message_id: str
    sender: str
    size: int
    received_time: float


def delivered_line(info: LogInfo, result: Result, arrow: str, router: str, transport: str,
                   local: bool, selector: frozenset[str], now: float) -> str:
    address = result.address
    who = f"{address.local_part} <{address.address}>" if local else address.address
    text = f"{info.message_id} {arrow} {who}"
    if "sender_on_delivery" in selector:
        text += f" F=<{info.sender}>"
    text += f" R={router} T={transport}"
    if "delivery_size" in selector:
        text += f" S={info.size}"
    text += host_fields(result.host, selector)
    if result.text:
        text += f" C={_quoted(result.text)}"
    if "queue_time" in selector:
        text += f" QT={format_duration(now - info.received_time)}"
    return text


def _route_fields(router: str, transport: str) -> str:
    return (f" R={router}" if router else "") + (f" T={transport}" if transport else "")


def deferred_line(info: LogInfo, result: Result, router: str, transport: str,
                  selector: frozenset[str]) -> str:
    return (f"{info.message_id} == {result.address.address}{_route_fields(router, transport)}"
            f" defer ({result.errno}){host_fields(result.host, selector)}: {_flat(result.text)}")


def failed_line(info: LogInfo, result: Result, router: str, transport: str,
                selector: frozenset[str]) -> str:
    return (f"{info.message_id} ** {result.address.address}{_route_fields(router, transport)}"
            f"{host_fields(result.host, selector)}: {_flat(result.text)}")


def _flat(text: str) -> str:
    return " ".join(text.split("\n"))


# ---------------------------------------------------------------- one attempt's bookkeeping

@dataclass
class _Outcome:
    """A recipient's result with where it came from."""

    result: Result
    router: str
    transport: str
    timed_out: bool = False


@dataclass
class _Run:
    """One delivery attempt of one message."""

    envelope: Envelope
    info: LogInfo
    pending: list[str]
    retry: dict[str, RecipientRetry]
    failures: list[_Outcome] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    removed: bool = False


class Deliverer:
    """Delivers messages for one process; keeps its connection cache, host
    retry table and resolvers between messages."""

    def __init__(self, config: Config, delivery: DeliveryConfig, spool: Spool, logs: Logs,
                 proxypool=None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.delivery = delivery
        self.spool = spool
        self.logs = logs
        self.clock = clock
        self.ids = MessageIdSource(os.getpid())
        self.lookups = LookupCache()
        self.services = TransportServices(ConnectionCache(), HostRetryTable(), proxypool,
                                          delivery.retry_rules)
        self.counters: Counter[str] = Counter()
        self.latency = Histogram()  # seconds from reception to delivery, per recipient
        self.in_flight: set[str] = set()
        self.on_new_message: Callable[[str], None] = lambda message_id: None
        self._resolvers: dict[tuple, Resolver] = {}
        self._rng = random.Random()
        self._user = config.exim_user or pwd.getpwuid(os.geteuid()).pw_name
        self._spool_fd = spool.input_fd  # opened now, not lazily by two threads at once

    # ------------------------------------------------------------ entry points

    def deliver(self, message_id: str, forced: bool = False) -> str:
        """One attempt; returns COMPLETED, DEFERRED_MESSAGE, NOT_DUE, LOCKED or GONE.

        `forced` ignores the message's retry times (a newly queued message).
        """
        fd = self.spool.lock_message(message_id)
        if fd is None:
            return LOCKED
        self.in_flight.add(message_id)
        try:
            if not _same_file(fd, self.spool.path(message_id, "H")):
                return GONE
            return self._deliver_locked(message_id, forced)
        finally:
            self.in_flight.discard(message_id)
            os.close(fd)

    def close(self) -> None:
        self.services.connections.close_all()

    def close_idle_connections(self) -> int:
        return self.services.connections.close_idle()

    # ------------------------------------------------------------ the attempt

    def _deliver_locked(self, message_id: str, forced: bool) -> str:
        try:
            envelope = self.spool.read_envelope(message_id)
            self.spool.check_data(envelope)
        except SpoolError as exc:
            moved = self.spool.set_aside(message_id)
            self.logs.panic(f"{message_id} unusable spool files ({exc}): set aside {len(moved)} files "
                            f"in {self.spool.corrupt}")
            return GONE
        journal = self.spool.read_journal(message_id)
        pending = list(dict.fromkeys(r for r in envelope.recipients if r not in journal))
        retry = self._read_retry(message_id)
        if pending and not forced and not is_due(retry, pending, self.clock()):
            return NOT_DUE
        info = LogInfo(message_id, envelope.sender, envelope.size, envelope.received_time)
        run = _Run(envelope, info, pending, {r: retry[r] for r in pending if r in retry})
        if pending:
            self._attempt(run)
        return self._finish(run)

    def _attempt(self, run: _Run) -> None:
        context = RoutingContext(self._variables(run.envelope), self.lookups, resolve_by_name,
                                 self._resolver_for, self._rng)
        groups: dict[tuple[str, str, tuple[Host, ...]], list[Address]] = {}
        for recipient in run.pending:
            address = Address.parse(recipient)
            outcome = route_address(self.delivery.routers, address, run.envelope.sender, context)
            if isinstance(outcome, Routed):
                groups.setdefault((outcome.transport, outcome.router, outcome.hosts), []).append(address)
            elif isinstance(outcome, RouteFailed):
                run.failures.append(_Outcome(Result(address, FAILED, outcome.message, outcome.errno),
                                             outcome.router, ""))
            else:
                self._deferred(run, _Outcome(Result(address, DEFERRED, outcome.message, outcome.errno,
                                                    retry_error="*"), outcome.router, ""))
        for (transport_name, router, hosts), addresses in groups.items():
            self._run_transport(run, context, transport_name, router, hosts, addresses)

    def _run_transport(self, run: _Run, context: RoutingContext, transport_name: str, router: str,
                       hosts: tuple[Host, ...], addresses: list[Address]) -> None:
        transport = self.delivery.transports[transport_name]
        job = DeliveryJob(run.envelope, self.spool.path(run.info.message_id, "D"), addresses, router,
                          hosts, context.variables, self.lookups)
        try:
            results = transport.deliver(job, self.services)
        except Exception as exc:  # a bug must not lose the message: defer and report it
            self.logs.panic(f"{run.info.message_id} transport {transport_name} crashed: {exc!r}\n"
                            + traceback.format_exc())
            results = [Result(address, DEFERRED, f"internal error in transport: {exc!r}", ERRNO_UNKNOWN,
                              retry_error="*") for address in addresses]
        self._record(run, results, router, transport_name, transport.local)

    def _record(self, run: _Run, results: list[Result], router: str, transport: str, local: bool) -> None:
        delivered = [result for result in results if result.status == DELIVERED]
        if delivered:
            self._make_durable(run, delivered)
            now = self.clock()
            for index, result in enumerate(delivered):
                arrow = "=>" if index == 0 or local else "->"
                self.logs.main(delivered_line(run.info, result, arrow, router, transport, local,
                                              self.logs.selector, now))
                run.done.add(result.address.address)
                run.retry.pop(result.address.address, None)
                self.latency.observe(now - run.info.received_time)
            self.counters["delivered"] += len(delivered)
        for result in results:
            if result.status == FAILED:
                run.failures.append(_Outcome(result, router, transport))
            elif result.status == DEFERRED:
                self._deferred(run, _Outcome(result, router, transport))

    def _make_durable(self, run: _Run, delivered: list[Result]) -> None:
        """Journal the deliveries, or, when they are the last recipients of
        the message, remove the message instead: one fsync fewer, and just as
        durable before the log lines are written."""
        addresses = {result.address.address for result in delivered}
        if not run.failures and all(r in run.done or r in addresses for r in run.pending):
            _in_thread(self.spool.remove_message, run.info.message_id)
            run.removed = True
            return
        _in_thread(self.spool.journal, run.info.message_id, [(address, "delivered") for address in addresses])

    def _deferred(self, run: _Run, outcome: _Outcome) -> None:
        result = outcome.result
        address = result.address.address
        now = self.clock()
        rule = find_retry_rule(self.delivery.retry_rules, address, result.retry_error or "*")
        state = record_deferral(run.retry.get(address), rule, now, result.text, result.not_before)
        if state is None:
            outcome.timed_out = rule is not None
            run.failures.append(outcome)
            return
        run.retry[address] = state
        self.counters["deferred"] += 1
        if result.errno == ERRNO_HRETRY and "retry_defer" not in self.logs.selector:
            return
        self.logs.main(deferred_line(run.info, result, outcome.router, outcome.transport,
                                     self.logs.selector))

    # ------------------------------------------------------------ the end of an attempt

    def _finish(self, run: _Run) -> str:
        message_id = run.info.message_id
        if run.failures and not self._settle_failures(run):
            self._write_retry(run)
            return DEFERRED_MESSAGE
        remaining = [r for r in run.pending if r not in run.done]
        if remaining:
            self._write_retry(run)
            return DEFERRED_MESSAGE
        if not run.removed:
            _in_thread(self.spool.remove_message, message_id)
        self.logs.main(f"{message_id} Completed")
        self.counters["completed"] += 1
        return COMPLETED

    def _settle_failures(self, run: _Run) -> bool:
        """Bounce, journal and log the failures; False if the bounce could not be spooled."""
        bounce = None
        if run.envelope.sender:
            try:
                bounce = self._bounce(run)
            except BounceError as exc:
                self.logs.panic(f"{run.info.message_id} failures kept for the next attempt: {exc}")
                return False
        addresses = [outcome.result.address.address for outcome in run.failures]
        _in_thread(self.spool.journal, run.info.message_id, [(address, "failed") for address in addresses])
        self._log_failures(run)
        if bounce is not None:
            bounce_id, size = bounce
            self.logs.main(f"{bounce_id} <= <> R={run.info.message_id} U={self._user} P=local S={size}")
            self.counters["bounces"] += 1
            self.on_new_message(bounce_id)
        else:
            self.logs.main(f"{run.info.message_id} failed address(es) not reported: "
                           "the message is a bounce (null sender); discarded")
        return True

    def _log_failures(self, run: _Run) -> None:
        for outcome in run.failures:
            result = outcome.result
            if outcome.timed_out:
                result = Result(result.address, FAILED, "retry timeout exceeded", result.errno, result.host)
            self.logs.main(failed_line(run.info, result, outcome.router, outcome.transport,
                                       self.logs.selector))
            run.done.add(result.address.address)
            run.retry.pop(result.address.address, None)
        self.counters["failed"] += len(run.failures)

    def _bounce(self, run: _Run) -> tuple[str, int]:
        failures = [_failed_recipient(outcome) for outcome in run.failures]
        bounce_id = self.ids.next_id()
        size = _in_thread(inject_bounce, self.spool, bounce_id, run.envelope, failures,
                          self.config.primary_hostname, self.clock())
        return bounce_id, size

    # ------------------------------------------------------------ state files

    def _read_retry(self, message_id: str) -> dict[str, RecipientRetry]:
        try:
            with open(self.spool.path(message_id, "R"), "rb") as handle:
                return unpack_retry_state(handle.read())
        except FileNotFoundError:
            return {}

    def _write_retry(self, run: _Run) -> None:
        state = {r: run.retry[r] for r in run.pending if r in run.retry and r not in run.done}
        message_id = run.info.message_id
        if state:
            _in_thread(self.spool.write_atomically, message_id, "R", pack_retry_state(state))
            return
        try:
            os.unlink(self.spool.path(message_id, "R"))
        except FileNotFoundError:
            return

    # ------------------------------------------------------------ helpers

    def _variables(self, envelope: Envelope) -> dict[str, str]:
        sender_local, _, sender_domain = envelope.sender.rpartition("@")
        return {
            "message_id": envelope.id,
            "sender_address": envelope.sender,
            "sender_address_local_part": sender_local,
            "sender_address_domain": sender_domain,
            "sender_host_address": envelope.host_address,
            "received_protocol": envelope.protocol,
            "message_size": str(envelope.size),
            "recipients_count": str(len(envelope.recipients)),
            "primary_hostname": self.config.primary_hostname,
            "qualify_domain": self.config.qualify_domain,
        }

    def _resolver_for(self, servers: tuple[tuple[str, int], ...]) -> Resolver:
        resolver = self._resolvers.get(servers)
        if resolver is None:
            resolver = Resolver(list(servers) or system_nameservers())
            self._resolvers[servers] = resolver
        return resolver


def _failed_recipient(outcome: _Outcome) -> FailedRecipient:
    result = outcome.result
    host = result.host
    remote = host.name if host is not None else ""
    if outcome.timed_out:
        return FailedRecipient(result.address.address, f"retry timeout exceeded\n{result.text}",
                               "4.4.7", result.diagnostic, remote)
    reason = result.text
    if host is not None:
        reason = f"host {host.name} [{host.address}]\n{reason}"
    return FailedRecipient(result.address.address, reason, result.status_code or "5.0.0",
                           result.diagnostic, remote)


def _in_thread(function: Callable, *args):
    """Run a spool write that fsyncs in gevent's thread pool: the hub goes on
    with other deliveries meanwhile, and their fsyncs overlap (the file
    system commits them together)."""
    return gevent.get_hub().threadpool.apply(function, args)


def _same_file(fd: int, path: str) -> bool:
    """The locked envelope is still the one in the spool (not removed by
    another runner between our open and our lock)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False

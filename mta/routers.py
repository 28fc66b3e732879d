"""Routers: decide, per recipient, which transport delivers it and to which hosts.

Drivers (Exim's names and semantics, a subset of their options):
- `accept`: accepts every address its preconditions let through.
- `manualroute`: `route_list` rules `DOMAIN-PATTERN HOST-LIST [OPTIONS]`
  separated by `;`, or one expanded `route_data`.  Host items are
  `name`, `name::port` (the colon doubled in a colon list), `[ip]:port`, or a
  bare IPv6 address in a list with another separator (`<; ::1`).  Options:
  `byname` (default: the system resolver through gevent's thread pool),
  `bydns` (the DNS stub resolver), `randomize`, `no_randomize`, `ipv4_only`.
- `dnslookup`: MX records, else the domain's own A/AAAA records, through
  the stub resolver (our option `dns_servers`, default resolv.conf).

Generic options: `driver`, `transport`, `domains`, `senders`, `local_parts`,
`more` / `no_more`.  The first router whose preconditions hold and which
accepts wins; a router that declines passes the address on, unless it has
`no_more`; an address no router accepts is "Unrouteable address".

Deviations: no `self` checks (an MX pointing at this host is used as any
other), manualroute's `host_find_failed` knows decline/defer/fail/ignore/pass
(default defer; Exim's default, freeze, is not supported).
"""
from __future__ import annotations

import random
import socket as stdlib_socket
from dataclasses import dataclass, field
from typing import Callable, Protocol

from mta.dns_resolver import DnsNotFound, DnsTemporaryError, MxRecord, Resolver
from mta.expand import DictContext, Expansion, ExpansionError, compile_expansion
from mta.lists import AddressList, DomainList, HostList, LocalPartList, NamedLists, split_list
from mta.lookups import LookupCache, LookupFailed, parse_ip
from mta.values import BadValue, parse_port

ERRNO_UNKNOWNHOST = -32
ERRNO_DNSDEFER = -36
ERRNO_EXPANDFAIL = -27

HOST_OPTIONS = ("byname", "bydns", "randomize", "no_randomize", "ipv4_only")
HOST_FIND_FAILED = ("decline", "defer", "fail", "ignore", "pass")


# ---------------------------------------------------------------- values

@dataclass(frozen=True)
class Address:
    """One recipient as routers and transports see it."""

    address: str
    local_part: str
    domain: str

    @classmethod
    def parse(cls, address: str) -> "Address":
        local, at, domain = address.rpartition("@")
        if not at:
            return cls(address, address, "")
        return cls(address, local, domain.lower())


@dataclass(frozen=True)
class Host:
    """A destination host: its name, one address, optional port and MX preference."""

    name: str
    address: str
    port: int | None = None
    mx: int | None = None

    @property
    def via_mx(self) -> bool:
        return self.mx is not None


@dataclass(frozen=True)
class Routed:
    router: str
    transport: str
    hosts: tuple[Host, ...] = ()


@dataclass(frozen=True)
class RouteFailed:
    router: str
    message: str
    errno: int = 0


@dataclass(frozen=True)
class RouteDeferred:
    router: str
    message: str
    errno: int = ERRNO_DNSDEFER


RouteOutcome = Routed | RouteFailed | RouteDeferred


class NameResolver(Protocol):
    def __call__(self, name: str) -> list[str]: ...


@dataclass
class RoutingContext:
    """What routers need from the outside world for one message."""

    variables: dict[str, str]
    lookups: LookupCache
    resolve_by_name: Callable[[str], list[str]]
    resolver_for: Callable[[tuple[tuple[str, int], ...]], Resolver]
    rng: random.Random = field(default_factory=random.Random)

    def expand(self, expansion: Expansion, address: Address) -> str:
        variables = dict(self.variables, local_part=address.local_part, domain=address.domain)
        return expansion.expand(DictContext(variables, self.lookups))


class HostNotFound(Exception):
    """A host name that does not exist."""


def resolve_by_name(name: str) -> list[str]:
    """The system resolver (hosts file, then DNS) through gevent's resolver."""
    from gevent import socket

    try:
        infos = socket.getaddrinfo(name, None, 0, stdlib_socket.SOCK_STREAM)
    except stdlib_socket.gaierror as exc:
        if exc.errno in (stdlib_socket.EAI_NONAME, getattr(stdlib_socket, "EAI_NODATA", -5)):
            raise HostNotFound(name) from None
        raise DnsTemporaryError(f"lookup of {name} failed: {exc}") from None
    addresses: list[str] = []
    for info in infos:
        if info[4][0] not in addresses:
            addresses.append(info[4][0])
    return addresses


# ---------------------------------------------------------------- pure parsers

def parse_host_item(item: str) -> tuple[str, int | None]:
    """`name`, `name:port`, `[ip]`, `[ip]:port` or a bare IPv6 address."""
    if item.startswith("["):
        inside, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise BadValue(f'malformed host item "{item}"')
        return inside, parse_port(rest[1:]) if rest else None
    if item.count(":") == 1:
        name, _, port = item.partition(":")
        return name, parse_port(port)
    return item, None


def parse_host_list(text: str) -> list[tuple[str, int | None]]:
    items = split_list(text)
    if not items:
        raise BadValue("empty host list")
    return [parse_host_item(item) for item in items]


def split_rule_fields(rule: str) -> list[str]:
    """Whitespace-separated fields; a field may be "double quoted"."""
    fields, position = [], 0
    while position < len(rule):
        if rule[position].isspace():
            position += 1
            continue
        if rule[position] == '"':
            end = rule.find('"', position + 1)
            if end < 0:
                raise BadValue(f"missing closing quote in {rule!r}")
            fields.append(rule[position + 1:end])
            position = end + 1
            continue
        end = position
        while end < len(rule) and not rule[end].isspace():
            end += 1
        fields.append(rule[position:end])
        position = end
    return fields


def check_host_options(options: list[str]) -> tuple[str, ...]:
    for option in options:
        if option not in HOST_OPTIONS:
            raise BadValue(f'unknown host list option "{option}"')
    return tuple(options)


def order_mx(records: list[MxRecord], rng: random.Random) -> list[MxRecord]:
    """By preference; equal preferences in random order (RFC 5321 5.1)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda record: record.preference)


def is_null_mx(records: list[MxRecord]) -> bool:
    """RFC 7505: a single MX with exchange "." means the domain takes no mail."""
    return any(record.exchange in (".", "") for record in records)


# ---------------------------------------------------------------- routers

@dataclass
class Router:
    """Generic options; drivers subclass it and implement `route`."""

    name: str
    driver: str = ""
    transport: str | None = None
    domains: DomainList | None = None
    senders: AddressList | None = None
    local_parts: LocalPartList | None = None
    more: bool = True

    def applies(self, address: Address, sender: str) -> bool:
        """The preconditions (Exim checks local_parts, domains, then senders)."""
        if self.local_parts is not None and not self.local_parts.match(address.local_part):
            return False
        if self.domains is not None and not self.domains.match(address.domain):
            return False
        return self.senders is None or self.senders.match(sender)

    def route(self, address: Address, context: RoutingContext) -> RouteOutcome | None:
        """A routing outcome, or None to decline."""
        raise NotImplementedError


@dataclass
class AcceptRouter(Router):
    def route(self, address: Address, context: RoutingContext) -> RouteOutcome | None:
        return Routed(self.name, self.transport or "")


@dataclass(frozen=True)
class RouteRule:
    """One manualroute rule: domain pattern, host list (expanded per use), options."""

    domains: DomainList
    hosts: Expansion
    options: tuple[str, ...]


def parse_route_rule(rule: str, named: NamedLists, primary_hostname: str) -> RouteRule:
    fields = split_rule_fields(rule)
    if len(fields) < 2:
        raise BadValue(f'route_list rule "{rule}" needs a domain pattern and a host list')
    pattern, hosts, *options = fields
    try:
        expansion = compile_expansion(hosts)
    except ExpansionError as exc:
        raise BadValue(f'host list "{hosts}": {exc}') from None
    if expansion.is_constant:
        parse_host_list(hosts)
    return RouteRule(DomainList(pattern, named, primary_hostname), expansion, check_host_options(options))


@dataclass
class ManualrouteRouter(Router):
    route_list: tuple[RouteRule, ...] = ()
    route_data: Expansion | None = None
    host_find_failed: str = "defer"
    hosts_randomize: bool = False

    def route(self, address: Address, context: RoutingContext) -> RouteOutcome | None:
        try:
            found = self._find_rule(address, context)
        except (ExpansionError, LookupFailed) as exc:
            return RouteDeferred(self.name, f"failed to expand route_data/route_list: {exc}",
                                 ERRNO_EXPANDFAIL)
        if found is None:
            return None
        host_text, options = found
        try:
            items = parse_host_list(host_text)
        except BadValue as exc:
            return RouteDeferred(self.name, f"bad host list: {exc}", ERRNO_UNKNOWNHOST)
        if self.hosts_randomize and "no_randomize" not in options or "randomize" in options:
            context.rng.shuffle(items)
        return self._resolve(items, options, context)

    def _find_rule(self, address: Address, context: RoutingContext) -> tuple[str, tuple[str, ...]] | None:
        if self.route_data is not None:
            fields = split_rule_fields(context.expand(self.route_data, address))
            if not fields:
                return None
            return fields[0], check_host_options(fields[1:])
        for rule in self.route_list:
            if rule.domains.match(address.domain):
                return context.expand(rule.hosts, address), rule.options
        return None

    def _resolve(self, items: list[tuple[str, int | None]], options: tuple[str, ...],
                 context: RoutingContext) -> RouteOutcome | None:
        hosts: list[Host] = []
        for name, port in items:
            if parse_ip(name) is not None:
                hosts.append(Host(name, name, port))
                continue
            try:
                addresses = self._lookup(name, options, context)
            except DnsTemporaryError as exc:
                return RouteDeferred(self.name, f"host lookup for {name} deferred: {exc}")
            except (HostNotFound, DnsNotFound):
                addresses = []
            if not addresses:
                if self.host_find_failed == "ignore":
                    continue
                return self._host_not_found(name)
            hosts += [Host(name, ip, port) for ip in addresses]
        if not hosts:
            return RouteDeferred(self.name, "all hosts were ignored (host_find_failed)", ERRNO_UNKNOWNHOST)
        return Routed(self.name, self.transport or "", tuple(hosts))

    @staticmethod
    def _lookup(name: str, options: tuple[str, ...], context: RoutingContext) -> list[str]:
        if "bydns" in options:
            addresses = context.resolver_for(()).addresses(name, ipv4_only="ipv4_only" in options)
        else:
            addresses = context.resolve_by_name(name)
        if "ipv4_only" in options:
            addresses = [ip for ip in addresses if ":" not in ip]
        return addresses

    def _host_not_found(self, name: str) -> RouteOutcome | None:
        message = f"lookup of host \"{name}\" failed in {self.name} router"
        if self.host_find_failed in ("decline", "pass"):
            return None
        if self.host_find_failed == "fail":
            return RouteFailed(self.name, message, ERRNO_UNKNOWNHOST)
        return RouteDeferred(self.name, message, ERRNO_UNKNOWNHOST)


@dataclass
class DnslookupRouter(Router):
    dns_servers: tuple[tuple[str, int], ...] = ()
    ignore_target_hosts: HostList | None = None

    def route(self, address: Address, context: RoutingContext) -> RouteOutcome | None:
        resolver = context.resolver_for(self.dns_servers)
        try:
            hosts = self._find_hosts(address.domain, resolver, context.rng)
        except DnsNotFound:
            return None
        except DnsTemporaryError as exc:
            return RouteDeferred(self.name, str(exc))
        except _NullMx:
            return RouteFailed(self.name, "domain does not accept mail (null MX record)")
        except _NoMxHosts:
            return RouteFailed(self.name, "all relevant MX records point to non-existent hosts",
                               ERRNO_UNKNOWNHOST)
        if self.ignore_target_hosts is not None:
            hosts = [host for host in hosts if not self.ignore_target_hosts.match(host.address)]
        if not hosts:
            return None
        return Routed(self.name, self.transport or "", tuple(hosts))

    def _find_hosts(self, domain: str, resolver: Resolver, rng: random.Random) -> list[Host]:
        records = resolver.mx(domain)
        if not records:
            return [Host(domain, ip) for ip in resolver.addresses(domain)]
        if is_null_mx(records):
            raise _NullMx()
        hosts: list[Host] = []
        temporary: DnsTemporaryError | None = None
        for record in order_mx(records, rng):
            try:
                hosts += [Host(record.exchange, ip, None, record.preference)
                          for ip in resolver.addresses(record.exchange)]
            except DnsNotFound:
                continue
            except DnsTemporaryError as exc:
                temporary = exc
        if not hosts and temporary is not None:
            raise temporary
        if not hosts:
            raise _NoMxHosts()
        return hosts


class _NullMx(Exception):
    pass


class _NoMxHosts(Exception):
    pass


# Option tables: name -> kind (`mta.delivery_config` parses kinds; the
# defaults are the dataclass field defaults).
GENERIC_OPTIONS = {
    "transport": "string",
    "domains": "domainlist",
    "senders": "addresslist",
    "local_parts": "localpartlist",
    "more": "bool",
}

DRIVER_OPTIONS = {
    "accept": {},
    "manualroute": {
        "route_list": "route_list",
        "route_data": "expand",
        "host_find_failed": "choice:" + ",".join(HOST_FIND_FAILED),
        "hosts_randomize": "bool",
    },
    "dnslookup": {
        "dns_servers": "dns_servers",
        "ignore_target_hosts": "hostlist",
    },
}

ROUTER_DRIVERS: dict[str, type[Router]] = {
    "accept": AcceptRouter,
    "manualroute": ManualrouteRouter,
    "dnslookup": DnslookupRouter,
}


# ---------------------------------------------------------------- routing

def route_address(routers: list[Router], address: Address, sender: str,
                  context: RoutingContext) -> RouteOutcome:
    """Run the routers in order; the first that accepts, fails or defers decides."""
    for router in routers:
        try:
            if not router.applies(address, sender):
                continue
        except LookupFailed as exc:
            return RouteDeferred(router.name, f"lookup in the preconditions failed: {exc}", -35)
        outcome = router.route(address, context)
        if outcome is not None:
            return outcome
        if not router.more:
            return RouteFailed(router.name, "Unrouteable address")
    return RouteFailed("", "Unrouteable address")

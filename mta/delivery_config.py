"""Compile `begin routers`, `begin transports` and `begin retry` into objects.

`compile_delivery(config)` either returns a complete `DeliveryConfig` or
raises ConfigError naming FILE:LINE: an unknown driver or option, a bad
value, a router naming an unknown transport, a bad retry rule, a constant
`socks_proxy` that does not parse.  `check-config` and the master call it.

Option syntax is Exim's: `name = value`, booleans also as bare `name` and
`no_name` / `not_name`, an optional `hide` prefix.  Each driver's options and
defaults are in its module (`mta.routers.DRIVER_OPTIONS`,
`mta.transports.*.OPTIONS`); their kinds are parsed here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from mta.config import Config, Section
from mta.configfile import Line
from mta.expand import ExpansionError, compile_expansion
from mta.lists import AddressList, DomainList, HostList, ListError, LocalPartList, NamedLists, split_list
from mta.lookups import LookupCache, parse_ip
from mta.retry import RetryRule, parse_retry_rules
from mta.routers import (
    DRIVER_OPTIONS as ROUTER_OPTIONS, GENERIC_OPTIONS as ROUTER_GENERIC_OPTIONS, ROUTER_DRIVERS, Router,
    parse_host_item, parse_route_rule,
)
from mta.transports import appendfile, smtp
from mta.values import BadValue, parse_bool, parse_int, parse_port, parse_time
from shared.socks5 import SocksConfigError, parse_proxy_list

TRANSPORT_DRIVERS = {
    "appendfile": (appendfile.AppendfileTransport, appendfile.OPTIONS),
    "smtp": (smtp.SmtpTransport, smtp.OPTIONS),
}
DNS_PORT = 53


@dataclass
class DeliveryConfig:
    routers: list[Router]
    transports: dict[str, Any]
    retry_rules: list[RetryRule]

    @property
    def uses_dns(self) -> bool:
        return any(router.driver == "dnslookup" for router in self.routers)


@dataclass
class _Environment:
    """What option parsers need from the main configuration."""

    named: NamedLists
    primary_hostname: str
    lookups: LookupCache


def compile_delivery(config: Config) -> DeliveryConfig:
    env = _Environment(config.compiled_lists, config.primary_hostname, LookupCache())
    transports = {section.name: _transport(section, env, config) for section in config.transports}
    routers = [_router(section, env, transports) for section in config.routers]
    return DeliveryConfig(routers, transports, parse_retry_rules(config.retry_rules))


# ---------------------------------------------------------------- drivers

def _router(section: Section, env: _Environment, transports: dict[str, Any]) -> Router:
    driver, lines = _driver(section, "router", ROUTER_DRIVERS)
    table = dict(ROUTER_GENERIC_OPTIONS, **ROUTER_OPTIONS[driver])
    values = _parse_options(lines, table, env, f"{driver} router")
    router = ROUTER_DRIVERS[driver](name=section.name, driver=driver, **values)
    if not router.transport:
        raise section.line.error(f'router "{section.name}" has no transport (transport = NAME)')
    if router.transport not in transports:
        raise section.line.error(f'router "{section.name}": transport "{router.transport}" '
                                 'is not defined in "begin transports"')
    if driver == "manualroute" and not router.route_list and router.route_data is None:
        raise section.line.error(f'manualroute router "{section.name}" needs route_list or route_data')
    return router


def _transport(section: Section, env: _Environment, config: Config) -> Any:
    driver, lines = _driver(section, "transport", TRANSPORT_DRIVERS)
    cls, table = TRANSPORT_DRIVERS[driver]
    values = _parse_options(lines, table, env, f"{driver} transport")
    extra = {"resolve_path": config.resolve_path} if driver == "appendfile" else {}
    transport = cls(name=section.name, driver=driver, **values, **extra)
    problem = transport.problems()
    if problem:
        raise section.line.error(f'transport "{section.name}": {problem}')
    return transport


def _driver(section: Section, kind: str, drivers: dict) -> tuple[str, list[Line]]:
    driver = ""
    rest = []
    for line in section.body:
        name, value = _split(line)
        if name == "driver":
            if value is None or not value.strip():
                raise line.error("driver needs a value")
            driver = value.strip()
            if driver not in drivers:
                raise line.error(f'{kind} "{section.name}": unknown driver "{driver}" '
                                 f'(supported: {", ".join(sorted(drivers))})')
        else:
            rest.append(line)
    if not driver:
        raise section.line.error(f'{kind} "{section.name}" has no driver')
    return driver, rest


# ---------------------------------------------------------------- options

_OPTION_LINE = re.compile(r"(?:hide\s+)?([a-z_][a-z0-9_]*)\s*(?:=\s*(.*))?", re.DOTALL)


def _split(line: Line) -> tuple[str, str | None]:
    match = _OPTION_LINE.fullmatch(line.text)
    if not match:
        raise line.error(f'malformed option setting "{line.text}"')
    return match.group(1), match.group(2)


def _parse_options(lines: list[Line], table: dict, env: _Environment, what: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for line in lines:
        name, value = _split(line)
        negated = re.fullmatch(r"(?:no|not)_(\w+)", name)
        if name not in table and negated and negated.group(1) in table:
            name = negated.group(1)
            if table[name] != "bool" or value is not None:
                raise line.error(f'"{name}" is not a boolean option (no_{name})')
            value = "false"
        elif name not in table:
            raise line.error(f'option "{name}" unknown or not supported for the {what}')
        if name in values:
            raise line.error(f'"{name}" option set for the second time')
        values[name] = _parse_value(line, name, table[name], value, env)
    return values


def _parse_value(line: Line, name: str, kind: str, value: str | None, env: _Environment) -> Any:
    if value is None:
        if kind != "bool":
            raise line.error(f'"{name}" needs a value')
        return True
    value = _unquote(value.strip())
    parser = _KIND_PARSERS.get(kind.split(":")[0])
    try:
        if kind.startswith("choice:"):
            return _choice(value, kind[7:].split(","))
        return parser(value, env)
    except (BadValue, ValueError, ListError, ExpansionError, SocksConfigError) as exc:
        raise line.error(f"{name}: {exc}") from None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _choice(value: str, choices: list[str]) -> str:
    if value not in choices:
        raise BadValue(f'"{value}" is not one of {", ".join(choices)}')
    return value


def _no_expansion(value: str) -> str:
    if "$" in value:
        raise BadValue("expansions are not supported in this option")
    return value


def _expansion(value: str, env: _Environment):
    return compile_expansion(value, named=env.named, lookups=env.lookups)


def _socks(value: str, env: _Environment):
    expansion = _expansion(value, env)
    if expansion.is_constant:
        parse_proxy_list(value)
    return expansion


def _octal(value: str, env: _Environment) -> int:
    if not re.fullmatch(r"[0-7]+", value):
        raise BadValue(f'"{value}" is not an octal number')
    return int(value, 8)


def _route_list(value: str, env: _Environment) -> tuple:
    rules = split_list(value, ";")
    if not rules:
        raise BadValue("empty route_list")
    return tuple(parse_route_rule(rule, env.named, env.primary_hostname) for rule in rules)


def _dns_servers(value: str, env: _Environment) -> tuple[tuple[str, int], ...]:
    servers = []
    for item in split_list(value):
        address, port = parse_host_item(item)
        if parse_ip(address) is None:
            raise BadValue(f'DNS server "{address}" is not an IP address')
        servers.append((address, port or DNS_PORT))
    return tuple(servers)


_KIND_PARSERS: dict[str, Callable[[str, _Environment], Any]] = {
    "bool": lambda value, env: parse_bool(value),
    "string": lambda value, env: _no_expansion(value),
    "expand": _expansion,
    "time": lambda value, env: parse_time(value),
    "int": lambda value, env: parse_int(value),
    "octal": _octal,
    "port": lambda value, env: parse_port(value),
    "hostlist": lambda value, env: HostList(_no_expansion(value), env.named, env.primary_hostname,
                                            lookups=env.lookups),
    "domainlist": lambda value, env: DomainList(_no_expansion(value), env.named, env.primary_hostname,
                                                lookups=env.lookups),
    "addresslist": lambda value, env: AddressList(_no_expansion(value), env.named, env.primary_hostname,
                                                  lookups=env.lookups),
    "localpartlist": lambda value, env: LocalPartList(_no_expansion(value), env.named, env.primary_hostname,
                                                      lookups=env.lookups),
    "socks": _socks,
    "route_list": _route_list,
    "dns_servers": _dns_servers,
}


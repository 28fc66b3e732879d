"""The configuration: main options with their types and defaults, named lists,
and the raw `begin` sections that the ACL, router and transport code compile.

`load_config(path)` either returns a complete, checked `Config` or raises
`ConfigError` naming FILE:LINE.  Nothing here starts processes or opens
sockets, so `check-config`, the master and the tests share it.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from mta.configfile import ConfigError, Line, RawConfig, read_config
from mta.values import BadValue, parse_int, parse_port, parse_time

LIST_KINDS = ("domainlist", "hostlist", "addresslist", "localpartlist")


def _string(text: str) -> str:
    return text


def _optional_time(text: str) -> float:
    return parse_time(text)


def _positive_int(text: str) -> int:
    value = parse_int(text)
    if value < 0:
        raise BadValue(f'"{text}" must not be negative')
    return value


def _port_list(text: str) -> tuple[int, ...]:
    from mta.lists import split_list

    return tuple(parse_port(item) for item in split_list(text))


def _address_list(text: str) -> tuple[str, ...]:
    from mta.lists import split_list

    return tuple(split_list(text))


def _listen_address(text: str) -> tuple[str, int] | tuple[()]:
    """`127.0.0.1:9125` or `[::1]:9125`: an IP address and a port; empty: off."""
    import ipaddress

    if not text.strip():
        return ()
    match = re.fullmatch(r"\s*(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):(\d+)\s*", text)
    if not match:
        raise BadValue(f'"{text}" is not ADDRESS:PORT (an IPv6 address in brackets)')
    try:
        address = str(ipaddress.ip_address(match.group(1) or match.group(2)))
    except ValueError:
        raise BadValue(f'"{text}" does not start with an IP address') from None
    return address, parse_port(match.group(3))


def _boolean(text: str) -> bool:
    """Exim's spellings: `name`, `no_name` and `not_name` are handled by the
    parser; a value may be true/false/yes/no."""
    word = text.strip().lower()
    if word in ("true", "yes"):
        return True
    if word in ("false", "no"):
        return False
    raise BadValue(f'"{text}" is not true, false, yes or no')


def _spool_sync(text: str) -> str:
    if text.strip() not in ("syncfs", "fsync"):
        raise BadValue(f'"{text}" is not syncfs or fsync')
    return text.strip()


@dataclass(frozen=True)
class Option:
    parse: Callable[[str], Any]
    default: Any


# Every main option we accept.  Anything else is an error naming its line.
MAIN_OPTIONS: dict[str, Option] = {
    "local_interfaces": Option(_address_list, ("0.0.0.0", "::")),
    "daemon_smtp_ports": Option(_port_list, (25,)),
    "tls_on_connect_ports": Option(_port_list, ()),
    "tls_certificate": Option(_string, ""),
    "tls_privatekey": Option(_string, ""),
    "tls_advertise_hosts": Option(_string, "*"),
    "spool_directory": Option(_string, "/var/spool/mta-server"),
    "log_file_path": Option(_string, ""),
    "pid_file_path": Option(_string, ""),
    "log_selector": Option(_string, ""),
    "primary_hostname": Option(_string, ""),
    "smtp_banner": Option(_string, "$primary_hostname ESMTP mta-server $tod_full"),
    "qualify_domain": Option(_string, ""),
    "message_size_limit": Option(_positive_int, 50 * 1024 * 1024),
    "recipients_max": Option(_positive_int, 50000),
    "smtp_receive_timeout": Option(_optional_time, 300.0),
    "smtp_max_synprot_errors": Option(_positive_int, 3),
    "smtp_accept_max": Option(_positive_int, 1000),
    "smtp_accept_max_per_host": Option(_positive_int, 0),
    "smtp_accept_max_per_proxy": Option(_positive_int, 0),
    "exim_user": Option(_string, ""),
    "smtp_workers": Option(_positive_int, 0),
    "smtp_worker_cpu_affinity": Option(_boolean, True),
    "queue_runners": Option(_positive_int, 1),
    "queue_run_interval": Option(_optional_time, 30.0),
    "remote_max_parallel": Option(_positive_int, 16),
    "hosts_proxy": Option(_string, ""),
    "proxy_protocol_timeout": Option(_optional_time, 3.0),
    "acl_smtp_connect": Option(_string, ""),
    "acl_smtp_helo": Option(_string, ""),
    "acl_smtp_mail": Option(_string, ""),
    "acl_smtp_rcpt": Option(_string, ""),
    "acl_smtp_predata": Option(_string, ""),
    "acl_smtp_data": Option(_string, ""),
    "spool_sync": Option(_spool_sync, "syncfs"),
    "ratelimit_table_size": Option(_positive_int, 65536),
    "worker_heartbeat_timeout": Option(_optional_time, 30.0),
    "shutdown_timeout": Option(_optional_time, 30.0),
    "metrics_listen": Option(_listen_address, ()),
}

# log_selector items we know; the default set is Exim's where it overlaps.
LOG_SELECTOR_ITEMS = {
    "incoming_port": False,
    "outgoing_port": False,
    "smtp_connection": False,
    "proxy": False,
    "proxy_failure": True,
    "received_recipients": False,
    "sender_on_delivery": False,
    "smtp_protocol_error": False,
    "smtp_syntax_error": False,
    "delivery_size": False,
    "queue_time": False,
    "tls_cipher": True,
    "retry_defer": True,
    "rejected_header": True,
    "pid": False,
    "all": False,
}


@dataclass
class Section:
    """A named block in `begin acl/routers/transports`: its lines, unparsed."""

    name: str
    line: Line
    body: list[Line] = field(default_factory=list)


@dataclass
class Config:
    path: str
    options: dict[str, Any]
    option_lines: dict[str, Line]
    named_lists: dict[str, dict[str, tuple[str, Line]]]
    acls: dict[str, Section]
    routers: list[Section]
    transports: list[Section]
    retry_rules: list[Line]
    log_selector: frozenset[str]
    files: list[str]
    macros: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["options"][name]
        except KeyError:
            raise AttributeError(name) from None

    def resolve_path(self, path: str) -> str:
        """Relative paths in the configuration are taken from its folder."""
        return os.path.normpath(os.path.join(os.path.dirname(self.path), path))

    @property
    def compiled_lists(self):
        """The named lists as `mta.lists.NamedLists` (texts by kind and name)."""
        from mta.lists import NamedLists

        texts = {kind: {name: text for name, (text, _) in lists.items()} for kind, lists in self.named_lists.items()}
        return NamedLists(
            domain=texts["domainlist"], host=texts["hostlist"],
            address=texts["addresslist"], localpart=texts["localpartlist"],
        )


def load_config(path: str) -> Config:
    raw = read_config(path)
    options, option_lines, named = _main_section(raw.main)
    config = Config(
        path=os.path.abspath(path),
        options=options,
        option_lines=option_lines,
        named_lists=named,
        acls={s.name: s for s in _named_blocks(raw, "acl")},
        routers=_named_blocks(raw, "routers"),
        transports=_named_blocks(raw, "transports"),
        retry_rules=list(raw.sections.get("retry", [])),
        log_selector=frozenset(),
        files=raw.files,
        macros=raw.macros,
    )
    _apply_derived_defaults(config)
    config.log_selector = parse_log_selector(config.options["log_selector"], option_lines.get("log_selector"))
    _check_acl_names(config)
    _check_lists(config)
    return config


def _check_lists(config: Config) -> None:
    """Compile every named list and hosts_proxy so errors name their line."""
    from mta.lists import AddressList, DomainList, HostList, ListError, LocalPartList

    kinds = {"domainlist": DomainList, "hostlist": HostList, "addresslist": AddressList, "localpartlist": LocalPartList}
    named = config.compiled_lists
    for kind, lists in config.named_lists.items():
        for name, (text, line) in lists.items():
            try:
                kinds[kind](text, named, config.primary_hostname)
            except ListError as exc:
                raise line.error(f"{kind} {name}: {exc}") from None
    if config.hosts_proxy:
        try:
            HostList(config.hosts_proxy, named, config.primary_hostname)
        except ListError as exc:
            raise config.option_lines["hosts_proxy"].error(f"hosts_proxy: {exc}") from None


def _main_section(lines: list[Line]):
    options = {name: option.default for name, option in MAIN_OPTIONS.items()}
    option_lines: dict[str, Line] = {}
    named: dict[str, dict[str, tuple[str, Line]]] = {kind: {} for kind in LIST_KINDS}
    for line in lines:
        if _named_list(line, named):
            continue
        name, value = _parse_option(line, *_split_option(line))
        if name in option_lines:
            raise line.error(f'"{name}" option set for the second time')
        options[name] = value
        option_lines[name] = line
    return options, option_lines, named


def _named_list(line: Line, named: dict) -> bool:
    match = re.fullmatch(r"(domainlist|hostlist|addresslist|localpartlist)\s+(\w[\w.-]*)\s*=\s*(.*)", line.text)
    if not match:
        if re.match(r"(domainlist|hostlist|addresslist|localpartlist)\b", line.text):
            raise line.error("malformed named list (expected: hostlist NAME = items)")
        return False
    kind, name, value = match.groups()
    if name in named[kind]:
        raise line.error(f'{kind} "{name}" is defined twice')
    named[kind][name] = (value, line)
    return True


def _split_option(line: Line) -> tuple[str, str | None]:
    match = re.fullmatch(r"([a-z_][a-z0-9_]*)\s*(?:=\s*(.*))?", line.text)
    if not match:
        raise line.error(f'malformed option setting "{line.text}"')
    return match.group(1), match.group(2)


def _parse_option(line: Line, name: str, value: str | None) -> tuple[str, Any]:
    """(option name, parsed value); `no_NAME` and `not_NAME` set a boolean
    option false, a bare `NAME` sets it true, as in Exim."""
    negated = re.fullmatch(r"(?:no|not)_(\w+)", name)
    option = MAIN_OPTIONS.get(name)
    if option is None and negated and negated.group(1) in MAIN_OPTIONS:
        base = negated.group(1)
        if MAIN_OPTIONS[base].parse is not _boolean:
            raise line.error(f'"{base}" is not a boolean option')
        if value is not None:
            raise line.error(f'"{name}" takes no value')
        return base, False
    if option is None:
        raise line.error(f'main option "{name}" unknown')
    if value is None:
        if option.parse is _boolean:
            return name, True
        raise line.error(f'"{name}" needs a value')
    try:
        return name, option.parse(value)
    except BadValue as exc:
        raise line.error(f"{name}: {exc}") from None
    except ValueError as exc:
        raise line.error(f"{name}: {exc}") from None


def _apply_derived_defaults(config: Config) -> None:
    options = config.options
    if not options["primary_hostname"]:
        options["primary_hostname"] = socket.gethostname()
    if not options["qualify_domain"]:
        options["qualify_domain"] = options["primary_hostname"]
    options["spool_directory"] = config.resolve_path(options["spool_directory"])
    spool = options["spool_directory"]
    options["log_file_path"] = config.resolve_path(options["log_file_path"] or os.path.join(spool, "log", "%slog"))
    if "%s" not in options["log_file_path"]:
        raise config.option_lines["log_file_path"].error('log_file_path must contain "%s"')
    options["pid_file_path"] = config.resolve_path(options["pid_file_path"] or os.path.join(spool, "mta-server.pid"))
    for name in ("tls_certificate", "tls_privatekey"):
        if options[name]:
            options[name] = config.resolve_path(options[name])
    if bool(options["tls_certificate"]) != bool(options["tls_privatekey"]):
        line = config.option_lines.get("tls_certificate") or config.option_lines.get("tls_privatekey")
        raise line.error("tls_certificate and tls_privatekey must be set together")
    if options["tls_on_connect_ports"] and not options["tls_certificate"]:
        raise config.option_lines["tls_on_connect_ports"].error("tls_on_connect_ports needs tls_certificate")
    if not options["smtp_workers"]:
        options["smtp_workers"] = os.cpu_count() or 1


def parse_log_selector(text: str, line: Line | None = None) -> frozenset[str]:
    """`+item -item ...` applied to the default set; an unknown item is an error."""
    selected = {item for item, on in LOG_SELECTOR_ITEMS.items() if on}
    for word in text.split():
        sign, item = word[:1], word[1:]
        if sign not in "+-" or not sign or item not in LOG_SELECTOR_ITEMS:
            message = f'unknown log_selector item "{word}"'
            raise line.error(message) if line else ConfigError(message)
        if item == "all":
            selected |= set(LOG_SELECTOR_ITEMS) if sign == "+" else set()
            continue
        (selected.add if sign == "+" else selected.discard)(item)
    return frozenset(selected)


def _named_blocks(raw: RawConfig, section: str) -> list[Section]:
    blocks: list[Section] = []
    for line in raw.sections.get(section, []):
        header = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*:\s*(.*)", line.text)
        if header and (section != "acl" or not re.match(r"\w+\s*=", line.text)):
            blocks.append(Section(header.group(1), line))
            rest = header.group(2).strip()
            if rest:
                blocks[-1].body.append(Line(rest, line.filename, line.number))
            continue
        if not blocks:
            raise line.error(f'"{line.text}" is outside any {section} definition (expected NAME:)')
        blocks[-1].body.append(line)
    names = [block.name for block in blocks]
    for block in blocks:
        if names.count(block.name) > 1:
            raise block.line.error(f'{section} "{block.name}" is defined twice')
    return blocks


def _check_acl_names(config: Config) -> None:
    for name, value in config.options.items():
        if not name.startswith("acl_smtp_") or not value:
            continue
        if re.fullmatch(r"[A-Za-z0-9_.-]+", value) and value not in config.acls and value not in ("accept", "deny"):
            raise config.option_lines[name].error(f'{name}: no ACL named "{value}" in "begin acl"')

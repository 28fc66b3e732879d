"""SOCKS5 client byte formats (RFC 1928, RFC 1929) and the `socks_proxy` spec parser.

Everything here is pure: functions take text, bytes or numbers and return values
or raise.  The socket work lives in `shared.socks_dialer`.

Spec syntax (Exim's `socks_proxy`, already expanded): a list separated by `:`
(a leading `<X` makes X the separator; a doubled separator is a literal one, so
`::` is a colon), each item a whitespace-separated list: an IP address, then
`name=value` options among auth, name, pass, port, tmo, pri, weight.
Unlike Exim, an unknown option, a repeated option or a bad value raises
`SocksConfigError` instead of being ignored.
"""

from __future__ import annotations

import ipaddress
import random
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable

SOCKS_VERSION = 0x05
USERPASS_VERSION = 0x01
METHOD_NONE = 0x00
METHOD_USERPASS = 0x02
METHOD_UNACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

DEFAULT_PORT = 1080
DEFAULT_TMO = 5.0
DEFAULT_PRI = 1
DEFAULT_WEIGHT = 1

REPLY_MEANINGS = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused by destination",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}

# Replies that describe the destination, not the proxy: another proxy would
# most likely get the same answer, so the dialer stops and blames the target.
# REP 2 (ruleset) is deliberately absent: another proxy's rules may allow it.
DESTINATION_FAULT_REPLIES = frozenset({3, 4, 5, 6})


class SocksError(Exception):
    """Base class; `reason` is a one-line, human-readable explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SocksConfigError(SocksError, ValueError):
    """The `socks_proxy` specification is invalid."""


class SocksProtocolError(SocksError):
    """The proxy broke the protocol or refused us (bad version, method, auth, EOF)."""


class SocksReplyError(SocksError):
    """The proxy answered the CONNECT request with REP != 0."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        super().__init__(reason or reply_reason(code))
        self.code = code

    @property
    def destination_fault(self) -> bool:
        return self.code in DESTINATION_FAULT_REPLIES


def reply_reason(code: int) -> str:
    """'connection refused by destination (SOCKS reply 5)', also for unassigned codes."""
    meaning = REPLY_MEANINGS.get(code, f"unassigned reply code {code:#04x}")
    return f"{meaning} (SOCKS reply {code})"


@dataclass(frozen=True)
class ProxySpec:
    """One proxy of a `socks_proxy` list; validated on construction."""

    address: str
    port: int = DEFAULT_PORT
    auth: str = "none"
    name: str = ""
    password: str = field(default="", repr=False)
    tmo: float = DEFAULT_TMO
    pri: int = DEFAULT_PRI
    weight: int = DEFAULT_WEIGHT

    def __post_init__(self) -> None:
        try:
            canonical = str(ipaddress.ip_address(self.address))
        except ValueError:
            raise SocksConfigError(f"proxy address {self.address!r} is not an IP address") from None
        object.__setattr__(self, "address", canonical)
        _check_proxy_values(self)

    @property
    def method(self) -> int:
        """The one SOCKS method we offer to this proxy."""
        return METHOD_USERPASS if self.auth == "name" else METHOD_NONE

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def _check_proxy_values(spec: ProxySpec) -> None:
    if not 1 <= spec.port <= 65535:
        raise SocksConfigError(f"proxy {spec.address}: port {spec.port} out of range 1-65535")
    if spec.auth not in ("none", "name"):
        raise SocksConfigError(f"proxy {spec.address}: auth={spec.auth!r}, expected none or name")
    if not spec.tmo > 0:
        raise SocksConfigError(f"proxy {spec.address}: tmo must be positive")
    if spec.weight < 0:
        raise SocksConfigError(f"proxy {spec.address}: weight must not be negative")
    if spec.auth == "name":
        _check_credential(spec.address, "name", spec.name)
        _check_credential(spec.address, "pass", spec.password)


def _check_credential(address: str, option: str, value: str) -> None:
    if not 1 <= len(value.encode()) <= 255:
        raise SocksConfigError(
            f"proxy {address}: auth=name needs {option}= of 1 to 255 bytes (RFC 1929)")


# ---------------------------------------------------------------- spec parser

def split_exim_list(text: str, default_sep: str = ":") -> list[str]:
    """Split an Exim list: `<X` prefix sets the separator, doubled separator is literal.

    Items are stripped of surrounding white space; empty items are dropped.
    """
    text = text.lstrip()
    sep = default_sep
    if len(text) >= 2 and text[0] == "<" and not text[1].isalnum() and not text[1].isspace():
        sep, text = text[1], text[2:]
    items, current, i = [], [], 0
    while i < len(text):
        if text[i] != sep:
            current.append(text[i])
        elif text[i + 1:i + 2] == sep:
            current.append(sep)
            i += 1
        else:
            items.append("".join(current))
            current = []
        i += 1
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


_TIME_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_TIME_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_exim_time(text: str) -> float:
    """Exim time syntax ('5s', '2m', '1h30m', bare '5' = seconds), decimals allowed."""
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not text or _TIME_PART.sub("", text):
        raise ValueError(f"bad time value {text!r}")
    return sum(float(n) * _TIME_UNITS[unit] for n, unit in _TIME_PART.findall(text))


def _parse_int(text: str, signed: bool = False) -> int:
    if not re.fullmatch(r"[+-]?\d+" if signed else r"\d+", text):
        raise ValueError(f"bad number {text!r}")
    return int(text)


_OPTION_FIELDS: dict[str, tuple[str, Callable[[str], object]]] = {
    "auth": ("auth", str),
    "name": ("name", str),
    "pass": ("password", str),
    "port": ("port", _parse_int),
    "tmo": ("tmo", parse_exim_time),
    "pri": ("pri", lambda v: _parse_int(v, signed=True)),
    "weight": ("weight", _parse_int),
}


def parse_proxy_spec(item: str) -> ProxySpec:
    """One list item: 'IP opt=value ...'."""
    address, *options = item.split()
    values: dict[str, object] = {}
    for option in options:
        word, eq, raw = option.partition("=")
        if not eq or word not in _OPTION_FIELDS:
            raise SocksConfigError(f"proxy {address}: unknown option {option!r}")
        attr, convert = _OPTION_FIELDS[word]
        if attr in values:
            raise SocksConfigError(f"proxy {address}: option {word}= given twice")
        try:
            values[attr] = convert(raw)
        except ValueError as exc:
            raise SocksConfigError(f"proxy {address}: {word}={raw!r}: {exc}") from None
    return ProxySpec(address, **values)


def parse_proxy_list(text: str) -> list[ProxySpec]:
    """Parse an expanded `socks_proxy` value; an empty value gives [] (connect directly)."""
    return [parse_proxy_spec(item) for item in split_exim_list(text)]


# ---------------------------------------------------------------- selection

def selection_order(specs: Iterable[ProxySpec], is_down: Callable[[ProxySpec], bool],
                    rng: random.Random) -> list[ProxySpec]:
    """The order in which to try the proxies.

    Proxies not known to be down come first: highest `pri` first, and within a
    priority a weighted random order (each next pick weighted among those left;
    weight 0 only after the positive weights).  Proxies known to be down follow,
    in the same kind of order: they are still tried as a last resort (a probe),
    so a stale "down" mark never turns a deliverable message into a failure,
    and when every proxy is down we still try them all.
    """
    up, down = [], []
    for spec in specs:
        (down if is_down(spec) else up).append(spec)
    return _priority_order(up, rng) + _priority_order(down, rng)


def _priority_order(specs: list[ProxySpec], rng: random.Random) -> list[ProxySpec]:
    order: list[ProxySpec] = []
    for pri in sorted({s.pri for s in specs}, reverse=True):
        order += _weighted_shuffle([s for s in specs if s.pri == pri], rng)
    return order


def _weighted_shuffle(specs: list[ProxySpec], rng: random.Random) -> list[ProxySpec]:
    left = [s for s in specs if s.weight > 0]
    order = []
    while left:
        point = rng.random() * sum(s.weight for s in left)
        index = _weighted_index(left, point)
        order.append(left.pop(index))
    return order + [s for s in specs if s.weight == 0]


def _weighted_index(specs: list[ProxySpec], point: float) -> int:
    for index, spec in enumerate(specs):
        point -= spec.weight
        if point < 0:
            return index
    return len(specs) - 1  # point == total after float rounding


# ---------------------------------------------------------------- byte formats

def build_greeting(method: int) -> bytes:
    """Method negotiation offering exactly one method: 05 01 <method>."""
    return bytes((SOCKS_VERSION, 1, method))


def parse_method_reply(reply: bytes) -> int:
    """The method the proxy chose; 0xFF (nothing acceptable) raises SocksProtocolError."""
    _check_length("method reply", reply, 2)
    if reply[0] != SOCKS_VERSION:
        raise SocksProtocolError(f"method reply has version {reply[0]:#04x}, not SOCKS5")
    if reply[1] == METHOD_UNACCEPTABLE:
        raise SocksProtocolError("proxy accepts none of the offered authentication methods (0xFF)")
    return reply[1]


def build_userpass(name: str, password: str) -> bytes:
    """RFC 1929 request: 01 ULEN UNAME PLEN PASSWD (UTF-8, each 1..255 bytes)."""
    uname, passwd = name.encode(), password.encode()
    for what, value in (("name", uname), ("pass", passwd)):
        if not 1 <= len(value) <= 255:
            raise SocksConfigError(f"SOCKS {what} must be 1 to 255 bytes, got {len(value)}")
    return bytes((USERPASS_VERSION, len(uname))) + uname + bytes((len(passwd),)) + passwd


def parse_auth_reply(reply: bytes) -> None:
    """Accept `01 00`; any non-zero status is a refusal (danted sends 1, microsocks 2)."""
    _check_length("authentication reply", reply, 2)
    if reply[0] != USERPASS_VERSION:
        raise SocksProtocolError(f"authentication reply has version {reply[0]:#04x}, not 0x01")
    if reply[1] != 0:
        raise SocksProtocolError(f"authentication refused by proxy (status {reply[1]:#04x})")


def build_connect(ip: str, port: int) -> bytes:
    """CONNECT request to an IP destination: ATYP 1 (IPv4) or 4 (IPv6)."""
    address = ipaddress.ip_address(ip)
    if not 0 < port <= 65535:
        raise ValueError(f"destination port {port} out of range")
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes((SOCKS_VERSION, CMD_CONNECT, 0, atyp)) + address.packed + struct.pack("!H", port)


def reply_length(head: bytes) -> int:
    """How many more bytes of the CONNECT reply to read after `head` (0: complete).

    `head` holds the bytes received so far, at least VER REP RSV ATYP.  REP != 0
    raises SocksReplyError at once (servers may send a truncated error reply).
    For ATYP 3 the length byte is needed first: with 4 bytes this returns 1,
    with 5 bytes it returns the rest.
    """
    _check_reply_head(head)
    atyp = head[3]
    if atyp == ATYP_IPV4:
        total = 4 + 4 + 2
    elif atyp == ATYP_IPV6:
        total = 4 + 16 + 2
    elif len(head) == 4:
        total = 5
    else:
        total = 5 + head[4] + 2
    return max(total - len(head), 0)


def _check_reply_head(head: bytes) -> None:
    if len(head) < 4:
        raise SocksProtocolError(f"CONNECT reply too short ({len(head)} bytes)")
    if head[0] != SOCKS_VERSION:
        raise SocksProtocolError(f"CONNECT reply has version {head[0]:#04x}, not SOCKS5")
    if head[1] != 0:
        raise SocksReplyError(head[1])
    if head[3] not in (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6):
        raise SocksProtocolError(f"CONNECT reply has unknown address type {head[3]:#04x}")


def parse_connect_reply(reply: bytes) -> tuple[str, int]:
    """(bound address, bound port) of a complete reply; REP != 0 raises SocksReplyError."""
    expected = _expected_reply_size(reply)
    if len(reply) != expected:
        raise SocksProtocolError(f"CONNECT reply is {len(reply)} bytes, expected {expected}")
    (port,) = struct.unpack("!H", reply[-2:])
    atyp = reply[3]
    if atyp == ATYP_DOMAIN:
        return reply[5:-2].decode("utf-8", "replace"), port
    return str(ipaddress.ip_address(reply[4:-2])), port


def _expected_reply_size(reply: bytes) -> int:
    _check_reply_head(reply)
    head = reply[:5] if reply[3] == ATYP_DOMAIN else reply[:4]
    return len(head) + reply_length(head)


def truncated_reply_error(partial: bytes) -> SocksError:
    """The error for a CONNECT reply cut short by EOF.

    Some servers send only VER REP RSV on failure: if REP is there and non-zero,
    report it (so a refused destination is still recognised as such).
    """
    if len(partial) >= 2 and partial[0] == SOCKS_VERSION and partial[1] != 0:
        return SocksReplyError(partial[1])
    return SocksProtocolError(f"proxy closed the connection after {len(partial)} bytes of the CONNECT reply")


def _check_length(what: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise SocksProtocolError(f"{what} is {len(data)} bytes, expected {size}")

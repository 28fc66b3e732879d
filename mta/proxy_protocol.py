"""Inbound PROXY protocol (HAProxy's, versions 1 and 2): a pure parser and a thin reader.

`parse()` takes the bytes received so far and says one of three things: the
header is complete (header, bytes consumed), the bytes are still a valid prefix
of a header (None: read more), or they can no longer become one
(ProxyProtocolError, raised as early as the bytes allow).  The version is told
by the first byte only: the v2 signature starts with CR, the v1 line with "P".

`read_header()` drives `parse()` over a gevent socket.  It never reads a byte
past the header from the socket (it peeks, then consumes exactly the header),
so whatever follows -- an SMTP command, a TLS ClientHello -- is still in the
socket for the next layer.

Choices where the specification leaves room (reference/proxy-protocol.txt):
- v1: the first CR or LF ends the line and must be CRLF, even after UNKNOWN.
- v2: only the seven family/transport bytes the specification lists are
  accepted, for LOCAL too.  A LOCAL header is consumed whole and nothing after
  the fixed 16 bytes is interpreted (addresses and TLVs are discarded, as the
  specification asks).  For PROXY with UNSPEC the address block is empty and
  TLVs start right after the fixed part, as HAProxy sends it; its transport
  is reported as "UNSPEC".  DGRAM is parsed and reported as transport "DGRAM"
  for the caller to refuse.
- v2 TLVs: every TLV is framed and returned raw in `tlvs`; the ones exposed as
  fields are decoded strictly (AUTHORITY, ALPN and the SSL CN as UTF-8, the SSL
  version and cipher as US-ASCII); CRC32C is verified; UNIQUE_ID is at most
  128 bytes; a second copy of an interpreted TLV is refused, since which copy
  should win would be arbitrary.  Other TLVs (NOOP, NETNS, custom ones) and the
  other SSL sub-TLVs are framed but not interpreted.
- ssl_verified: None without an SSL TLV; True only when the client flags say a
  certificate was presented and verify is 0 (HAProxy sends verify 0 when there
  was no certificate at all).
- IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are reported as plain IPv4;
  the family keeps what the wire said (TCP6 / INET6).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import gevent
import gevent.socket

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the worst-case line, CRLF included
V2_FIXED_LENGTH = 16

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_SUBTYPE_SSL_GROUP = 0x26
PP2_SUBTYPE_SSL_SIG_SCHEME = 0x27
PP2_SUBTYPE_SSL_CLIENT_CERT = 0x28
PP2_TYPE_NETNS = 0x30

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

UNIQUE_ID_MAX_LENGTH = 128
SSL_FIXED_LENGTH = 5  # client (u8) + verify (u32)

_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_COMMAND_CODES = {name: code for code, name in _V2_COMMANDS.items()}
_V2_FAMILY_NAMES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_V2_TRANSPORT_NAMES = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
# The only family/transport bytes the specification lists; value: address block length.
_V2_ADDRESS_LENGTHS = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_UNIX_PATH_LENGTH = 108
_IPV4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_ZERO_PREFIX = b"\x00" * 12

_V1_KEYWORDS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_FIELD_NAMES = ("source address", "destination address", "source port", "destination port")
_DIGITS = b"0123456789"
_IPV4_CHARS = _DIGITS + b"."
_IPV6_CHARS = _DIGITS + b"abcdefABCDEF:."

_IPV4_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_TEXT = _IPV4_OCTET + rb"(?:\." + _IPV4_OCTET + rb"){3}"
_PORT_TEXT = rb"(0|[1-9][0-9]{0,4})"
# One regex for the usual well-formed line.  It accepts a subset of the
# grammar; whatever it does not accept goes to the field-by-field parser,
# which is the authority and says why a line is refused.
_V1_FAST_LINE = re.compile(
    rb"PROXY (?:TCP4 (%s) (%s)|TCP6 ([0-9a-fA-F:.]+) ([0-9a-fA-F:.]+)) %s %s\r\n"
    % (_IPV4_TEXT, _IPV4_TEXT, _PORT_TEXT, _PORT_TEXT)
)

_CASTAGNOLI_REVERSED = 0x82F63B78


class ProxyProtocolError(Exception):
    """The bytes are not, and can no longer become, a valid PROXY header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header said.  See the module docstring for the conventions."""

    version: int
    command: str
    family: str
    transport: str
    source_address: str | None
    source_port: int | None
    destination_address: str | None
    destination_port: int | None
    tlvs: tuple[tuple[int, bytes], ...]
    authority: str = ""
    alpn: str = ""
    unique_id: bytes = b""
    ssl_version: str = ""
    ssl_cn: str = ""
    ssl_cipher: str = ""
    ssl_verified: bool | None = None

    @property
    def carries_addresses(self) -> bool:
        """True only when the header's addresses replace the connection's own (PROXY over IP)."""
        return self.command == "PROXY" and self.family in ("TCP4", "TCP6", "INET", "INET6")


_V1_UNKNOWN = ProxyHeader(1, "PROXY", "UNKNOWN", "", None, None, None, None, ())


# --------------------------------------------------------------------------- CRC32C


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CASTAGNOLI_REVERSED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B) of `data`.

    Pure Python with a 256-entry table: the standard library only has the IEEE
    CRC-32 (zlib/binascii), and no CRC32C package is installed.  The per-byte
    loop costs about 0.1 us a byte: some 20 us for a typical 200-byte header.
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc & 0xFF) ^ byte]
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- parse


def parse(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header at the start of `data`.

    Returns (header, bytes consumed) once the header is complete, None while
    `data` is still a valid prefix of a header, and raises ProxyProtocolError
    as soon as it cannot become one.  Nothing after the header is looked at.
    """
    if not data:
        return None
    first = data[0]
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if first == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyProtocolError(f"not a PROXY protocol header (first byte 0x{first:02x})")


# ----------------------------------------------------------------------------- v1


def _parse_v1(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    line = bytes(data[:V1_MAX_LENGTH])
    fast = _v1_fast(line)
    if fast is not None:
        return fast
    if not line.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(line):
            return None
        raise ProxyProtocolError("v1: header does not start with 'PROXY '")
    cr = line.find(b"\r")
    lf = line.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyProtocolError("v1: bare LF; the line must end with CRLF")
    if cr == -1 or cr + 1 == len(line):
        if len(line) == V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1: no CRLF within the first {V1_MAX_LENGTH} bytes")
        if cr == -1:
            _check_v1_partial(line[len(V1_PREFIX):].split(b" "))
        else:  # the line is complete but for its LF: judge it now
            _v1_header(line[len(V1_PREFIX):cr].split(b" "))
        return None
    if lf != cr + 1:
        raise ProxyProtocolError("v1: CR not followed by LF")
    return _v1_header(line[len(V1_PREFIX):cr].split(b" ")), cr + 2


def _v1_fast(line: bytes) -> tuple[ProxyHeader, int] | None:
    """The usual line through one regex; None means "ask the full parser"."""
    match = _V1_FAST_LINE.match(line)
    if match is None:
        return None
    source4, destination4, source6, destination6, source_port, destination_port = match.groups()
    source_port, destination_port = int(source_port), int(destination_port)
    if source_port > 0xFFFF or destination_port > 0xFFFF:
        return None
    if source4 is not None:
        family, source, destination = "TCP4", source4.decode("ascii"), destination4.decode("ascii")
    else:
        packed_source, packed_destination = _pton_ipv6(source6), _pton_ipv6(destination6)
        if packed_source is None or packed_destination is None:
            return None
        family, source, destination = "TCP6", _ipv6_text(packed_source), _ipv6_text(packed_destination)
    return ProxyHeader(1, "PROXY", family, "", source, source_port, destination, destination_port, ()), match.end()


def _v1_header(fields: list[bytes]) -> ProxyHeader:
    """Build the header from the line between "PROXY " and CRLF, split on spaces."""
    keyword = fields[0]
    if keyword == b"UNKNOWN":  # anything may follow, and is ignored
        return _V1_UNKNOWN
    parse_address = _v1_address_parser(keyword)
    _check_v1_spacing(fields, complete=True)
    return ProxyHeader(
        version=1,
        command="PROXY",
        family=keyword.decode("ascii"),
        transport="",
        source_address=parse_address(fields[1], _V1_FIELD_NAMES[0]),
        destination_address=parse_address(fields[2], _V1_FIELD_NAMES[1]),
        source_port=_v1_port(fields[3], _V1_FIELD_NAMES[2]),
        destination_port=_v1_port(fields[4], _V1_FIELD_NAMES[3]),
        tlvs=(),
    )


def _check_v1_partial(fields: list[bytes]) -> None:
    """Raise if an unterminated line can no longer become a valid one.

    Every field but the last is complete and gets the full check; the last one
    may still grow, so only its characters are checked.
    """
    keyword = fields[0]
    if len(fields) == 1:
        if not any(known.startswith(keyword) for known in _V1_KEYWORDS):
            raise _v1_unknown_keyword(keyword)
        return
    if keyword == b"UNKNOWN":
        return
    parse_address = _v1_address_parser(keyword)
    _check_v1_spacing(fields, complete=False)
    complete, last = fields[1:-1], fields[-1]
    for position, field in enumerate(complete):
        name = _V1_FIELD_NAMES[position]
        if position < 2:
            parse_address(field, name)
        else:
            _v1_port(field, name)
    position = len(complete)
    allowed = _DIGITS if position >= 2 else _IPV4_CHARS if keyword == b"TCP4" else _IPV6_CHARS
    if last.translate(None, allowed):
        raise ProxyProtocolError(f"v1: unexpected character in the {_V1_FIELD_NAMES[position]}")


def _v1_address_parser(keyword: bytes) -> Callable[[bytes, str], str]:
    if keyword == b"TCP4":
        return _v1_ipv4
    if keyword == b"TCP6":
        return _v1_ipv6
    raise _v1_unknown_keyword(keyword)


def _v1_unknown_keyword(keyword: bytes) -> ProxyProtocolError:
    if not keyword:
        return ProxyProtocolError("v1: missing protocol after 'PROXY ' (or a doubled space)")
    return ProxyProtocolError(f"v1: unknown protocol {keyword[:16]!r}; expected TCP4, TCP6 or UNKNOWN")


def _check_v1_spacing(fields: list[bytes], complete: bool) -> None:
    """TCP4/TCP6 lines have exactly five fields, separated by single spaces."""
    if b"" in (fields if complete else fields[:-1]):
        raise ProxyProtocolError("v1: fields must be separated by exactly one space")
    if len(fields) > 5 or (complete and len(fields) < 5):
        raise ProxyProtocolError(
            f"v1: {fields[0].decode('ascii')} needs 4 fields after the protocol, got {len(fields) - 1}"
        )


def _v1_ipv4(text: bytes, name: str) -> str:
    octets = text.split(b".")
    if len(octets) != 4:
        raise ProxyProtocolError(f"v1: TCP4 needs an IPv4 {name}, got {text[:45]!r}")
    for octet in octets:
        if not octet.isdigit() or len(octet) > 3:
            raise ProxyProtocolError(f"v1: TCP4 needs an IPv4 {name}, got {text[:45]!r}")
        if len(octet) > 1 and octet[0] == 0x30:
            raise ProxyProtocolError(f"v1: {name} has a leading zero")
        if int(octet) > 255:
            raise ProxyProtocolError(f"v1: {name} has an octet above 255")
    return text.decode("ascii")


def _v1_ipv6(text: bytes, name: str) -> str:
    packed = _pton_ipv6(text)
    if packed is None:
        raise ProxyProtocolError(f"v1: TCP6 needs an IPv6 {name}, got {text[:45]!r}")
    return _ipv6_text(packed)


def _pton_ipv6(text: bytes) -> bytes | None:
    """The 16 bytes of a textual IPv6 address, or None if it is not one."""
    if text.translate(None, _IPV6_CHARS):
        return None
    try:
        return socket.inet_pton(socket.AF_INET6, text.decode("ascii"))
    except OSError:
        return None


def _v1_port(text: bytes, name: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise ProxyProtocolError(f"v1: {name} {text[:16]!r} is not a decimal number")
    if len(text) > 1 and text[0] == 0x30:
        raise ProxyProtocolError(f"v1: {name} has a leading zero")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError(f"v1: {name} {port} is above 65535")
    return port


def _ipv6_text(packed: bytes) -> str:
    """Canonical text of a 16-byte address; IPv4-mapped ones as plain IPv4."""
    if packed.startswith(_IPV4_MAPPED_PREFIX):
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    if packed.startswith(_ZERO_PREFIX):  # libc would write "::0.2.0.3" for ::2:3
        return str(ipaddress.IPv6Address(packed))
    return socket.inet_ntop(socket.AF_INET6, packed)


# ----------------------------------------------------------------------------- v2


def _parse_v2(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    fixed = bytes(data[:V2_FIXED_LENGTH])
    meaning = _V2_VALID_STARTS.get(fixed[:14])
    if meaning is None:  # short, or wrong: find out which, and why
        _check_v2_fixed_prefix(fixed)
        return None
    if len(fixed) < V2_FIXED_LENGTH:
        return None
    command, family, transport, address_length = meaning
    total = V2_FIXED_LENGTH + (fixed[14] << 8 | fixed[15])
    if command == "PROXY" and total - V2_FIXED_LENGTH < address_length:
        raise ProxyProtocolError(
            f"v2: {family} needs a {address_length}-byte address block, len is {total - V2_FIXED_LENGTH}"
        )
    if len(data) < total:
        return None
    if command == "LOCAL":
        return ProxyHeader(2, command, family, transport, None, None, None, None, ()), total
    header = bytes(data[:total])
    addresses = _v2_addresses(header, family)
    tlvs_start = V2_FIXED_LENGTH + address_length
    if tlvs_start == total:
        return ProxyHeader(2, command, family, transport, *addresses, ()), total
    tlvs = _split_tlvs(header, tlvs_start, total, "TLV")
    fields = _interpret_tlvs(header, tlvs_start, tlvs)
    return ProxyHeader(2, command, family, transport, *addresses, tuple(tlvs), **fields), total


def _v2_valid_starts() -> dict[bytes, tuple[str, str, str, int]]:
    """Every valid signature+version/command+family byte run, with what it means."""
    return {
        V2_SIGNATURE + bytes((0x20 | command_code, family_byte)): (
            command,
            _V2_FAMILY_NAMES[family_byte >> 4],
            _V2_TRANSPORT_NAMES[family_byte & 0x0F],
            address_length,
        )
        for command_code, command in _V2_COMMANDS.items()
        for family_byte, address_length in _V2_ADDRESS_LENGTHS.items()
    }


_V2_VALID_STARTS = _v2_valid_starts()


def _check_v2_fixed_prefix(fixed: bytes) -> None:
    """Raise as soon as the first (up to 16) bytes cannot start a v2 header."""
    if fixed[:12] != V2_SIGNATURE[: len(fixed)]:
        raise ProxyProtocolError("v2: bad signature")
    if len(fixed) > 12:
        version, command = fixed[12] >> 4, fixed[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError(f"v2: unsupported version {version}")
        if command not in _V2_COMMANDS:
            raise ProxyProtocolError(f"v2: unsupported command 0x{command:x}")
    if len(fixed) > 13:
        _check_v2_family_byte(fixed[13])


def _check_v2_family_byte(family_byte: int) -> None:
    family, transport = family_byte >> 4, family_byte & 0x0F
    if family not in _V2_FAMILY_NAMES:
        raise ProxyProtocolError(f"v2: unknown address family 0x{family:x}")
    if transport not in _V2_TRANSPORT_NAMES:
        raise ProxyProtocolError(f"v2: unknown transport protocol 0x{transport:x}")
    if family_byte not in _V2_ADDRESS_LENGTHS:
        raise ProxyProtocolError(f"v2: invalid family/transport combination 0x{family_byte:02x}")


def _v2_addresses(header: bytes, family: str) -> tuple[str | None, int | None, str | None, int | None]:
    """(source address, source port, destination address, destination port)."""
    if family == "INET":
        source, destination, source_port, destination_port = struct.unpack_from("!4s4sHH", header, 16)
        ntoa = socket.inet_ntoa
        return ntoa(source), source_port, ntoa(destination), destination_port
    if family == "INET6":
        source, destination, source_port, destination_port = struct.unpack_from("!16s16sHH", header, 16)
        return _ipv6_text(source), source_port, _ipv6_text(destination), destination_port
    if family == "UNIX":
        source, destination = struct.unpack_from("!108s108s", header, 16)
        return _unix_path(source), None, _unix_path(destination), None
    return None, None, None, None


def _unix_path(raw: bytes) -> str:
    """A sun_path as text: up to the first NUL, or "@name" for Linux abstract sockets."""
    if raw[:1] == b"\x00":
        name = raw[1:].rstrip(b"\x00")
        return "@" + name.decode("utf-8", "backslashreplace") if name else ""
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def _split_tlvs(buffer: bytes, start: int, end: int, what: str) -> list[tuple[int, bytes]]:
    """Frame the TLVs in buffer[start:end] as (type, value) pairs."""
    tlvs = []
    position = start
    while position < end:
        if end - position < 3:
            raise ProxyProtocolError(f"v2: truncated {what} at offset {position}")
        kind = buffer[position]
        value_start = position + 3
        value_end = value_start + (buffer[position + 1] << 8 | buffer[position + 2])
        if value_end > end:
            raise ProxyProtocolError(f"v2: {what} 0x{kind:02x} overruns the header")
        tlvs.append((kind, buffer[value_start:value_end]))
        position = value_end
    return tlvs


def _interpret_tlvs(header: bytes, tlvs_start: int, tlvs: list[tuple[int, bytes]]) -> dict[str, object]:
    """ProxyHeader fields from the TLVs we understand, once the CRC32C (if any) holds."""
    kinds = [kind for kind, _ in tlvs]
    _refuse_duplicates(kinds, _TLV_SINGLE, "TLV")
    if PP2_TYPE_CRC32C in kinds:  # first: a corrupt header is reported as such
        _verify_crc32c(header, tlvs_start, tlvs, kinds.index(PP2_TYPE_CRC32C))
    fields: dict[str, object] = {}
    for kind, value in tlvs:
        interpret = _TLV_INTERPRETED.get(kind)
        if interpret is not None:
            fields.update(interpret(value))
    return fields


def _refuse_duplicates(kinds: list[int], single: Collection[int], what: str) -> None:
    if len(set(kinds)) == len(kinds):
        return
    for kind in kinds:
        if kind in single and kinds.count(kind) > 1:
            raise ProxyProtocolError(f"v2: duplicate {what} 0x{kind:02x}")


def _verify_crc32c(header: bytes, tlvs_start: int, tlvs: list[tuple[int, bytes]], index: int) -> None:
    """Check the CRC32C of the whole header, computed with its own field zeroed."""
    checksum = tlvs[index][1]
    if len(checksum) != 4:
        raise ProxyProtocolError(f"v2: CRC32C TLV has {len(checksum)} bytes instead of 4")
    start = tlvs_start + sum(3 + len(value) for _, value in tlvs[:index]) + 3
    if crc32c(header[:start] + b"\x00\x00\x00\x00" + header[start + 4 :]) != int.from_bytes(checksum, "big"):
        raise ProxyProtocolError("v2: CRC32C mismatch")


def _decode(value: bytes, label: str, encoding: str) -> str:
    try:
        return value.decode(encoding)
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"v2: {label} is not valid {encoding}") from None


def _unique_id_field(value: bytes) -> dict[str, object]:
    if len(value) > UNIQUE_ID_MAX_LENGTH:
        raise ProxyProtocolError(f"v2: UNIQUE_ID is {len(value)} bytes, more than {UNIQUE_ID_MAX_LENGTH}")
    return {"unique_id": value}


def _ssl_fields(value: bytes) -> dict[str, object]:
    """The SSL TLV: client flags (u8), verify result (u32), then sub-TLVs."""
    if len(value) < SSL_FIXED_LENGTH:
        raise ProxyProtocolError(f"v2: SSL TLV has {len(value)} bytes, fewer than {SSL_FIXED_LENGTH}")
    client, verify = value[0], int.from_bytes(value[1:SSL_FIXED_LENGTH], "big")
    # HAProxy leaves verify at 0 when no certificate was presented: need a cert flag too.
    presented = bool(client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))
    fields: dict[str, object] = {"ssl_verified": presented and verify == 0}
    subs = _split_tlvs(value, SSL_FIXED_LENGTH, len(value), "SSL sub-TLV")
    _refuse_duplicates([kind for kind, _ in subs], _SSL_STRINGS, "SSL sub-TLV")
    for kind, sub_value in subs:
        if kind in _SSL_STRINGS:
            name, label, encoding = _SSL_STRINGS[kind]
            fields[name] = _decode(sub_value, label, encoding)
    return fields


_TLV_INTERPRETED: dict[int, Callable[[bytes], dict[str, object]]] = {
    PP2_TYPE_ALPN: lambda value: {"alpn": _decode(value, "ALPN", "utf-8")},
    PP2_TYPE_AUTHORITY: lambda value: {"authority": _decode(value, "AUTHORITY", "utf-8")},
    PP2_TYPE_UNIQUE_ID: _unique_id_field,
    PP2_TYPE_SSL: _ssl_fields,
}
# TLVs that may appear once: which of two copies should win would be arbitrary.
_TLV_SINGLE = frozenset(_TLV_INTERPRETED) | {PP2_TYPE_CRC32C}

_SSL_STRINGS = {
    PP2_SUBTYPE_SSL_VERSION: ("ssl_version", "SSL version", "ascii"),
    PP2_SUBTYPE_SSL_CN: ("ssl_cn", "SSL CN", "utf-8"),
    PP2_SUBTYPE_SSL_CIPHER: ("ssl_cipher", "SSL cipher", "ascii"),
}


# --------------------------------------------------------------------------- reader


def read_header(sock: gevent.socket.socket, timeout: float, initial: bytes = b"") -> tuple[ProxyHeader, bytes]:
    """Read one PROXY header from a gevent socket within `timeout` seconds.

    `initial` is whatever was already read from the connection.  Returns the
    header and the bytes of `initial` beyond it.  From the socket it takes
    exactly the header: it peeks, and consumes only what the parser claims (or,
    while the header is incomplete, what it has seen, which is all header).
    Every failure, socket errors included, is a ProxyProtocolError.
    """
    timer = gevent.Timeout(timeout)
    timer.start()
    try:
        return _read_header(sock, bytearray(initial))
    except gevent.Timeout as expired:
        if expired is not timer:
            raise
        raise ProxyProtocolError(f"timeout: no complete PROXY header within {timeout} s") from None
    except OSError as error:
        raise ProxyProtocolError(f"connection error before the PROXY header was complete: {error}") from error
    finally:
        timer.close()


def _read_header(sock: gevent.socket.socket, buffer: bytearray) -> tuple[ProxyHeader, bytes]:
    initial_length = len(buffer)
    while True:
        result = parse(buffer)
        if result is not None:
            header, consumed = result
            return header, bytes(buffer[consumed:initial_length])
        peeked = sock.recv(_bytes_wanted(buffer), socket.MSG_PEEK)
        if not peeked:
            raise ProxyProtocolError("connection closed before the PROXY header was complete")
        result = parse(buffer + peeked)
        take = len(peeked) if result is None else result[1] - len(buffer)
        buffer += _recv_exactly(sock, take)


def _bytes_wanted(buffer: bytearray) -> int:
    """How much to peek: the rest of a v2 header once its length is known, else a
    TCP minimum segment's worth (the specification's bound for a whole header)."""
    if len(buffer) >= V2_FIXED_LENGTH and buffer[0] == V2_SIGNATURE[0]:
        return V2_FIXED_LENGTH + (buffer[14] << 8 | buffer[15]) - len(buffer)
    return max(1, 536 - len(buffer))


def _recv_exactly(sock: gevent.socket.socket, size: int) -> bytes:
    """Consume `size` bytes that a peek has already shown to be there."""
    chunks = []
    while size > 0:
        chunk = sock.recv(size)
        if not chunk:
            raise ProxyProtocolError("connection closed before the PROXY header was complete")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# -------------------------------------------------------------------------- builders


def build_v1(family: str, src: str | None, dst: str | None, sport: int | None, dport: int | None) -> bytes:
    """A v1 line.  "UNKNOWN" with no source gives the short form "PROXY UNKNOWN\\r\\n"."""
    if family == "UNKNOWN" and src is None:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def build_v2(
    command: str,
    family: str,
    src: str | None,
    dst: str | None,
    sport: int | None,
    dport: int | None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc: bool = False,
    transport: str = "STREAM",
) -> bytes:
    """A v2 header; with `crc`, a CRC32C TLV is appended and filled in.

    UNSPEC family means an UNSPEC transport and an empty address block; UNIX
    addresses are paths (or "@name" for abstract sockets).
    """
    family_code = _code_of(_V2_FAMILY_NAMES, family)
    transport_code = 0 if family == "UNSPEC" else _code_of(_V2_TRANSPORT_NAMES, transport)
    body = _address_block(family, src, dst, sport, dport) + b"".join(_tlv(kind, value) for kind, value in tlvs)
    if crc:
        body += _tlv(PP2_TYPE_CRC32C, b"\x00\x00\x00\x00")
    if len(body) > 0xFFFF:
        raise ValueError(f"a v2 header holds at most 65535 bytes after the fixed part, not {len(body)}")
    fixed = V2_SIGNATURE + bytes(
        (0x20 | _V2_COMMAND_CODES[command], family_code << 4 | transport_code)
    ) + len(body).to_bytes(2, "big")
    header = fixed + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


def build_ssl_tlv(client: int, verify: int, sub_tlvs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """The value of a PP2_TYPE_SSL TLV: client flags, verify result, sub-TLVs."""
    return bytes((client,)) + verify.to_bytes(4, "big") + b"".join(_tlv(kind, value) for kind, value in sub_tlvs)


def _code_of(names: dict[int, str], name: str) -> int:
    for code, known in names.items():
        if known == name:
            return code
    raise ValueError(f"unknown name {name!r}; expected one of {sorted(names.values())}")


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + len(value).to_bytes(2, "big") + value


def _address_block(family: str, src: str | None, dst: str | None, sport: int | None, dport: int | None) -> bytes:
    if family == "INET":
        return _pton(socket.AF_INET, src) + _pton(socket.AF_INET, dst) + struct.pack("!HH", sport, dport)
    if family == "INET6":
        return _pton(socket.AF_INET6, src) + _pton(socket.AF_INET6, dst) + struct.pack("!HH", sport, dport)
    if family == "UNIX":
        return _unix_raw(src) + _unix_raw(dst)
    return b""


def _pton(address_family: int, text: str) -> bytes:
    """inet_pton, with ValueError for a bad address (a builder's caller's mistake)."""
    try:
        return socket.inet_pton(address_family, text)
    except OSError as error:
        raise ValueError(f"not an address of the family: {text!r}") from error


def _unix_raw(path: str) -> bytes:
    raw = b"\x00" + path[1:].encode() if path.startswith("@") else path.encode()
    if len(raw) > _UNIX_PATH_LENGTH:
        raise ValueError(f"UNIX path longer than {_UNIX_PATH_LENGTH} bytes")
    return raw.ljust(_UNIX_PATH_LENGTH, b"\x00")

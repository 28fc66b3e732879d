"""Exim single-key file lookups: ``lsearch`` and ``iplsearch``.

Files are parsed once into an in-memory form and cached per process; a cached
file is re-parsed when its identity (device, inode, size, mtime) changes. The
check costs one ``stat`` and is done at most once per ``recheck_interval``
seconds for each file. Reading a file is a blocking call, but lookup files are
small local files, read only when they change.

This module also holds the small helpers that Exim shares between lists,
lookups and expansions: IP address parsing and backslash escapes.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

IPV4_BITS = 32
IPV6_BITS = 128
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_HEX_DIGITS = "0123456789abcdefABCDEF"
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}

LOOKUP_TYPES = frozenset({"lsearch", "iplsearch"})


class LookupFailed(Exception):
    """A lookup could not be done (missing file, bad key): Exim's DEFER."""


# --------------------------------------------------------------------------
# Helpers shared with lists and expansions


def parse_ip(text: str) -> tuple[int, int] | None:
    """Return (bits, integer) for an IP address, or None if it is not one.

    IPv4-mapped IPv6 addresses (``::ffff:1.2.3.4``) come back as IPv4, as
    Exim compares them. An IPv6 zone suffix (``%eth0``) is ignored.
    """
    if ":" not in text:
        try:
            return IPV4_BITS, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        except (OSError, ValueError):
            return None
    text = text.split("%", 1)[0]
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    if packed[:12] == _V4_MAPPED_PREFIX:
        return IPV4_BITS, int.from_bytes(packed[12:], "big")
    return IPV6_BITS, int.from_bytes(packed, "big")


def parse_network(text: str) -> tuple[int, int, int] | None:
    """Return (bits, prefix_length, network_prefix) for ``ip`` or ``ip/len``.

    ``network_prefix`` is the address shifted right by ``bits - prefix_length``,
    so membership is one shift and one comparison. Host bits may be set (Exim
    ignores them). None if the text is not an address or the mask is bad.
    """
    address, slash, mask = text.partition("/")
    parsed = parse_ip(address)
    if parsed is None:
        return None
    bits, value = parsed
    if not slash:
        return bits, bits, value
    if not mask.isascii() or not mask.isdigit() or len(mask) > 3:
        return None
    length = int(mask)
    if bits == IPV4_BITS and ":" in address:
        length -= IPV6_BITS - IPV4_BITS  # a mask written for a v4-mapped address
    if not 0 <= length <= bits:
        return None
    return bits, length, value >> (bits - length)


def ip_in_network(ip: tuple[int, int], network: tuple[int, int, int]) -> bool:
    """True if the parsed ``ip`` lies in the parsed ``network``."""
    bits, value = ip
    net_bits, length, prefix = network
    return bits == net_bits and value >> (bits - length) == prefix


def interpret_escape(text: str, index: int) -> tuple[str, int]:
    """Decode the backslash escape whose backslash is at ``text[index]``.

    Exim's rules: ``\\b \\f \\n \\r \\t \\v``, up to three octal digits, ``\\x``
    and up to two hex digits; any other character stands for itself; a
    backslash at the end of the text is a backslash. Returns the character
    and the index just past the sequence.
    """
    index += 1
    if index >= len(text):
        return "\\", index
    char = text[index]
    if "0" <= char <= "7":
        end = index
        while end < len(text) and end < index + 3 and "0" <= text[end] <= "7":
            end += 1
        return chr(int(text[index:end], 8) & 0xFF), end
    if char == "x":
        end = index + 1
        while end < len(text) and end < index + 3 and text[end] in _HEX_DIGITS:
            end += 1
        digits = text[index + 1:end]
        return chr(int(digits, 16) if digits else 0), end
    return _SIMPLE_ESCAPES.get(char, char), index + 1


# --------------------------------------------------------------------------
# File parsing (pure: text in, entries out)


def parse_lsearch_text(text: str) -> list[tuple[str, str]]:
    """Parse an lsearch file into (key, data) pairs in file order.

    Mirrors Exim: a key starts at the beginning of a line (lines starting
    with white space are continuations, ``#`` lines and empty lines are
    skipped even inside an entry); a quoted key may contain escapes; an
    unquoted key ends at a colon or white space; an optional colon follows
    the key; continuation lines are joined with a single space.
    """
    entries: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line or line[0] == "#":
            continue
        if line[0].isspace():
            if entries:
                key, data = entries[-1]
                entries[-1] = (key, data + " " + line.lstrip())
            continue
        key, rest = _split_key(line)
        rest = rest.lstrip()
        if rest.startswith(":"):
            rest = rest[1:].lstrip()
        entries.append((key, rest))
    return entries


def _split_key(line: str) -> tuple[str, str]:
    """Split a line into its (dequoted) key and the remainder."""
    if line[0] != '"':
        end = 0
        while end < len(line) and line[end] != ":" and not line[end].isspace():
            end += 1
        return line[:end], line[end:]
    chars: list[str] = []
    index = 1
    while index < len(line) and line[index] != '"':
        if line[index] == "\\":
            char, index = interpret_escape(line, index)
        else:
            char, index = line[index], index + 1
        chars.append(char)
    return "".join(chars), line[index + 1:]


@dataclass(frozen=True)
class LsearchTable:
    """A parsed lsearch file: first entry per (case-folded) key wins."""

    by_key: dict[str, str]

    @classmethod
    def from_text(cls, text: str) -> "LsearchTable":
        by_key: dict[str, str] = {}
        for key, data in parse_lsearch_text(text):
            by_key.setdefault(key.lower(), data)
        return cls(by_key)

    def find(self, key: str) -> str | None:
        return self.by_key.get(key.lower())


@dataclass(frozen=True)
class IplsearchTable:
    """A parsed iplsearch file: networks in file order, first match wins.

    Keys that are not IP addresses or CIDR blocks are skipped, as in Exim.
    A linear walk is fine for the few hundred lines such files usually hold.
    """

    networks: tuple[tuple[tuple[int, int, int], str], ...]
    star: str | None

    @classmethod
    def from_text(cls, text: str) -> "IplsearchTable":
        networks = []
        star = None
        for key, data in parse_lsearch_text(text):
            if key == "*":
                star = data if star is None else star
                continue
            network = parse_network(key)
            if network is not None:
                networks.append((network, data))
        return cls(tuple(networks), star)

    def find(self, key: str) -> str | None:
        if key == "*":
            return self.star
        ip = parse_ip(key)
        if ip is None:
            raise LookupFailed(
                f'"{key}" is not a valid iplsearch key (an IP address is wanted): '
                "in a host list, use net-iplsearch as the search type")
        for network, data in self.networks:
            if ip_in_network(ip, network):
                return data
        return None


_TABLE_BUILDERS: dict[str, Callable[[str], LsearchTable | IplsearchTable]] = {
    "lsearch": LsearchTable.from_text,
    "iplsearch": IplsearchTable.from_text,
}


# --------------------------------------------------------------------------
# The per-process cache (the I/O shell)


@dataclass
class _CachedFile:
    identity: tuple[int, int, int, int]
    checked_at: float
    tables: dict[str, LsearchTable | IplsearchTable] = field(default_factory=dict)
    text: str = ""


class LookupCache:
    """Parsed lookup files, one cache per process.

    ``lookup`` returns the data for a key, or None when the key is not
    found; it raises LookupFailed when the lookup cannot be done at all.
    Call ``clear`` on HUP to drop everything.
    """

    def __init__(self, recheck_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._recheck_interval = recheck_interval
        self._clock = clock
        self._files: dict[str, _CachedFile] = {}

    def lookup(self, kind: str, key: str, path: str) -> str | None:
        builder = _TABLE_BUILDERS.get(kind)
        if builder is None:
            raise LookupFailed(f'unknown lookup type "{kind}"')
        if not path.startswith("/"):
            raise LookupFailed(f'"{path}" is not an absolute path for {kind}')
        cached = self._current(path)
        table = cached.tables.get(kind)
        if table is None:
            table = cached.tables[kind] = builder(cached.text)
        return table.find(key)

    def clear(self) -> None:
        self._files.clear()

    def _current(self, path: str) -> _CachedFile:
        """The cached entry for ``path``, re-read if the file has changed."""
        now = self._clock()
        cached = self._files.get(path)
        if cached is not None and now - cached.checked_at < self._recheck_interval:
            return cached
        identity = _file_identity(path)
        if cached is not None and cached.identity == identity:
            cached.checked_at = now
            return cached
        cached = _CachedFile(identity, now, text=_read_text(path))
        self._files[path] = cached
        return cached


def _file_identity(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise LookupFailed(f"failed to open {path} for linear search: {exc.strerror}") from exc
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise LookupFailed(f"failed to open {path} for linear search: {exc.strerror}") from exc

"""Exim domain, host, address and local part lists.

A list is compiled once from its (already expanded) text into a tuple of
items; matching walks the items in order and the first item that matches
decides: a positive item means "in the list", a negative (``!``) item means
"not in the list". When no item matches, the subject is in the list exactly
when the last item was negative (Exim: a list ending in a negative item
behaves as if ``: *`` followed it).

Runs of consecutive IP address/CIDR items of the same sign in host lists are
merged into one table keyed by prefix length, so a list of many networks costs
a few dictionary probes.

Deviations from Exim, all because this MTA does no DNS in list matching:

- host-name patterns (``*.example.com``, ``^regex``, plain names, ``@``,
  ``lsearch;file`` keyed by name) are compared with the host name the caller
  supplies. Exim would look a plain name up forwards and compare addresses;
  we compare names. When no name is supplied the item is "unknown": the list
  does not match (or, after ``+include_unknown``, matches; after
  ``+ignore_unknown``, the item is skipped), as Exim does when a lookup
  fails. ``needs_host_name`` tells the caller whether a name could matter.
- ``@mx_any``, ``@mx_primary``, ``@mx_secondary`` and lookup types other than
  lsearch/iplsearch are refused at compile time with ListError.
- ``@[]`` matches the addresses given as ``local_addresses``.

Lookup items (``lsearch;/file``, ``net-iplsearch;/file``, ``net24-lsearch;``)
read through a LookupCache at match time; a lookup that cannot be done raises
``LookupFailed``, which the caller should treat as a defer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from mta.lookups import (
    IPV4_BITS,
    LOOKUP_TYPES,
    LookupCache,
    parse_ip,
    parse_network,
)


class ListError(Exception):
    """A list item that cannot be compiled, or a file that cannot be read."""


# --------------------------------------------------------------------------
# Splitting


def split_list(text: str, sep: str = ":") -> list[str]:
    """Split an Exim list into items, exactly as Exim's string_nextinlist.

    - A list starting with ``<`` followed by a punctuation or control
      character uses that character as separator (``<;``, ``<,``, ``<\\n``);
      white space after it is skipped. ``< ;`` (with a space) is *not* a
      separator change in Exim, and is not here.
    - A doubled separator is one literal separator character (``::`` -> ``:``),
      except for control-character separators, which cannot be doubled.
    - Items are stripped of leading and trailing white space.
    - Empty items are kept (``a : : b`` has three items, ``:`` is one empty
      item: Exim's ``senders = :`` matching the empty sender), but nothing
      after the last separator is an item (``a :`` has one item), and a list
      of only white space has none.
    """
    pos = _skip_space(text, 0, sep)
    if text.startswith("<", pos) and pos + 1 < len(text) and _is_sep_char(text[pos + 1]):
        sep = text[pos + 1]
        pos = _skip_space(text, pos + 2, sep)
    doubling = not _is_control(sep)
    items: list[str] = []
    while pos < len(text):
        item, pos = _next_item(text, pos, sep, doubling)
        items.append(item)
        pos = _skip_space(text, pos, sep)
    return items


def _next_item(text: str, pos: int, sep: str, doubling: bool) -> tuple[str, int]:
    """Read one item starting at ``pos``; return it and the position after it."""
    chars: list[str] = []
    while pos < len(text):
        char = text[pos]
        pos += 1
        if char == sep:
            if doubling and pos < len(text) and text[pos] == sep:
                pos += 1
            else:
                break
        chars.append(char)
    return "".join(chars).rstrip(), pos


def _skip_space(text: str, pos: int, sep: str) -> int:
    while pos < len(text) and text[pos].isspace() and text[pos] != sep:
        pos += 1
    return pos


def _is_control(char: str) -> bool:
    return ord(char) < 32 or ord(char) == 127


def _is_sep_char(char: str) -> bool:
    return char.isascii() and (_is_control(char) or (char.isprintable() and not char.isalnum()
                                                       and not char.isspace()))


# --------------------------------------------------------------------------
# Named lists


@dataclass
class NamedLists:
    """The ``domainlist``/``hostlist``/``addresslist``/``localpartlist`` texts.

    Values are the raw list texts by name; a ``+name`` item compiles the
    named list of the same kind where it is referenced.
    """

    domain: dict[str, str] = field(default_factory=dict)
    host: dict[str, str] = field(default_factory=dict)
    address: dict[str, str] = field(default_factory=dict)
    localpart: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Compiled items. evaluate(subject) returns True ("in the list"), False
# ("not in the list") or None (this item does not decide); it returns
# _UNKNOWN when the item needs a host name that was not supplied.


class _Unknown:
    """Marker for "the item needs information that is not available"."""


_UNKNOWN = _Unknown()


@dataclass(frozen=True)
class _Predicate:
    """An item decided by one test of the subject."""

    negated: bool
    test: Callable[[object], bool | _Unknown]

    def evaluate(self, subject) -> bool | None | _Unknown:
        outcome = self.test(subject)
        if outcome is _UNKNOWN:
            return _UNKNOWN
        return (not self.negated) if outcome else None


@dataclass(frozen=True)
class _Sublist:
    """A ``+name`` reference: the named list's full result decides."""

    negated: bool
    compiled: "_Compiled"

    def evaluate(self, subject) -> bool | None | _Unknown:
        return (not self.negated) if self.compiled.match(subject) else None


@dataclass(frozen=True)
class _FileItem:
    """An indirected file: its lines are items; ``!/file`` inverts them."""

    negated: bool
    path: str
    items: tuple

    def evaluate(self, subject) -> bool | None | _Unknown:
        outcome = _scan(self.items, subject)
        if isinstance(outcome, bool) and self.negated:
            return not outcome
        return outcome


@dataclass(frozen=True)
class _UnknownMode:
    """``+include_unknown`` / ``+ignore_unknown``: what an unknown item does.

    Not an item that matches anything: ``_scan`` reads it as a switch.
    """

    negated: bool
    mode: str


@dataclass
class _NetRun:
    """Consecutive IP/CIDR items of one sign: prefix tables per family."""

    negated: bool
    tables: dict[int, dict[int, set[int]]] = field(default_factory=dict)

    def add(self, bits: int, length: int, prefix: int) -> None:
        self.tables.setdefault(bits, {}).setdefault(length, set()).add(prefix)

    def evaluate(self, subject: "_Host") -> bool | None:
        if subject.ip is None:
            return None
        bits, value = subject.ip
        for length, prefixes in self.tables.get(bits, {}).items():
            if value >> (bits - length) in prefixes:
                return not self.negated
        return None


def _scan(items: Iterable, subject) -> bool | None | _Unknown:
    """First deciding item's verdict; None if none decides.

    An unknown item ends the scan with _UNKNOWN unless ``+ignore_unknown``
    or ``+include_unknown`` is in force.
    """
    mode = ""
    for item in items:
        if isinstance(item, _UnknownMode):
            mode = item.mode
            continue
        outcome = item.evaluate(subject)
        if outcome is None:
            continue
        if outcome is _UNKNOWN:
            if mode == "ignore_unknown":
                continue
            return True if mode == "include_unknown" else _UNKNOWN
        return outcome
    return None


@dataclass(frozen=True)
class _Compiled:
    """A compiled list: items, and the files they were read from."""

    items: tuple
    files: tuple[str, ...]
    needs_host_name: bool

    def match(self, subject) -> bool:
        outcome = _scan(self.items, subject)
        if isinstance(outcome, bool):
            return outcome
        if outcome is _UNKNOWN or not self.items:
            return False
        return self.items[-1].negated


# --------------------------------------------------------------------------
# The compiler shared by the four kinds of list


_LOOKUP_ITEM = re.compile(r"(?P<spec>[A-Za-z0-9_*@,=-]+);(?P<data>.*)", re.S)
_LOOKUP_SPEC = re.compile(r"(?:net(?P<mask>[0-9]{0,3})-)?(?P<type>[a-z0-9_]+)")


@dataclass
class _Compiler:
    """Turns list text into items. Subclasses say how a single item matches."""

    kind: str
    named: NamedLists
    primary_hostname: str
    local_addresses: tuple[tuple[int, int], ...]
    lookups: LookupCache
    file_comments_anywhere: bool
    chain: tuple[str, ...] = ()
    ip_only: bool = False
    files: list[str] = field(default_factory=list)
    needs_host_name: bool = False

    def compile(self, text: str) -> _Compiled:
        items = self.compile_items(split_list(text), in_file=False)
        return _Compiled(tuple(items), tuple(dict.fromkeys(self.files)), self.needs_host_name)

    def compile_items(self, texts: Iterable[str], in_file: bool) -> list:
        items: list = []
        caseful = False
        for raw in texts:
            negated, body = _strip_negation(raw)
            if body == "+caseful" and self.kind in ("address", "localpart") and not negated:
                caseful = True
                continue
            item = self.compile_one(negated, body, in_file, caseful)
            _append_merging(items, item)
        return items

    def compile_one(self, negated: bool, body: str, in_file: bool, caseful: bool):
        if body.startswith("/"):
            if in_file:
                raise ListError(f'file name "{body}" is not allowed inside a list file')
            return self.compile_file(negated, body)
        if body in ("+include_unknown", "+ignore_unknown") and self.kind == "host" and not in_file:
            return _UnknownMode(negated, body[1:])
        if body.startswith("+"):
            return _Sublist(negated, self.compile_named(body[1:]))
        return self.compile_pattern(negated, body, caseful)

    def compile_pattern(self, negated: bool, body: str, caseful: bool):
        raise NotImplementedError

    def compile_named(self, name: str) -> _Compiled:
        table: dict[str, str] = getattr(self.named, self.kind)
        if name not in table:
            raise ListError(f'unknown named {self.kind} list "+{name}"')
        if name in self.chain:
            raise ListError(f'named {self.kind} list "+{name}" refers to itself')
        nested = type(self)(self.kind, self.named, self.primary_hostname, self.local_addresses,
                            self.lookups, self.file_comments_anywhere, self.chain + (name,),
                            self.ip_only)
        try:
            compiled = nested.compile(table[name])
        except ListError as exc:
            raise ListError(f'in named {self.kind} list "+{name}": {exc}') from None
        self.files.extend(compiled.files)
        self.needs_host_name |= compiled.needs_host_name
        return compiled

    def compile_file(self, negated: bool, path: str) -> _FileItem:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise ListError(f"failed to open {path}: {exc.strerror}") from None
        self.files.append(path)
        texts = [item for item in (self.strip_comment(line).strip() for line in lines) if item]
        try:
            items = self.compile_items(texts, in_file=True)
        except ListError as exc:
            raise ListError(f"in {path}: {exc}") from None
        return _FileItem(negated, path, tuple(items))

    def strip_comment(self, line: str) -> str:
        """Domain and host list files: ``#`` anywhere starts a comment.

        Address and local part files: only ``#`` at the start of the line or
        after white space does, because local parts may contain ``#``.
        """
        if self.file_comments_anywhere:
            return line.partition("#")[0]
        match = re.search(r"(?:^|\s)#", line)
        return line[:match.start()] if match else line

    def lookup_test(self, body: str, key_of: Callable[[object], str | None]):
        """A test for a ``type;file`` item, or None if ``body`` is not one."""
        parsed = _parse_lookup_item(body)
        if parsed is None:
            return None
        net, _, kind, path = parsed
        if net:
            raise ListError(f'"net-" lookups are only for host lists: "{body}"')
        cache = self.lookups

        def found(subject) -> bool:
            key = key_of(subject)
            return bool(key) and cache.lookup(kind, key, path) is not None

        return found


def _parse_lookup_item(body: str) -> tuple[bool, int | None, str, str] | None:
    """Split ``[net[N]-]type;file`` into (net, mask, type, file).

    None if ``body`` is not a lookup item; ListError for lookup forms we do
    not support (other types, ``partial-``, ``*``/``*@`` defaults, options).
    """
    match = _LOOKUP_ITEM.fullmatch(body)
    if match is None:
        return None
    spec = _LOOKUP_SPEC.fullmatch(match["spec"])
    if spec is None or spec["type"] not in LOOKUP_TYPES:
        raise ListError(f'unsupported lookup "{match["spec"]}" in "{body}"')
    mask = int(spec["mask"]) if spec["mask"] else None
    net = match["spec"].startswith("net")
    return net, mask, spec["type"], match["data"].strip()


def _strip_negation(raw: str) -> tuple[bool, str]:
    """Exim allows ``!`` followed by optional white space."""
    if raw.startswith("!"):
        return True, raw[1:].lstrip()
    return False, raw


def _append_merging(items: list, item) -> None:
    """Append ``item``, folding an IP item into a preceding run of its sign."""
    if isinstance(item, _NetRun) and items and isinstance(items[-1], _NetRun) \
            and items[-1].negated == item.negated:
        for bits, table in item.tables.items():
            for length, prefixes in table.items():
                for prefix in prefixes:
                    items[-1].add(bits, length, prefix)
        return
    items.append(item)


def _compile_regex(pattern: str, caseless: bool):
    """Compile a list regex; ``(?-i)`` at the start makes it case-sensitive."""
    for prefix in ("(?-i)", "^(?-i)"):
        if pattern.startswith(prefix):
            pattern, caseless = prefix[:-5] + pattern[len(prefix):], False
    try:
        return re.compile(pattern, re.IGNORECASE if caseless else 0)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ListError(f'bad regular expression "{pattern}": {exc}') from None


def _domain_test(body: str, compiler: _Compiler):
    """A test on a lowercased domain for one domain-list pattern."""
    if body == "@":
        name = compiler.primary_hostname.lower()
        return lambda domain: bool(name) and domain == name
    if body == "@[]":
        local = compiler.local_addresses
        return lambda domain: _literal_ip(domain) in local
    if body.startswith("@mx_"):
        raise ListError(f'"{body}" needs DNS and is not supported')
    if body.startswith("^"):
        regex = _compile_regex(body, caseless=True)
        return lambda domain: regex.search(domain) is not None
    if body.startswith("*"):
        suffix = body[1:].lower()
        return lambda domain: domain.endswith(suffix)
    lookup = compiler.lookup_test(body, lambda domain: domain)
    if lookup is not None:
        return lookup
    literal = body.lower()
    return lambda domain: domain == literal


def _literal_ip(domain: str) -> tuple[int, int] | None:
    """The address in a domain literal ``[1.2.3.4]`` / ``[IPv6:...]``."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    return parse_ip(inner)


# --------------------------------------------------------------------------
# Host lists


@dataclass(frozen=True)
class _Host:
    ip: tuple[int, int] | None
    host_name: str | None
    no_host: bool


class _HostCompiler(_Compiler):
    def compile_pattern(self, negated: bool, body: str, caseful: bool):
        if body == "":
            return _Predicate(negated, lambda host: host.no_host)
        if body == "*":
            return _Predicate(negated, lambda host: True)
        if body == "@[]":
            local = self.local_addresses
            return _Predicate(negated, lambda host: host.ip in local)
        lookup = self.host_lookup(body)
        if lookup is not None:
            return _Predicate(negated, lookup)
        network = self.ip_pattern(body)
        if network is not None:
            run = _NetRun(negated)
            run.add(*network)
            return run
        if body.startswith("@mx_"):
            raise ListError(f'"{body}" needs DNS and is not supported')
        if self.ip_only:
            raise ListError(f'"{body}" is not an IP address pattern')
        if body == "@" and not self.primary_hostname:
            return _Predicate(negated, lambda host: False)
        self.needs_host_name = True
        name_test = _host_name_test(self.primary_hostname if body == "@" else body)
        return _Predicate(negated, lambda host: _by_name(host, name_test))

    @staticmethod
    def ip_pattern(body: str) -> tuple[int, int, int] | None:
        """Parse an IP/CIDR item; text that looks like one but is bad is an error."""
        network = parse_network(body)
        if network is None and (":" in body or "/" in body or re.fullmatch(r"[0-9.]+", body)):
            raise ListError(f'malformed IP address or network "{body}"')
        return network

    def host_lookup(self, body: str):
        """Tests for ``net[N]-type;file`` (by address) and ``type;file`` (by name)."""
        parsed = _parse_lookup_item(body)
        if parsed is None:
            return None
        net, mask, kind, path = parsed
        cache = self.lookups
        if not net and not self.ip_only:
            self.needs_host_name = True
            return lambda host: _by_name(
                host, lambda name: cache.lookup(kind, name, path) is not None)
        if mask is not None and mask > 128:
            raise ListError(f'bad mask in "{body}"')

        def found(host: _Host) -> bool:
            if host.ip is None:
                return False
            return cache.lookup(kind, _ip_lookup_key(host.ip, mask, kind), path) is not None

        return found


def _by_name(host: _Host, test: Callable[[str], bool]) -> bool | _Unknown:
    if host.no_host:
        return False
    if not host.host_name:
        return _UNKNOWN
    return test(host.host_name)


def _host_name_test(body: str) -> Callable[[str], bool]:
    if body.startswith("^"):
        regex = _compile_regex(body, caseless=True)
        return lambda name: regex.search(name) is not None
    if body.startswith("*"):
        suffix = body[1:].lower()
        return lambda name: name.lower().endswith(suffix)
    literal = body.lower()
    return lambda name: name.lower() == literal


def _ip_lookup_key(ip: tuple[int, int], mask: int | None, kind: str) -> str:
    """Exim's key for ``net-`` lookups: IPv6 unabbreviated, with dots unless
    the lookup is iplsearch; ``netN-`` appends ``/N`` to the masked address."""
    bits, value = ip
    if mask is not None:
        mask = min(mask, bits)
        value = value >> (bits - mask) << (bits - mask) if mask else 0
    if bits == IPV4_BITS:
        text = ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))
    else:
        groups = [f"{(value >> shift) & 0xFFFF:04x}" for shift in range(112, -1, -16)]
        text = (":" if kind == "iplsearch" else ".").join(groups)
    return text if mask is None else f"{text}/{mask}"


class HostList:
    """A compiled host list. ``match`` costs a few microseconds.

    ``ip_only`` gives Exim's ``match_ip`` flavour: name patterns are errors
    and ``type;file`` lookups are keyed by address as if written ``net-``.
    """

    def __init__(self, text: str, named: NamedLists | None = None, primary_hostname: str = "",
                 *, local_addresses: Iterable[str] = ("127.0.0.1", "::1"),
                 lookups: LookupCache | None = None, ip_only: bool = False) -> None:
        self.text = text
        self._make_compiler = lambda: _HostCompiler(
            "host", named or NamedLists(), primary_hostname, _parse_addresses(local_addresses),
            _cache(lookups), file_comments_anywhere=True, ip_only=ip_only)
        self._compiled = self._make_compiler().compile(text)

    @property
    def files(self) -> list[str]:
        """Every file this list (and its named sublists) reads."""
        return list(self._compiled.files)

    @property
    def needs_host_name(self) -> bool:
        """True if some item matches by host name (which Exim would look up)."""
        return self._compiled.needs_host_name

    def reload(self) -> None:
        """Re-read file-backed items. On error keep the old list and raise."""
        self._compiled = self._make_compiler().compile(self.text)

    def match(self, ip: str | None, port: int | None = None, host_name: str | None = None) -> bool:
        """Is the host in the list? ``ip`` None or "" means no remote host.

        ``port`` is accepted for call-site symmetry; no host list item uses
        it. An ``ip`` that is not an IP address raises ValueError.
        """
        parsed = None
        if ip:
            parsed = parse_ip(ip)
            if parsed is None:
                raise ValueError(f"not an IP address: {ip!r}")
        return self._compiled.match(_Host(parsed, host_name, not ip))


def _cache(lookups: LookupCache | None) -> LookupCache:
    return LookupCache() if lookups is None else lookups


def _parse_addresses(addresses: Iterable[str]) -> tuple[tuple[int, int], ...]:
    parsed = []
    for address in addresses:
        ip = parse_ip(address)
        if ip is None:
            raise ListError(f'local address "{address}" is not an IP address')
        parsed.append(ip)
    return tuple(parsed)


# --------------------------------------------------------------------------
# Domain lists


class _DomainCompiler(_Compiler):
    def compile_pattern(self, negated: bool, body: str, caseful: bool):
        if body == "":
            return _Predicate(negated, lambda domain: domain == "")
        return _Predicate(negated, _domain_test(body, self))


class DomainList:
    """A compiled domain list; matching is case-insensitive."""

    def __init__(self, text: str, named: NamedLists | None = None, primary_hostname: str = "",
                 *, local_addresses: Iterable[str] = ("127.0.0.1", "::1"),
                 lookups: LookupCache | None = None) -> None:
        self.text = text
        self._compiled = _DomainCompiler(
            "domain", named or NamedLists(), primary_hostname, _parse_addresses(local_addresses),
            _cache(lookups), file_comments_anywhere=True).compile(text)

    @property
    def files(self) -> list[str]:
        return list(self._compiled.files)

    def match(self, domain: str) -> bool:
        return self._compiled.match(domain.lower())


# --------------------------------------------------------------------------
# Local part lists and address lists


@dataclass(frozen=True)
class _Address:
    full: str
    full_lower: str
    local: str
    local_lower: str
    domain: str


def _split_address(address: str) -> _Address:
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    return _Address(address, local.lower() + at + domain.lower(), local, local.lower(),
                    domain.lower())


def _local_part_test(body: str, caseful: bool) -> Callable[[str], bool]:
    """Local-part patterns: ``*suffix``, ``^regex`` or a literal."""
    if body.startswith("^"):
        regex = _compile_regex(body, caseless=not caseful)
        return lambda local: regex.search(local) is not None
    if body.startswith("*"):
        suffix = body[1:] if caseful else body[1:].lower()
        return lambda local: local.endswith(suffix)
    literal = body if caseful else body.lower()
    return lambda local: local == literal


class _LocalPartCompiler(_Compiler):
    def compile_pattern(self, negated: bool, body: str, caseful: bool):
        pick = (lambda a: a.local) if caseful else (lambda a: a.local_lower)
        lookup = None if body.startswith("^") else self.lookup_test(body, pick)
        if lookup is not None:
            return _Predicate(negated, lookup)
        test = _local_part_test(body, caseful)
        return _Predicate(negated, lambda address: test(pick(address)))


class LocalPartList:
    """A compiled local part list.

    Matching is case-insensitive until a ``+caseful`` item, as Exim does for
    local part lists when ``caseful_local_part`` is false.
    """

    def __init__(self, text: str, named: NamedLists | None = None, primary_hostname: str = "",
                 *, lookups: LookupCache | None = None) -> None:
        self.text = text
        self._compiled = _LocalPartCompiler(
            "localpart", named or NamedLists(), primary_hostname, (), _cache(lookups),
            file_comments_anywhere=False).compile(text)

    @property
    def files(self) -> list[str]:
        return list(self._compiled.files)

    def match(self, local_part: str) -> bool:
        return self._compiled.match(_Address(local_part, local_part.lower(), local_part,
                                             local_part.lower(), ""))


class _AddressCompiler(_Compiler):
    def compile_pattern(self, negated: bool, body: str, caseful: bool):
        if body == "":
            return _Predicate(negated, lambda address: address.full == "")
        if body.startswith("^"):
            regex = _compile_regex(body, caseless=not caseful)
            pick = (lambda a: a.full) if caseful else (lambda a: a.full_lower)
            return _Predicate(negated, lambda address: regex.search(pick(address)) is not None)
        if body.startswith("@@"):
            raise ListError(f'"@@" lookups are not supported: "{body}"')
        whole = self.lookup_test(body, lambda a: a.full if caseful else a.full_lower)
        if whole is not None:
            return _Predicate(negated, whole)
        local_pattern, at, domain_pattern = body.partition("@")
        if not at:
            local_pattern, domain_pattern = "*", body
        return _Predicate(negated, self.split_test(local_pattern, domain_pattern, caseful))

    def split_test(self, local_pattern: str, domain_pattern: str, caseful: bool):
        """Local part and domain matched separately (``local@domain`` items)."""
        local_test = _local_part_test(local_pattern, caseful)
        pick = (lambda a: a.local) if caseful else (lambda a: a.local_lower)
        if domain_pattern.startswith("+"):
            domains = _DomainCompiler("domain", self.named, self.primary_hostname,
                                      self.local_addresses, self.lookups, True)
            compiled = domains.compile_named(domain_pattern[1:])
            self.files.extend(domains.files)
            domain_test = compiled.match
        else:
            domain_test = _domain_test(domain_pattern, self)
        return lambda a: a.full != "" and local_test(pick(a)) and domain_test(a.domain)


class AddressList:
    """A compiled address list (``senders``, ``recipients``).

    The domain is always compared caselessly; the local part caselessly until
    a ``+caseful`` item. An empty item matches the empty (bounce) sender.
    """

    def __init__(self, text: str, named: NamedLists | None = None, primary_hostname: str = "",
                 *, local_addresses: Iterable[str] = ("127.0.0.1", "::1"),
                 lookups: LookupCache | None = None) -> None:
        self.text = text
        self._compiled = _AddressCompiler(
            "address", named or NamedLists(), primary_hostname, _parse_addresses(local_addresses),
            _cache(lookups), file_comments_anywhere=False).compile(text)

    @property
    def files(self) -> list[str]:
        return list(self._compiled.files)

    def match(self, address: str) -> bool:
        return self._compiled.match(_split_address(address))

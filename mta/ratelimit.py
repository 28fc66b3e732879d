"""Exim's ``ratelimit`` ACL condition: parsing and arithmetic.

This module reproduces ``acl_ratelimit()`` from Exim's ``src/acl.c``:

* ``ratelimit = m / p / options / key`` is split as an Exim list with ``/``
  as the fixed separator (items trimmed, ``//`` is a literal ``/``).  ``m``
  is a C ``strtod`` number (decimal or ``inf``; NaN and hex are refused)
  with an optional ``k``/``m``/``g`` suffix (powers of 1024).  ``p`` is an
  Exim time (``2h30m``; a bare number is an error); its text, not its
  value, goes into the key.  The remaining items are options; every item
  that is not an option becomes part of the key (joined with ``/``).
* Which ACL the condition is in matters, as in Exim: per_rcpt counts one
  per RCPT but all recipients at once after RCPT; per_* options that make
  no sense in an ACL turn the condition readonly (or are an error with
  leaky/strict).
* The stored rate is an exponentially weighted moving average adjusted for
  variable sampling intervals (see :func:`update_rate`).
* The condition is *true* (``over_limit``) when ``rate >= limit``: "clients
  sending at the limit are considered to be over the limit".
* leaky (default) stores the new rate only when under the limit; strict
  always stores; readonly and noupdate never store and count zero events.
* The record key is ``<period text>/<per_* mode>/[unique/]<key>`` exactly as
  Exim builds it.  Two Exim quirks are kept on purpose so that keys and
  results match Exim's: ``per_byte`` is filed under ``per_mail``, and
  ``per_addr`` under ``per_rcpt``.
* Unique events (``per_addr``, ``unique=``) are counted once per period using
  Exim's Bloom filter (MD5 double hashing, 8 probes, 16 bits per allowed
  event, at least 40 bytes).  The filter is capped at the space the record
  store offers; above that limit the false-positive rate grows.
* Results are remembered per connection / message / ACL run exactly where
  Exim remembers them (:class:`ConnectionCache`).

Everything here is pure except :func:`check`, the thin shell that applies
:func:`evaluate` through a record store (``shared.ratetable.RateTable`` or
:class:`DictRateStore`).
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

# Exim's ACL_WHERE_* order: the stages up to "not_smtp" are "in a message".
ACL_STAGES = (
    "rcpt", "mail", "predata", "mime", "dkim", "data", "prdr", "not_smtp",
    "auth", "connect", "etrn", "expn", "helo", "mailauth", "not_smtp_start",
    "notquit", "quit", "starttls", "vrfy",
)
_STAGE_INDEX = {name: index for index, name in enumerate(ACL_STAGES)}
_NOT_SMTP = _STAGE_INDEX["not_smtp"]
_PREDATA = _STAGE_INDEX["predata"]

# Exim's acl_wherenames, used in its error messages.
_STAGE_TITLES = {
    "rcpt": "RCPT", "mail": "MAIL", "predata": "PREDATA", "mime": "MIME",
    "dkim": "DKIM", "data": "DATA", "prdr": "PRDR", "not_smtp": "non-SMTP",
    "auth": "AUTH", "connect": "connection", "etrn": "ETRN", "expn": "EXPN",
    "helo": "EHLO or HELO", "mailauth": "MAILAUTH",
    "not_smtp_start": "non-SMTP-start", "notquit": "NOTQUIT", "quit": "QUIT",
    "starttls": "STARTTLS", "vrfy": "VRFY",
}

_C_SPACE = " \t\n\v\f\r"
_STRTOD = re.compile(
    r"[+-]?(?:inf(?:inity)?|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)",
    re.IGNORECASE)
_SIZE_SUFFIX = {"k": 1024.0, "m": 1024.0 ** 2, "g": 1024.0 ** 3}
_TIME_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_TIME_ITEM = re.compile(r"([0-9]+)([wdhms])")
_C_INT_MAX = 2 ** 31 - 1

BLOOM_MIN_BYTES = 40            # sizeof(dbdata_ratelimit_unique.bloom) in Exim
BLOOM_MAX_BYTES = 0xFFFF        # the size field of the encoded filter is 16 bits
_BLOOM_HEADER = struct.Struct("<qH")  # epoch (whole seconds), filter size
BLOOM_HEADER_SIZE = _BLOOM_HEADER.size
_U32 = 0xFFFFFFFF


class RatelimitError(ValueError):
    """A ratelimit condition whose arguments Exim would reject."""

    def __init__(self, reason: str) -> None:
        super().__init__(f'error in arguments to "ratelimit" condition: {reason}')
        self.reason = reason


@dataclass(frozen=True)
class RatelimitSpec:
    """One parsed ``ratelimit`` condition, resolved for the ACL it is in.

    ``per`` is the mode name Exim puts in the record key; ``scope`` says
    which per-session cache holds results ("conn", "mail" or "cmd").
    ``count`` applies when ``count_from`` is "fixed"; otherwise the count is
    the message's recipient count or size (see :func:`event_count`).
    ``unique`` is a literal ``unique=`` event; ``unique_recipient`` means
    ``per_addr`` in the RCPT ACL, where the event is the recipient address.
    """

    limit: float
    limit_text: str
    period: float
    period_text: str
    per: str
    scope: str
    mode: str
    noupdate: bool
    count: float
    count_from: str
    unique: str | None
    unique_recipient: bool
    key: str | None

    @property
    def counts_unique(self) -> bool:
        """True when events are counted once per period (Bloom filter)."""
        return self.unique is not None or self.unique_recipient


class RateRecord(NamedTuple):
    """What is stored per key: time of the last update, the smoothed rate,
    and (for unique counting) the encoded Bloom filter state."""

    time: float
    rate: float
    blob: bytes = b""


@dataclass(frozen=True)
class RatelimitResult:
    """The outcome of one check; ``over_limit`` is the condition's value."""

    over_limit: bool
    rate: float
    limit: float
    period_text: str
    store: bool

    @property
    def sender_rate(self) -> str:
        """The value of ``$sender_rate``."""
        return format_rate(self.rate)


class RateStore(Protocol):
    """A record store: ``shared.ratetable.RateTable`` or :class:`DictRateStore`."""

    blob_size: int

    def update(self, key: str, fn: Callable[[Any], Any]) -> Any: ...


def format_rate(rate: float) -> str:
    """Format a rate as Exim does for ``$sender_rate`` (``%.1f``)."""
    return "%.1f" % rate


def split_exim_list(text: str, sep: str = "/") -> list[str]:
    """Split an Exim list with a fixed separator as string_nextinlist() does:
    leading and trailing white space is dropped from each item, a doubled
    separator is a literal one, and an empty remainder ends the list."""
    items: list[str] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _C_SPACE and text[pos] != sep:
            pos += 1
        if pos >= end:
            return items
        chars: list[str] = []
        while pos < end:
            char = text[pos]
            pos += 1
            if char == sep:
                if pos < end and text[pos] == sep:
                    pos += 1
                else:
                    break
            chars.append(char)
        items.append("".join(chars).rstrip(_C_SPACE))


def parse_time_interval(text: str) -> float:
    """Parse an Exim time such as ``1w2d3h4m5s`` into seconds.

    Like Exim's readconf_readtime(): each number needs a unit; units may
    come in any order and repeat; a bare number is an error (ValueError).
    """
    pos = 0
    total = 0
    while True:
        match = _TIME_ITEM.match(text, pos)
        if match is None:
            raise ValueError(f'"{text}" is not a time value')
        total += int(match.group(1)) * _TIME_UNITS[match.group(2)]
        if total > _C_INT_MAX:
            raise ValueError(f'"{text}" is too large a time value')
        pos = match.end()
        if pos == len(text):
            return float(total)


def _strtod_prefix(text: str) -> tuple[float, str]:
    """C strtod(): the number at the start of ``text`` (0 if none) and the rest."""
    match = _STRTOD.match(text)
    if match is None:
        return 0.0, text
    return float(match.group(0)), text[match.end():]


def _parse_limit(text: str) -> float:
    value, rest = _strtod_prefix(text)
    if rest and rest[0].lower() in _SIZE_SUFFIX:
        value *= _SIZE_SUFFIX[rest[0].lower()]
        rest = rest[1:]
    if value < 0.0 or rest:
        raise RatelimitError(f'"{text}" is not a positive number')
    return value


def _parse_period(text: str | None) -> float:
    if text is None:
        raise RatelimitError("sender rate period not set")
    try:
        period = parse_time_interval(text)
    except ValueError:
        period = -1.0
    if period <= 0.0:
        raise RatelimitError(f'"{text}" is not a time value')
    return period


class _Options:
    """Mutable accumulator for the option loop of acl_ratelimit()."""

    def __init__(self) -> None:
        self.modes: set[str] = set()
        self.noupdate = False
        self.per: str | None = None
        self.clash = False
        self.all_rcpts = False
        self.badacl = False
        self.count = 1.0
        self.count_from = "fixed"
        self.unique: str | None = None
        self.unique_recipient = False
        self.key: str | None = None

    def set_per(self, per: str) -> None:
        if self.per is None:
            self.per = per
        else:
            self.clash = True


def _apply_per_option(opts: _Options, name: str, stage: int) -> None:
    """Exim's per_* branches, including where each is allowed."""
    if name == "per_cmd":
        opts.set_per("per_cmd")
    elif name == "per_conn":
        opts.set_per("per_conn")
        opts.badacl |= stage in (_NOT_SMTP, _STAGE_INDEX["not_smtp_start"])
    elif name == "per_mail":
        opts.set_per("per_mail")
        opts.badacl |= stage > _NOT_SMTP
    elif name == "per_rcpt":
        _apply_per_rcpt(opts, stage)
    elif name == "per_byte":
        opts.set_per("per_mail")
        if stage > _NOT_SMTP:
            opts.badacl = True
        else:
            opts.count_from = "message_size"
    else:  # per_addr
        opts.set_per("per_rcpt")
        if stage == _STAGE_INDEX["rcpt"]:
            opts.unique, opts.unique_recipient = None, True
        else:
            opts.badacl, opts.unique, opts.unique_recipient = True, "*", False


def _apply_per_rcpt(opts: _Options, stage: int) -> None:
    """per_rcpt counts one by one in RCPT, all at once after RCPT."""
    opts.set_per("per_rcpt")
    if _PREDATA <= stage <= _NOT_SMTP:
        opts.all_rcpts = True
        opts.count_from = "recipients"
    elif stage != _STAGE_INDEX["rcpt"]:
        opts.badacl = True


def _apply_option(opts: _Options, item: str, stage: int) -> None:
    lowered = item.lower() if item.isascii() else item   # strcmpic() is ASCII-only
    if lowered in ("leaky", "strict", "readonly"):
        opts.modes.add(lowered)
    elif lowered == "noupdate":
        opts.noupdate = True
    elif lowered in ("per_cmd", "per_conn", "per_mail", "per_rcpt", "per_byte",
                     "per_addr"):
        _apply_per_option(opts, lowered, stage)
    elif lowered.startswith("count="):
        value, rest = _strtod_prefix(item[6:])
        if value < 0.0 or rest:
            raise RatelimitError(f'"{item}" is not a positive number')
        opts.count, opts.count_from = value, "fixed"
    elif lowered.startswith("unique="):
        opts.unique, opts.unique_recipient = item[7:], False
    else:
        opts.key = item if opts.key is None else f"{opts.key}/{item}"


def _update_mode(opts: _Options, stage_name: str) -> str:
    """Check the option combination and settle leaky/strict/readonly."""
    if opts.clash:
        raise RatelimitError("conflicting per_* options")
    if len(opts.modes) > 1:
        raise RatelimitError("conflicting update modes")
    if opts.badacl and opts.modes - {"readonly"} and not opts.noupdate:
        raise RatelimitError(
            f'"{opts.per}" must not have /leaky or /strict option, or cannot '
            f"be used in {_STAGE_TITLES[stage_name]} ACL")
    if opts.noupdate or opts.badacl or "readonly" in opts.modes:
        return "readonly"
    return "strict" if "strict" in opts.modes else "leaky"


def _scope(per: str, mode: str, all_rcpts: bool) -> str:
    """Which Exim result tree (ratelimiters_conn/_mail/_cmd) this check uses."""
    if mode == "readonly":
        return "cmd"
    if per == "per_conn":
        return "conn"
    if per == "per_mail" or all_rcpts:
        return "mail"
    return "cmd"


@lru_cache(maxsize=1024)
def parse_ratelimit(text: str, where: str) -> RatelimitSpec:
    """Parse the expanded argument of a ``ratelimit`` condition.

    ``where`` is the ACL it appears in (one of :data:`ACL_STAGES`, e.g.
    "connect" or "rcpt"): as in Exim, per_rcpt/per_byte/per_addr mean
    different things in different ACLs and some combinations are errors.
    Raises :class:`RatelimitError` for what Exim rejects.
    """
    stage = _STAGE_INDEX.get(where)
    if stage is None:
        raise ValueError(f"unknown ACL {where!r}")
    items = split_exim_list(text)
    if not items:
        raise RatelimitError("sender rate limit not set")
    limit = _parse_limit(items[0])
    period_text = items[1] if len(items) > 1 else None
    period = _parse_period(period_text)
    opts = _Options()
    for item in items[2:]:
        _apply_option(opts, item, stage)
    mode = _update_mode(opts, where)
    per = opts.per or "per_mail"
    readonly = mode == "readonly"
    return RatelimitSpec(
        limit=limit, limit_text=items[0], period=period,
        period_text=period_text or "", per=per,
        scope=_scope(per, mode, opts.all_rcpts), mode=mode,
        noupdate=opts.noupdate,
        count=0.0 if readonly else opts.count,
        count_from="fixed" if readonly else opts.count_from,
        unique=opts.unique, unique_recipient=opts.unique_recipient,
        key=opts.key)


def event_count(spec: RatelimitSpec, *, recipients_count: int = 0,
                message_size: int = -1) -> float:
    """The number of events one check adds (Exim's ``count``).

    ``message_size`` is -1 when unknown (no SIZE= and no data yet): Exim
    then counts zero so that the rate just decays.
    """
    if spec.count_from == "recipients":
        return float(recipients_count)
    if spec.count_from == "message_size":
        return 0.0 if message_size < 0 else float(message_size)
    return spec.count


def event_unique(spec: RatelimitSpec, *, recipient: str | None = None) -> str | None:
    """The unique-event string for this check (``local_part@domain`` for
    per_addr in RCPT), or None when events are not de-duplicated."""
    if spec.unique_recipient:
        if recipient is None:
            raise ValueError("per_addr needs the recipient address")
        return recipient
    return spec.unique


def record_key(spec: RatelimitSpec, default_key: str) -> str:
    """The database key, built as acl.c does:
    ``<period text>/<per_*>/[unique/]<key>``.

    ``default_key`` is ``$sender_host_address`` ("" when there is none);
    it is used when the condition names no key.
    """
    key = spec.key if spec.key is not None else default_key
    unique = "unique/" if spec.counts_unique else ""
    return f"{spec.period_text}/{spec.per}/{unique}{key}"


def update_rate(prev: RateRecord | None, now: float, period: float,
                count: float) -> RateRecord:
    """Exim's smoothed-rate update (the new record carries no Bloom state).

    First sighting: rate = count.  Otherwise, with ``i = now - prev.time``
    and ``a = exp(-i/p)``: ``rate = (1 - a) * count / (i/p) + a * prev.rate``,
    raised to at least ``count`` (an isolated event after a long silence is
    worth ``count`` per period).  When the clock went backwards or did not
    move, the interval is clamped to 1e-9 s as acl.c does, so a burst within
    one instant still adds about ``count`` per event.  (Exim's clock has
    microsecond steps; we also clamp positive intervals below 1e-9 s, which
    would otherwise underflow ``i/p`` to zero and divide by it.)
    """
    if prev is None:
        return RateRecord(now, count)
    interval = now - prev.time
    if interval < 1e-9:
        interval = 1e-9
    i_over_p = interval / period
    a = math.exp(-i_over_p)
    rate = (1 - a) * count / i_over_p + a * prev.rate
    if rate < count:
        rate = count
    return RateRecord(now, rate)


def bloom_size(limit: float, cap: int | None = None) -> int:
    """Bytes in a new filter: Exim's ``max(40, (int)limit * 2)``, at most
    ``cap`` (the store's room) and 64 KiB."""
    wanted = max(BLOOM_MIN_BYTES, int(min(limit, BLOOM_MAX_BYTES)) * 2)
    ceiling = BLOOM_MAX_BYTES if cap is None else min(cap, BLOOM_MAX_BYTES)
    return max(1, min(wanted, ceiling))


def bloom_add(bloom: bytearray, event: str) -> bool:
    """Set the event's 8 bits; return True if all were already set (seen)."""
    digest = hashlib.md5(event.encode("utf-8", "surrogateescape")).digest()
    hashed = int.from_bytes(digest[0:4], "little")
    step = int.from_bytes(digest[4:8], "little")
    size = len(bloom)
    seen = True
    for _ in range(8):
        bit = 1 << (hashed % 8)
        index = (hashed // 8) % size
        if not bloom[index] & bit:
            bloom[index] |= bit
            seen = False
        hashed = (hashed + step) & _U32
    return seen


def encode_bloom(epoch: int, bloom: bytes) -> bytes:
    """Record blob for unique counting: filter start time, size, bits."""
    return _BLOOM_HEADER.pack(epoch, len(bloom)) + bytes(bloom)


def decode_bloom(blob: bytes) -> tuple[int, bytearray] | None:
    """Inverse of :func:`encode_bloom`; None for a missing or damaged blob."""
    if len(blob) <= BLOOM_HEADER_SIZE:
        return None
    epoch, size = _BLOOM_HEADER.unpack_from(blob)
    bits = blob[BLOOM_HEADER_SIZE:]
    if size != len(bits):
        return None
    return epoch, bytearray(bits)


def _current_bloom(spec: RatelimitSpec, prev: RateRecord | None, now: float,
                   cap: int | None) -> tuple[int, bytearray]:
    """The stored filter, or a fresh one if absent, damaged or older than a
    period (so that a repeated event counts once per period)."""
    stored = decode_bloom(prev.blob) if prev is not None else None
    if stored is not None and not int(now) > stored[0] + spec.period:
        return stored
    return int(now), bytearray(bloom_size(spec.limit, cap))


def evaluate(spec: RatelimitSpec, prev: RateRecord | None, now: float,
             count: float, unique: str | None = None,
             bloom_cap: int | None = None) -> tuple[RatelimitResult, RateRecord | None]:
    """Decide one check and say what to store (None = leave the store alone).

    ``count`` is ignored (zero) in readonly mode; ``unique`` is the event
    string when ``spec.counts_unique`` (default: the literal ``unique=``);
    ``bloom_cap`` limits the filter to what the store can hold.
    """
    readonly = spec.mode == "readonly"
    if readonly:
        count = 0.0
    blob = b""
    if spec.counts_unique:
        event = spec.unique if unique is None else unique
        if event is None:
            raise ValueError("per_addr needs the recipient address")
        epoch, bloom = _current_bloom(spec, prev, now, bloom_cap)
        if not readonly and bloom_add(bloom, event):
            count = 0.0
        blob = encode_bloom(epoch, bloom)
    record = update_rate(prev, now, spec.period, count)
    if blob:
        record = RateRecord(record.time, record.rate, blob)
    over = not record.rate < spec.limit
    store = spec.mode == "strict" or (spec.mode == "leaky" and not over)
    result = RatelimitResult(over, record.rate, spec.limit, spec.period_text, store)
    return result, record if store else None


class ConnectionCache:
    """Results already computed in this session, as Exim's three trees.

    Call :meth:`new_connection` at connection start, :meth:`reset_message`
    wherever Exim calls smtp_reset() (start of each message, RSET, HELO),
    and :meth:`start_acl` before each ACL run.  A key found here is not
    counted again: per_conn counts once per connection, per_mail once per
    message, per_cmd/per_rcpt once per command.
    """

    def __init__(self) -> None:
        self._trees: dict[str, dict[str, float]] = {"conn": {}, "mail": {}, "cmd": {}}

    def new_connection(self) -> None:
        for tree in self._trees.values():
            tree.clear()

    def reset_message(self) -> None:
        self._trees["mail"].clear()

    def start_acl(self) -> None:
        self._trees["cmd"].clear()

    def lookup(self, spec: RatelimitSpec, key: str) -> float | None:
        """The rate remembered for this record key, if any."""
        return self._trees[spec.scope].get(key)

    def remember(self, spec: RatelimitSpec, key: str, rate: float) -> None:
        self._trees[spec.scope][key] = rate


class DictRateStore:
    """An in-process record store with the RateTable interface (tests, -bh)."""

    def __init__(self, blob_size: int = 256) -> None:
        self.blob_size = blob_size
        self._records: dict[str, Any] = {}

    def update(self, key: str, fn: Callable[[Any], Any]) -> Any:
        new = fn(self._records.get(key))
        if new is not None:
            self._records[key] = new
        return new

    def get(self, key: str) -> Any:
        return self._records.get(key)


def check(store: RateStore, cache: ConnectionCache, spec: RatelimitSpec, *,
          default_key: str, now: float, count: float,
          unique: str | None = None) -> RatelimitResult:
    """Run one ratelimit condition: session cache, then the shared store.

    A cached result is compared against this condition's limit but not
    counted again, as in Exim.  Raises whatever the store raises when it
    cannot be used (the ACL should then DEFER, as Exim does).
    """
    key = record_key(spec, default_key)
    cached = cache.lookup(spec, key)
    if cached is not None:
        return RatelimitResult(not cached < spec.limit, cached, spec.limit,
                               spec.period_text, False)
    outcome: list[RatelimitResult] = []
    bloom_cap = store.blob_size - BLOOM_HEADER_SIZE

    def apply(prev: RateRecord | None) -> RateRecord | None:
        result, record = evaluate(spec, prev, now, count, unique, bloom_cap)
        outcome.append(result)
        return record

    store.update(key, apply)
    cache.remember(spec, key, outcome[-1].rate)
    return outcome[-1]

"""Exim retry rules and retry state: pure parsing and arithmetic.

A rule line in `begin retry` is `PATTERN ERROR [PARAMETERS]`, for example
`*  *  F,2h,15m; G,16h,1h,1.5; F,4d,6h`.  Each parameter set is
`F,cutoff,interval`, `G,cutoff,first,multiplier` or
`H,cutoff,first,multiplier`; a cutoff is measured from the first failure,
and the last cutoff is the retry time-out.  A rule without parameters
makes temporary errors permanent (as in Exim).

Patterns are matched against the recipient address: `*`, a domain pattern
(`example.com`, `*.example.com`, `^regex`), `local@domain` or `*@domain`
(an Exim address-list item).  Exim matches host errors against the host
name; we match every error against the address (documented deviation).

Error names are Exim's: `*`, `refused[_MX|_A]`, `timeout[_connect][_MX|_A]`,
`lost_connection`, `tls_required`, `auth_failed`, `mail_4xx`, `rcpt_4xx`,
`data_4xx` (each `x` may be a digit), `quota[_TIME]`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import msgpack

from mta.configfile import Line
from mta.lists import AddressList, ListError
from mta.values import BadValue, parse_time

DEFAULT_RULE_TEXT = "* * F,2h,15m; G,16h,1h,1.5; F,4d,6h"

_ERROR_NAME = re.compile(
    r"\*|refused(_MX|_A)?|timeout(_connect)?(_MX|_A)?|lost_connection|tls_required|auth_failed"
    r"|(mail|rcpt|data)_4[0-9x][0-9x]|quota(_\w+)?"
)


class RetryRuleError(ValueError):
    """A retry rule that does not parse."""


@dataclass(frozen=True)
class RetryStep:
    kind: str            # "F" fixed, "G" geometric, "H" randomized geometric
    cutoff: float        # seconds after the first failure when this step ends
    interval: float      # the (first) interval
    multiplier: float = 1.0


@dataclass(frozen=True)
class RetryRule:
    pattern: str
    error: str
    steps: tuple[RetryStep, ...]
    addresses: AddressList = field(compare=False, repr=False)

    @property
    def timeout(self) -> float:
        """Seconds after the first failure when retrying stops (0: no retries)."""
        return self.steps[-1].cutoff if self.steps else 0.0

    def matches(self, address: str, error: str) -> bool:
        return error_matches(self.error, error) and self.addresses.match(address)


def parse_retry_rule(text: str) -> RetryRule:
    """One `begin retry` line; raises RetryRuleError."""
    fields = text.split(None, 2)
    if len(fields) < 2:
        raise RetryRuleError("a retry rule needs a pattern and an error field")
    pattern, error = fields[0], fields[1]
    rest = fields[2] if len(fields) > 2 else ""
    if not _ERROR_NAME.fullmatch(error):
        raise RetryRuleError(f'unknown error type "{error}" in retry rule')
    if rest.startswith("senders="):
        raise RetryRuleError("senders= in retry rules is not supported")
    try:
        addresses = AddressList(pattern)
    except ListError as exc:
        raise RetryRuleError(f'bad retry pattern "{pattern}": {exc}') from None
    steps = tuple(_parse_step(part.strip()) for part in rest.split(";") if part.strip())
    return RetryRule(pattern, error, steps, addresses)


def _parse_step(text: str) -> RetryStep:
    parts = [part.strip() for part in text.split(",")]
    kind = parts[0].upper()
    expected = {"F": 3, "G": 4, "H": 4}.get(kind)
    if expected is None:
        raise RetryRuleError(f'"{text}": retry parameters start with F, G or H')
    if len(parts) != expected:
        raise RetryRuleError(f'"{text}": {kind} takes {expected - 1} values')
    try:
        cutoff, interval = parse_time(parts[1]), parse_time(parts[2])
        multiplier = float(parts[3]) if kind != "F" else 1.0
    except (BadValue, ValueError) as exc:
        raise RetryRuleError(f'"{text}": {exc}') from None
    if interval <= 0 or multiplier < 1.0:
        raise RetryRuleError(f'"{text}": the interval must be positive and the multiplier at least 1')
    return RetryStep(kind, cutoff, interval, multiplier)


def parse_retry_rules(lines: Iterable[Line]) -> list[RetryRule]:
    """The `begin retry` section; a bad line raises ConfigError naming it."""
    rules = []
    for line in lines:
        try:
            rules.append(parse_retry_rule(line.text))
        except RetryRuleError as exc:
            raise line.error(str(exc)) from None
    return rules


def error_matches(pattern: str, error: str) -> bool:
    """Does a rule's error field cover an error that happened?

    `error` is what the transport reports, always fully specified:
    `refused_MX`, `timeout_connect_A`, `timeout_MX`, `rcpt_451`, ... or a
    name no specific pattern matches (such as `socks`), which only `*` covers.
    """
    if pattern == "*":
        return True
    if pattern in ("refused", "timeout"):
        return error.startswith(pattern + "_")
    if pattern == "timeout_connect":
        return error.startswith("timeout_connect_")
    if pattern in ("timeout_MX", "timeout_A"):
        return error in (pattern, "timeout_connect_" + pattern[8:])
    code = re.fullmatch(r"(mail|rcpt|data)_4([0-9x])([0-9x])", pattern)
    if code:
        regex = pattern.replace("x", "[0-9]")
        return re.fullmatch(regex, error) is not None
    return pattern == error


def find_retry_rule(rules: list[RetryRule], address: str, error: str) -> RetryRule | None:
    """The first matching rule; Exim's default rule when there are no rules at all.

    None (some rules, none matching) means: no retrying, the error is permanent.
    """
    if not rules:
        return default_rule()
    for rule in rules:
        if rule.matches(address, error):
            return rule
    return None


def default_rule() -> RetryRule:
    return parse_retry_rule(DEFAULT_RULE_TEXT)


def next_retry_time(rule: RetryRule, first_failure: float, last_try: float, now: float,
                    rng: Callable[[], float] = random.random) -> float | None:
    """When to try again after a failure at `now`, or None when timed out.

    `last_try` is the time of the previous failed attempt (equal to `now`
    or to `first_failure` for the first failure).  G and H steps grow the
    gap since the last try by their multiplier, never below their first
    interval; H adds a random part as Exim does.
    """
    elapsed = now - first_failure
    step = next((step for step in rule.steps if elapsed < step.cutoff), None)
    if step is None:
        return None
    if step.kind == "F":
        return now + step.interval
    gap = max(now - last_try, 0.0)
    grown = gap * step.multiplier
    if step.kind == "G":
        return now + max(step.interval, grown)
    extra = grown - step.interval
    return now + step.interval + (extra / 2 + rng() * extra / 2 if extra > 0 else 0.0)


# ---------------------------------------------------------------- per-recipient state

@dataclass
class RecipientRetry:
    """Retry state of one recipient of one message (kept in the -R file)."""

    first_failure: float
    last_try: float
    next_try: float
    error: str = ""


def record_deferral(previous: RecipientRetry | None, rule: RetryRule | None, now: float,
                    error_text: str, not_before: float = 0.0) -> RecipientRetry | None:
    """The state after a temporary failure at `now`; None when retrying is over.

    `not_before` pushes the next try out (used when every host is itself
    waiting for its retry time).
    """
    first = previous.first_failure if previous else now
    last = previous.last_try if previous else now
    if rule is None:
        return None
    next_try = next_retry_time(rule, first, last, now)
    if next_try is None:
        return None
    return RecipientRetry(first, now, max(next_try, not_before), error_text)


def pack_retry_state(state: dict[str, RecipientRetry]) -> bytes:
    rows = {address: [r.first_failure, r.last_try, r.next_try, r.error] for address, r in state.items()}
    return msgpack.packb({"version": 1, "recipients": rows}, use_bin_type=True)


def unpack_retry_state(data: bytes) -> dict[str, RecipientRetry]:
    """Decode a -R file; anything unreadable counts as no state (retry now)."""
    try:
        fields = msgpack.unpackb(data, raw=False)
        rows = fields["recipients"]
        return {address: RecipientRetry(float(a), float(b), float(c), str(d))
                for address, (a, b, c, d) in rows.items()}
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException):
        return {}


def is_due(state: dict[str, RecipientRetry], pending: Iterable[str], now: float) -> bool:
    """True if some pending recipient has no retry state or its time has come."""
    for address in pending:
        record = state.get(address)
        if record is None or record.next_try <= now:
            return True
    return False


# ---------------------------------------------------------------- per-host state

@dataclass
class HostRetry:
    first_failure: float
    last_try: float
    next_try: float


class HostRetryTable:
    """Hosts that failed recently, keyed "ip:port"; kept in memory per queue
    runner (a restart forgets them, which costs at most one extra attempt)."""

    def __init__(self) -> None:
        self._hosts: dict[str, HostRetry] = {}

    def waiting_until(self, key: str, now: float) -> float | None:
        """The host's next retry time if it is still in the future."""
        record = self._hosts.get(key)
        return record.next_try if record is not None and record.next_try > now else None

    def failed(self, key: str, rule: RetryRule | None, now: float) -> None:
        previous = self._hosts.get(key)
        first = previous.first_failure if previous else now
        last = previous.last_try if previous else now
        next_try = next_retry_time(rule, first, last, now) if rule else None
        if next_try is None:
            # Past its time-out (or no rule): Exim keeps trying such hosts
            # once per queue run; a short wait avoids hammering it.
            next_try = now + 60.0
        self._hosts[key] = HostRetry(first, now, next_try)

    def succeeded(self, key: str) -> None:
        self._hosts.pop(key, None)

    def __len__(self) -> int:
        return len(self._hosts)

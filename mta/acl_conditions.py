"""ACL conditions and modifiers: compiled once, evaluated per check.

Each item is what follows a verb on an ACL line (`hosts = ...`,
`ratelimit = ...`, `set acl_c0 = ...`).  `compile_item` builds it from the
configuration text, compiling expansions and constant lists up front so that
errors are reported with their line; `item.evaluate(run)` decides it for
one ACL run and returns a result code.  What the verb then does with the
result is `mta.acl`'s business.

Results follow Exim's acl.c: OK (true), FAIL (false), and from a nested
`acl` condition also DISCARD or FAIL_DROP.  A condition that cannot be
decided raises `AclProblem` with DEFER (a lookup could not be done: try
later) or ERROR (anything else: a bad expansion, bad ratelimit arguments),
carrying the text Exim would log.  SKIP means the argument's expansion was
forced to fail, which Exim treats as if the item were absent.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from mta import ratelimit
from mta.configfile import Line
from mta.expand import Expansion, ExpansionError, ExpansionForcedFail, compile_expansion
from mta.lists import AddressList, DomainList, HostList, ListError, LocalPartList, NamedLists
from mta.lookups import LookupCache, LookupFailed, interpret_escape
from mta.ratelimit import RatelimitError, event_count, event_unique, parse_ratelimit, \
    parse_time_interval, split_exim_list
from mta.smtp_commands import split_address
from shared.ratetable import RateTableBusy

if TYPE_CHECKING:
    from mta.acl import AclRun

OK, FAIL, DEFER, ERROR, DISCARD, FAIL_DROP, SKIP = "ok", "fail", "defer", "error", "discard", "drop", "skip"

# Exim's acl_wherenames, used in messages.
WHERE_NAMES = {"connect": "connection", "helo": "EHLO or HELO", "mail": "MAIL", "rcpt": "RCPT",
               "predata": "PREDATA", "data": "DATA"}
STAGES = tuple(WHERE_NAMES)
_NOT_IN_MESSAGE = frozenset({"connect", "helo"})
_NOT_RCPT = frozenset(STAGES) - {"rcpt"}

# Controls that change nothing here: what they switch is not implemented or
# is already so (no AUTH, no DKIM, no cutthrough, no synchronisation check,
# PIPELINING always offered).  `control = error` is implemented.
NO_OP_CONTROLS = frozenset({
    "allow_auth_unadvertised", "caseful_local_part", "cutthrough_delivery", "debug",
    "dkim_disable_verify", "enforce_sync", "no_callout_flush", "no_delay_flush",
    "no_enforce_sync", "no_multiline_responses", "no_pipelining", "suppress_local_fixups",
})

# Exim conditions and modifiers that this server does not implement: a
# configuration using them is refused with a clear message.
UNSUPPORTED = frozenset({
    "add_header", "arc", "atrn_domains", "bmi_optin", "continue", "dcc", "decode", "demime",
    "dkim_signers", "dkim_status", "dmarc_status", "dnslists", "encrypted", "endpass",
    "log_reject_target", "malware", "mime_regex", "queue", "regex", "remove_header", "seen",
    "sender_domains", "spam", "spf", "spf_guess", "udpsend", "verify", "wellknown",
})

_LOG_TARGETS = re.compile(r":([a-z,]*):\s*")
_MAX_RUNTIME_LISTS = 256


class AclProblem(Exception):
    """A condition or modifier could not be evaluated (DEFER or ERROR)."""

    def __init__(self, rc: str, message: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.message = message


@dataclass(frozen=True)
class CompileContext:
    """What compiling an item needs from the configuration."""

    named: NamedLists
    primary_hostname: str
    lookups: LookupCache


@dataclass(frozen=True)
class Item:
    name: str
    negated: bool
    line: Line

    forbidden: frozenset[str] = frozenset()   # stages where Exim refuses it

    def evaluate(self, run: AclRun) -> str:
        raise NotImplementedError


def expand(run: AclRun, expansion: Expansion) -> str | None:
    """Expand an item's argument; None when the expansion was forced to fail."""
    try:
        return expansion.expand(run.variables)
    except ExpansionForcedFail:
        return None
    except ExpansionError as exc:
        rc = DEFER if is_lookup_defer(exc) else ERROR
        raise AclProblem(rc, f'failed to expand ACL string "{expansion.text}": {exc}') from None


def is_lookup_defer(exc: ExpansionError) -> bool:
    """Exim's search_find_defer: the expansion failed because a lookup did."""
    return "gave DEFER" in str(exc)


# --------------------------------------------------------------------------
# Messages (used by the verb, expanded only when it needs them)


@dataclass(frozen=True)
class Message(Item):
    text: Expansion = None


# --------------------------------------------------------------------------
# Conditions


@dataclass(frozen=True)
class Condition(Item):
    """`condition = string`: true for a non-zero number, yes or true."""

    text: Expansion = None

    def evaluate(self, run: AclRun) -> str:
        value = expand(run, self.text)
        if value is None:
            return SKIP
        number = re.fullmatch(r"-?([0-9]*)", value)
        if number:
            return OK if int(number.group(1) or "0") else FAIL
        if value.lower() in ("yes", "true"):
            return OK
        if value.lower() in ("no", "false"):
            return FAIL
        raise AclProblem(DEFER, f'invalid "condition" value "{value}"')


@dataclass(frozen=True)
class Authenticated(Item):
    """`authenticated = list`: never true, as this server offers no AUTH."""

    forbidden: frozenset[str] = _NOT_IN_MESSAGE

    def evaluate(self, run: AclRun) -> str:
        return FAIL


def _host(session) -> str:
    return session.info.host_address


def _domain(session) -> str:
    return session.current_domain


def _local_part(session) -> str:
    return split_address(session.current_recipient)[0]


def _recipient(session) -> str:
    return session.current_recipient


def _sender(session) -> str:
    return session.transaction.sender if session.transaction is not None else ""


# condition name -> (list class, subject of the test, stages where it is refused)
LIST_CONDITIONS: dict[str, tuple[type, Callable, frozenset[str]]] = {
    "hosts": (HostList, _host, frozenset()),
    "domains": (DomainList, _domain, _NOT_RCPT),
    "local_parts": (LocalPartList, _local_part, _NOT_RCPT),
    "recipients": (AddressList, _recipient, _NOT_RCPT),
    "senders": (AddressList, _sender, _NOT_IN_MESSAGE),
}


@dataclass(frozen=True)
class ListCondition(Item):
    """`hosts`, `domains`, `local_parts`, `senders`, `recipients`.

    As in Exim the list text is expanded before it is matched.  A list
    without `$` or `\\` is compiled once; an expanded one is compiled per
    distinct expansion and kept (a few hundred at most).
    """

    text: Expansion = None
    build: Callable[[str], Any] = None
    subject: Callable[[Any], str] = None
    constant: Any = None
    compiled: dict = field(default_factory=dict, compare=False)

    def evaluate(self, run: AclRun) -> str:
        matcher = self.constant if self.constant is not None else self._expanded(run)
        if matcher is None:
            return FAIL
        try:
            return OK if matcher.match(self.subject(run.session)) else FAIL
        except LookupFailed as exc:
            raise AclProblem(DEFER, str(exc)) from None
        except ValueError as exc:
            raise AclProblem(ERROR, str(exc)) from None

    def _expanded(self, run: AclRun):
        """The list for this expansion; None (not in the list) on forced failure."""
        try:
            text = self.text.expand(run.variables)
        except ExpansionForcedFail:
            return None
        except ExpansionError as exc:
            message = f'failed to expand "{self.text.text}" while checking a list: {exc}'
            run.services.logs.panic(message)
            raise AclProblem(DEFER, message) from None
        matcher = self.compiled.get(text)
        if matcher is None:
            try:
                matcher = self.build(text)
            except ListError as exc:
                raise AclProblem(ERROR, f"{self.name}: {exc}") from None
            if len(self.compiled) >= _MAX_RUNTIME_LISTS:
                self.compiled.clear()
            self.compiled[text] = matcher
        return matcher


@dataclass(frozen=True)
class Ratelimit(Item):
    """`ratelimit = m / p / options / key`, counted in the shared table.

    Sets `$sender_rate_limit` and `$sender_rate_period` (also when the
    arguments are bad, as Exim does) and `$sender_rate`.  A limit that
    expands to nothing is a limit of zero: every client is over it.
    """

    text: Expansion = None

    def evaluate(self, run: AclRun) -> str:
        text = expand(run, self.text)
        if text is None:
            return SKIP
        extra = run.variables.extra
        try:
            spec = parse_ratelimit(text, run.stage)
        except RatelimitError as exc:
            items = split_exim_list(text) + ["", ""]
            extra["sender_rate_limit"], extra["sender_rate_period"] = items[0], items[1]
            raise AclProblem(ERROR, str(exc)) from None
        extra["sender_rate_limit"], extra["sender_rate_period"] = spec.limit_text, spec.period_text
        session = run.session
        transaction = session.transaction
        recipients = len(transaction.recipients) if transaction is not None else 0
        size = transaction.size_hint if transaction is not None and transaction.size_hint else -1
        count = event_count(spec, recipients_count=recipients, message_size=size)
        unique = event_unique(spec, recipient=session.current_recipient) if spec.counts_unique else None
        try:
            result = ratelimit.check(run.services.ratetable, run.connection.rates, spec,
                           default_key=session.info.host_address, now=time.time(), count=count,
                           unique=unique)
        except RateTableBusy as exc:
            raise AclProblem(DEFER, f"ratelimit database not available: {exc}") from None
        extra["sender_rate"] = result.sender_rate
        return OK if result.over_limit else FAIL


@dataclass(frozen=True)
class AclCall(Item):
    """`acl = name arg1 ...`: run another ACL.  Its accept is true, its deny
    false, its defer defers this ACL; drop and discard pass through as
    Exim's FAIL_DROP and DISCARD (discard only for accept/discard verbs)."""

    words: tuple[Expansion, ...] = ()

    def evaluate(self, run: AclRun) -> str:
        verb = run.verb
        values = []
        for word in self.words:
            try:
                values.append(word.expand(run.variables))
            except ExpansionForcedFail:
                raise AclProblem(ERROR, "") from None
            except ExpansionError as exc:
                rc = DEFER if is_lookup_defer(exc) else ERROR
                raise AclProblem(rc, f'failed to expand ACL string "{word.text}": {exc}') from None
        rc = run.call_acl(values[0], values[1:])
        if rc == DISCARD and verb not in ("accept", "discard"):
            raise AclProblem(ERROR, f'nested ACL returned "discard" for "{verb}" command '
                                    '(only allowed with "accept" or "discard")')
        return rc


def split_acl_words(text: str) -> list[str]:
    """Exim's string_dequote applied word by word: a word ends at white
    space unless it is in double quotes, where backslash escapes work."""
    words: list[str] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return words
        if text[pos] != '"':
            end = pos
            while end < len(text) and not text[end].isspace():
                end += 1
            words.append(text[pos:end])
            pos = end
            continue
        chars, pos = [], pos + 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\":
                char, pos = interpret_escape(text, pos)
                chars.append(char)
                continue
            chars.append(text[pos])
            pos += 1
        words.append("".join(chars))
        pos += 1


# --------------------------------------------------------------------------
# Modifiers


@dataclass(frozen=True)
class SetVariable(Item):
    """`set acl_cN = value` (connection) or `set acl_mN = value` (message)."""

    variable: str = ""
    text: Expansion = None

    def evaluate(self, run: AclRun) -> str:
        value = expand(run, self.text)
        if value is None:
            return SKIP
        session = run.session
        if self.variable.startswith("acl_c"):
            session.connection_variables[self.variable] = value
        elif session.transaction is not None:
            session.transaction.variables[self.variable] = value
        else:
            run.variables.message_variables_outside_transaction[self.variable] = value
        return OK


def parse_delay(text: str) -> float:
    """An Exim time (`30s`, `1m30s`); AclProblem(ERROR) if it is not one."""
    try:
        return parse_time_interval(text)
    except ValueError:
        raise AclProblem(ERROR, f'syntax error in argument for "delay" modifier: "{text}" is not a time '
                                'value') from None


@dataclass(frozen=True)
class Delay(Item):
    """`delay = time`: this session waits; the worker's other sessions go on."""

    text: Expansion = None

    def evaluate(self, run: AclRun) -> str:
        value = expand(run, self.text)
        if value is None:
            return SKIP
        run.services.sleep(parse_delay(value))
        return OK


def control_is_error(text: str) -> bool:
    """True for `control = error`, False for a control that is a no-op here;
    AclProblem(ERROR) for a control this server does not implement."""
    name = text.split("/", 1)[0].strip()
    if name != "error" and name not in NO_OP_CONTROLS:
        raise AclProblem(ERROR, f'unsupported or unknown control "{text}"')
    return name == "error"


@dataclass(frozen=True)
class Control(Item):
    text: Expansion = None

    def evaluate(self, run: AclRun) -> str:
        value = expand(run, self.text)
        if value is None:
            return SKIP
        if control_is_error(value):
            raise AclProblem(ERROR, "")
        return OK


def log_targets(text: str) -> tuple[frozenset[str], str]:
    """`:main,reject: text` -> ({"main", "reject"}, "text"); main by default."""
    match = _LOG_TARGETS.match(text)
    if match is None:
        return frozenset({"main"}), text.lstrip()
    names = frozenset(name for name in match.group(1).split(",") if name)
    if not names <= {"main", "reject", "panic"}:
        return frozenset({"main", "panic"}), f'unknown log name in "{text}" in "logwrite"'
    return names or frozenset({"main"}), text[match.end():]


def printable(text: str) -> str:
    """Exim's string_printing: control characters shown as escapes."""
    if text.isprintable():
        return text
    escapes = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(c if c.isprintable() else escapes.get(c, f"\\x{ord(c):02x}") for c in text)


@dataclass(frozen=True)
class Logwrite(Item):
    """`logwrite = [:main,reject,panic:] text`.  The reject and panic logs
    are written with the main log, as `mta.log.Logs` always does."""

    text: Expansion = None

    def evaluate(self, run: AclRun) -> str:
        value = expand(run, self.text)
        if value is None:
            return SKIP
        targets, message = log_targets(value)
        logs = run.services.logs
        message = printable(message)
        if "reject" in targets:
            logs.reject(message)
        elif "main" in targets and "panic" not in targets:
            logs.main(message)
        if "panic" in targets:
            logs.panic(message)
        return OK


# --------------------------------------------------------------------------
# Compiling one item


class ItemError(Exception):
    """A condition or modifier that cannot be compiled (for ConfigError)."""


def compile_item(name: str, negated: bool, rest: str, line: Line, context: CompileContext) -> Item:
    """Build the item from its name and the text after it (`= argument`,
    or `acl_c0 = argument` for `set`), checked in Exim's order."""
    builder = _BUILDERS.get(name)
    if builder is None:
        if name in UNSUPPORTED:
            raise ItemError(f'ACL condition/modifier "{name}" is not supported by mta-server')
        raise ItemError(f'unknown ACL condition/modifier in "{line.text}"')
    if negated and name in MODIFIERS:
        raise ItemError(f'ACL error: negation is not allowed with "{name}"')
    variable = ""
    if name == "set":
        variable, rest = parse_set_name(rest)
    if not rest.startswith("="):
        kind = "modifier" if name in MODIFIERS else "condition"
        raise ItemError(f'"=" missing after ACL "{name}" {kind}')
    return builder(name, negated, rest[1:].lstrip(), line, context, variable)


def _expansion(name: str, argument: str, context: CompileContext) -> Expansion:
    try:
        return compile_expansion(argument, named=context.named, lookups=context.lookups)
    except ExpansionError as exc:
        raise ItemError(f"{name}: {exc}") from None


def _build_message(name, negated, argument, line, context, variable) -> Item:
    return Message(name, negated, line, text=_expansion(name, argument, context))


def _build_condition(name, negated, argument, line, context, variable) -> Item:
    return Condition(name, negated, line, text=_expansion(name, argument, context))


def _build_authenticated(name, negated, argument, line, context, variable) -> Item:
    return Authenticated(name, negated, line)


def _build_list(name, negated, argument, line, context, variable) -> Item:
    kind, subject, forbidden = LIST_CONDITIONS[name]
    expansion = _expansion(name, argument, context)

    def build(text: str):
        return kind(text, context.named, context.primary_hostname, lookups=context.lookups)

    constant = None
    if expansion.is_constant:
        try:
            constant = build(expansion.constant_value)
        except ListError as exc:
            raise ItemError(f"{name}: {exc}") from None
    return ListCondition(name, negated, line, forbidden=forbidden, text=expansion, build=build,
                         subject=subject, constant=constant)


def _build_ratelimit(name, negated, argument, line, context, variable) -> Item:
    expansion = _expansion(name, argument, context)
    if expansion.is_constant:
        check_constant_ratelimit(expansion.constant_value)
    return Ratelimit(name, negated, line, text=expansion)


def check_constant_ratelimit(text: str, stages: tuple[str, ...] = STAGES) -> None:
    """ItemError unless the arguments parse in at least one of `stages`."""
    problems = []
    for stage in stages:
        try:
            parse_ratelimit(text, stage)
            return
        except RatelimitError as exc:
            problems.append(str(exc))
    raise ItemError(problems[0])


def _build_acl(name, negated, argument, line, context, variable) -> Item:
    words = split_acl_words(argument)
    if not words:
        raise ItemError('"acl" condition needs the name of an ACL')
    if len(words) > 10:
        raise ItemError(f'too many arguments (at most 9) in "acl = {argument}"')
    return AclCall(name, negated, line, words=tuple(_expansion(name, word, context) for word in words))


def _build_set(name, negated, argument, line, context, variable) -> Item:
    return SetVariable(name, negated, line, variable=variable, text=_expansion(name, argument, context))


def _build_delay(name, negated, argument, line, context, variable) -> Item:
    expansion = _expansion(name, argument, context)
    if expansion.is_constant:
        _as_item_error(parse_delay, expansion.constant_value)
    return Delay(name, negated, line, text=expansion)


def _build_control(name, negated, argument, line, context, variable) -> Item:
    expansion = _expansion(name, argument, context)
    if expansion.is_constant:
        _as_item_error(control_is_error, expansion.constant_value)
    return Control(name, negated, line, text=expansion)


def _build_logwrite(name, negated, argument, line, context, variable) -> Item:
    return Logwrite(name, negated, line, text=_expansion(name, argument, context))


def _as_item_error(function: Callable[[str], Any], text: str) -> None:
    try:
        function(text)
    except AclProblem as problem:
        raise ItemError(problem.message) from None


MODIFIERS = frozenset({"message", "log_message", "set", "delay", "control", "logwrite"})

_BUILDERS: dict[str, Callable[..., Item]] = {
    "message": _build_message,
    "log_message": _build_message,
    "condition": _build_condition,
    "authenticated": _build_authenticated,
    **{name: _build_list for name in LIST_CONDITIONS},
    "ratelimit": _build_ratelimit,
    "acl": _build_acl,
    "set": _build_set,
    "delay": _build_delay,
    "control": _build_control,
    "logwrite": _build_logwrite,
}


def parse_set_name(text: str) -> tuple[str, str]:
    """`acl_c0 = value` -> ("acl_c0", "= value"), checked as Exim does."""
    if not text.startswith(("acl_c", "acl_m")):
        raise ItemError(f'invalid variable name after "set" in ACL modifier "set {text}" '
                        '(must start "acl_c" or "acl_m")')
    if len(text) < 6 or not (text[5].isdigit() or text[5] == "_"):
        raise ItemError(f'invalid variable name after "set" in ACL modifier "set {text}" '
                        "(digit or underscore must follow acl_c or acl_m)")
    end = 5
    while end < len(text) and text[end] != "=" and not text[end].isspace():
        if not (text[end].isalnum() or text[end] == "_"):
            raise ItemError(f'invalid character "{text[end]}" in variable name in ACL modifier '
                            f'"set {text}"')
        end += 1
    return text[:end], text[end:].lstrip()

"""Exim access control lists: compiled once per worker, run per SMTP stage.

`compile_acls(config)` parses every ACL in `begin acl` and the
`acl_smtp_*` options into statements (verb + conditions/modifiers, see
`mta.acl_conditions`) and raises ConfigError naming FILE:LINE for anything
Exim would refuse or that this server does not implement.  `AclPolicy` is
the per-connection `mta.policy.Policy` that runs them.

Semantics are Exim's (acl.c, smtp_in.c):
- Statements run in order; in each, conditions and modifiers are evaluated
  in order until one is false.  accept/deny/defer/drop/discard act when all
  are true, require when one is false; warn logs its log_message and goes on.
- Running off the end of an ACL is an implicit deny.  An unset option
  accepts, except acl_smtp_rcpt, for which this server's rule is to accept
  +local_domains only (Exim refuses every recipient).
- `message` and `log_message` are the last ones seen before the statement
  was decided, expanded only when the verb uses them.
- A condition that cannot be decided defers (DEFER: a lookup failed) or
  fails (ERROR: anything else); both answer 451 "Temporary local problem -
  please try later" and are logged with the reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import gevent

from mta.acl_conditions import DEFER, DISCARD, ERROR, FAIL, FAIL_DROP, MODIFIERS, OK, SKIP, STAGES, \
    WHERE_NAMES, AclCall, AclProblem, CompileContext, Item, ItemError, Ratelimit, \
    check_constant_ratelimit, compile_item, printable
from mta.configfile import ConfigError, Line
from mta.expand import Expansion, ExpansionError, ExpansionForcedFail, compile_expansion
from mta.log import host_field
from mta.lookups import LookupCache
from mta.policy import ACCEPTED, Verdict
from mta.ratelimit import ConnectionCache
from mta.variables import SessionVariables

VERBS = ("accept", "defer", "deny", "discard", "drop", "require", "warn")
MAX_NESTING = 20
_MAX_INLINE_ACLS = 256
_NAME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)?\s*")
# For each verb, the results for which its message/log_message are used.
_MESSAGE_RESULTS = {
    "accept": {OK, FAIL, FAIL_DROP}, "defer": {OK}, "deny": {OK}, "discard": {OK, FAIL, FAIL_DROP},
    "drop": {OK}, "require": {FAIL, FAIL_DROP}, "warn": {OK},
}
_VERDICT_ACTIONS = {FAIL: "deny", FAIL_DROP: "drop", DEFER: "defer"}
_DISCARD_STAGES = frozenset({"mail", "rcpt", "data"})


@dataclass(frozen=True)
class Statement:
    verb: str
    items: tuple[Item, ...]
    line: Line


@dataclass(frozen=True)
class Acl:
    name: str
    statements: tuple[Statement, ...]


@dataclass
class CompiledAcls:
    """Every named ACL, and what each SMTP stage runs: an `Acl`, an
    `Expansion` giving an ACL's name at run time, or None (unset)."""

    named: dict[str, Acl]
    stages: dict[str, Acl | Expansion | None]
    context: CompileContext
    inline: dict[str, Acl] = field(default_factory=dict)

    def resolve(self, text: str, line: Line | None = None) -> Acl:
        """The ACL a name (or inline ACL text) stands for, as Exim finds it:
        a word is a named ACL; anything else is the text of an ACL."""
        text = text.strip()
        if " " not in text:
            if text in self.named:
                return self.named[text]
            if text.startswith("/"):
                raise _error(line, f'ACL files are not supported: "{text}"')
        acl = self.inline.get(text)
        if acl is None:
            acl = _compile_inline(text, line, self.context)
            if len(self.inline) >= _MAX_INLINE_ACLS:   # names expanded at run time
                self.inline.clear()
            self.inline[text] = acl
        return acl


# --------------------------------------------------------------------------
# Compiling


def compile_acls(config, lookups: LookupCache | None = None) -> CompiledAcls:
    """Compile the ACL section and the acl_smtp_* options; ConfigError
    (FILE:LINE) for anything Exim would refuse or this server lacks."""
    context = CompileContext(config.compiled_lists, config.primary_hostname,
                             LookupCache() if lookups is None else lookups)
    named = {name: Acl(name, _compile_statements(section.body, context))
             for name, section in config.acls.items()}
    acls = CompiledAcls(named, {}, context)
    for acl in list(named.values()):
        _check_calls(acl, acls)
    for stage in STAGES:
        acls.stages[stage] = _stage_acl(config, stage, acls)
    return acls


def _error(line: Line | None, message: str) -> ConfigError:
    return line.error(message) if line is not None else ConfigError(message)


def _compile_statements(lines: list[Line], context: CompileContext) -> tuple[Statement, ...]:
    parsed: list[tuple[str, Line, list[Item]]] = []
    for line in lines:
        verb, item = _parse_line(line, bool(parsed), context)
        if verb is not None:
            parsed.append((verb, line, []))
        if item is not None:
            parsed[-1][2].append(item)
    return tuple(Statement(verb, tuple(items), line) for verb, line, items in parsed)


def _parse_line(line: Line, in_statement: bool, context: CompileContext) -> tuple[str | None, Item | None]:
    """(new verb or None, item or None) for one ACL line, as Exim's acl_read:
    a line that does not start with a verb continues the previous statement."""
    text = line.text
    negated, name, rest = _read_name(text)
    verb = None
    if name in VERBS:
        if negated:
            raise line.error(f'malformed ACL line "{text}"')
        verb = name
        if not rest:
            return verb, None
        negated, name, rest = _read_name(rest)
    elif not in_statement:
        raise line.error(f'unknown ACL verb "{name}" in "{text}"')
    try:
        return verb, compile_item(name, negated, rest, line, context)
    except ItemError as exc:
        raise line.error(str(exc)) from None


def _read_name(text: str) -> tuple[bool, str, str]:
    """Exim's optional `!` then readconf_readname: (negated, name, rest)."""
    text = text.lstrip()
    negated = text.startswith("!")
    match = _NAME.match(text, 1 if negated else 0)
    return negated, match.group(1) or "", text[match.end():]


def _compile_inline(text: str, line: Line | None, context: CompileContext) -> Acl:
    """An ACL written in place of a name (`acl_smtp_mail = accept`)."""
    filename, number = (line.filename, line.number) if line is not None else ("", 0)
    lines = [Line(part.strip(), filename, number) for part in text.split("\n")
             if part.strip() and not part.strip().startswith("#")]
    return Acl("inline ACL", _compile_statements(lines, context))


def _check_calls(acl: Acl, acls: CompiledAcls) -> None:
    """Every `acl = NAME` with a constant name must name an ACL."""
    for statement in acl.statements:
        for item in statement.items:
            if isinstance(item, AclCall) and item.words[0].is_constant:
                acls.resolve(item.words[0].constant_value, item.line)


def _stage_acl(config, stage: str, acls: CompiledAcls) -> Acl | Expansion | None:
    option = f"acl_smtp_{stage}"
    text = config.options[option]
    line = config.option_lines.get(option)
    if not text:
        return None
    try:
        expansion = compile_expansion(text, named=acls.context.named, lookups=acls.context.lookups)
    except ExpansionError as exc:
        raise _error(line, f"{option}: {exc}") from None
    if not expansion.is_constant:
        return expansion
    acl = acls.resolve(text, line)
    _check_stage(acl, stage)
    return acl


def _check_stage(acl: Acl, stage: str) -> None:
    """What Exim would refuse at run time in this stage's own ACL."""
    for statement in acl.statements:
        for item in statement.items:
            if stage in item.forbidden:
                raise item.line.error(f"cannot test {item.name} condition in {WHERE_NAMES[stage]} ACL "
                                      f'("{acl.name}" is acl_smtp_{stage})')
            if isinstance(item, Ratelimit) and item.text.is_constant:
                try:
                    check_constant_ratelimit(item.text.constant_value, (stage,))
                except ItemError as exc:
                    raise item.line.error(str(exc)) from None


# --------------------------------------------------------------------------
# Running


@dataclass
class AclServices:
    """What every connection of a worker shares."""

    ratetable: Any                      # shared.ratetable.RateTable (or mta.ratelimit.DictRateStore)
    logs: Any                           # mta.log.Logs
    lookups: LookupCache
    sleep: Callable[[float], Any] = gevent.sleep
    observer: Callable[[str, Verdict, "Decision"], None] | None = None
    """Told of every stage's verdict and what decided it (counters, host-check)."""


@dataclass(frozen=True)
class Decision:
    """What decided a stage: the ACL's name and its deciding statement
    (None when the ACL ran off its end, or no ACL is set for the stage)."""

    acl: str
    statement: Statement | None


class ConnectionState:
    """What persists from one ACL check to the next within a connection."""

    def __init__(self, session, lookups: LookupCache) -> None:
        self.variables = SessionVariables(session, lookups)
        self.rates = ConnectionCache()
        self.warnings_logged: set[str] = set()


class AclRun:
    """One top-level ACL check (and the ACLs it calls): Exim's
    acl_check_internal state, with the user and log messages it builds."""

    def __init__(self, acls: CompiledAcls, services: AclServices, connection: ConnectionState,
                 session, stage: str) -> None:
        self.acls = acls
        self.services = services
        self.connection = connection
        self.variables = connection.variables
        self.session = session
        self.stage = stage
        self.level = 0
        self.verb = ""
        self.user_msg: str | None = None
        self.log_msg: str | None = None
        self.log_is_user_msg = False
        self.temp_details = False
        self.decision = Decision("", None)

    def run_stage(self, top: Acl | Expansion) -> str:
        if isinstance(top, Expansion):
            try:
                name = top.expand(self.variables)
            except ExpansionForcedFail:
                return OK
            except ExpansionError as exc:
                self.log_msg = f'failed to expand ACL string "{top.text}": {exc}'
                return ERROR
            return self.call_named(name)
        return self.run(top)

    def call_named(self, name: str) -> str:
        try:
            acl = self.acls.resolve(name)
        except ConfigError as exc:
            self.log_msg = exc.message
            return ERROR
        return self.run(acl)

    def call_acl(self, name: str, args: list[str]) -> str:
        """The `acl` condition: run NAME with $acl_arg1.. set, one level down."""
        if self.level >= MAX_NESTING:
            self.log_msg = "ACL nested too deep: possible loop"
            return ERROR
        extra = self.variables.extra
        saved = {key: extra.pop(key) for key in _ARG_NAMES if key in extra}
        extra["acl_narg"] = str(len(args))
        for index, value in enumerate(args, start=1):
            extra[f"acl_arg{index}"] = value
        verb = self.verb
        self.level += 1
        try:
            return self.call_named(name)
        finally:
            self.level -= 1
            self.verb = verb
            for key in _ARG_NAMES:
                extra.pop(key, None)
            extra.update(saved)

    def run(self, acl: Acl) -> str:
        """Exim's statement loop; returns OK, DISCARD, FAIL, FAIL_DROP, DEFER or ERROR."""
        for statement in acl.statements:
            self.user_msg = self.log_msg = None
            self.log_is_user_msg = False
            self.temp_details = False
            self.verb = statement.verb
            result = self._statement(statement)
            if result == ERROR or (result == DEFER and statement.verb != "warn"):
                self.decision = Decision(acl.name, statement)
                return result
            decided = _VERB_OUTCOMES[statement.verb](self, result)
            if decided is not None:
                self.decision = Decision(acl.name, statement)
                return decided
        self.decision = Decision(acl.name, None)
        return FAIL

    def _statement(self, statement: Statement) -> str:
        """Exim's acl_check_condition: evaluate items in order until one is false."""
        user_message = log_message = None
        result = OK
        for item in statement.items:
            if item.name == "message":
                user_message = item
                continue
            if item.name == "log_message":
                log_message = item
                continue
            if self.stage in item.forbidden:
                self.log_msg = f"cannot {'use' if item.name in MODIFIERS else 'test'} {item.name} condition in " \
                               f"{WHERE_NAMES[self.stage]} ACL"
                return ERROR
            try:
                result = item.evaluate(self)
            except AclProblem as problem:
                self.log_msg = problem.message or None
                return problem.rc
            if result == SKIP:
                result = OK
                continue
            if result in (DEFER, ERROR):
                return result
            if item.negated:
                result = FAIL if result == OK else OK if result in (FAIL, FAIL_DROP) else result
            if result != OK:
                break
        if result in _MESSAGE_RESULTS[statement.verb]:
            self._take_messages(statement.verb, result, user_message, log_message)
        return result

    def _take_messages(self, verb: str, result: str, user_message: Item | None,
                       log_message: Item | None) -> None:
        """Exim's rules: `message` replaces the user message, `log_message` is
        prefixed to the log message, which defaults to the user message."""
        if verb == "warn" or (result == OK and verb in ("accept", "discard")):
            self.user_msg = self.log_msg = None
        if user_message is not None:
            text = self._expand_message(user_message)
            if text:
                self.user_msg = text
        if log_message is not None:
            text = self._expand_message(log_message)
            if text:
                self.log_msg = text if self.log_msg is None else f"{text}: {self.log_msg}"
        self.log_is_user_msg = self.log_msg is None
        if self.log_msg is None:
            self.log_msg = self.user_msg

    def _expand_message(self, item) -> str | None:
        try:
            return item.text.expand(self.variables)
        except ExpansionForcedFail:
            return None
        except ExpansionError as exc:
            self.services.logs.panic(f'failed to expand ACL message "{item.text.text}": {exc}')
            return None

    def warn(self, result: str) -> None:
        """A warn statement: log its log_message once per connection."""
        if result == OK and self.log_msg and not self.log_is_user_msg:
            self._log_warning(printable(self.log_msg))
        elif result == DEFER:
            reason = f": {self.log_msg}" if self.log_msg else ""
            self._log_warning(f'ACL "warn" statement skipped: condition test deferred{reason}')
        self.user_msg = self.log_msg = None

    def _log_warning(self, text: str) -> None:
        line = f"{host_and_ident(self.session, self.services.logs)} Warning: {text}"
        if line not in self.connection.warnings_logged:
            self.connection.warnings_logged.add(line)
            self.services.logs.main(line)


_ARG_NAMES = ("acl_narg", *(f"acl_arg{index}" for index in range(1, 10)))


def _accept(run: AclRun, result: str) -> str | None:
    return result if result in (OK, DISCARD) else None


def _defer(run: AclRun, result: str) -> str | None:
    if result != OK:
        return None
    run.temp_details = True
    return DEFER


def _deny(run: AclRun, result: str) -> str | None:
    return FAIL if result == OK else None


def _discard(run: AclRun, result: str) -> str | None:
    return DISCARD if result in (OK, DISCARD) else None


def _drop(run: AclRun, result: str) -> str | None:
    return FAIL_DROP if result == OK else None


def _require(run: AclRun, result: str) -> str | None:
    return result if result != OK else None


def _warn(run: AclRun, result: str) -> str | None:
    run.warn(result)
    return None


_VERB_OUTCOMES: dict[str, Callable[[AclRun, str], str | None]] = {
    "accept": _accept, "defer": _defer, "deny": _deny, "discard": _discard, "drop": _drop,
    "require": _require, "warn": _warn,
}


def host_and_ident(session, logs) -> str:
    """Exim's host_and_ident(TRUE): `H=(helo) [ip]` (`:port` with +incoming_port)."""
    info = session.info
    return "H=" + host_field(info.host_address, info.host_port, session.helo, logs.selected("incoming_port"))


def split_message(text: str) -> str:
    """Exim's string_split_message: a user message longer than 75 characters
    is broken into lines at spaces (preferring just after a colon)."""
    if len(text) <= 75:
        return text
    chars = list(text)
    start = pos = 0
    while True:
        count = 0
        while count < 75 and pos < len(chars) and chars[pos] != "\n":
            pos += 1
            count += 1
        if pos >= len(chars):
            return "".join(chars)
        if chars[pos] == "\n":
            pos += 1
            start = pos
            continue
        split = _split_point(chars, start, pos)
        if split is None:
            return "".join(chars)
        chars[split] = "\n"
        start = pos = split + 1


def _split_point(chars: list[str], start: int, pos: int) -> int | None:
    """A space to break at: behind `pos` (but past 35 characters of the
    line), the last one after a colon if any; else the next one ahead."""
    chosen = None
    for index in range(pos, start + 35, -1):
        if chars[index] == " ":
            if chars[index - 1] == ":":
                return index
            if chosen is None:
                chosen = index
    if chosen is not None:
        return chosen
    for index in range(pos + 1, len(chars)):
        if chars[index] in " \n":
            return index
    return None


# --------------------------------------------------------------------------
# The policy


_NO_ACL = Decision("", None)
_LOGGED_STAGES = {"helo": "EHLO or HELO", "mail": "MAIL", "rcpt": "RCPT", "predata": "DATA"}


class AclPolicy:
    """The policy of one connection: runs the configured ACL of each stage.

    Refusals at HELO, MAIL, RCPT and DATA (predata) are logged here as Exim
    logs them; the server logs those of the connect and data ACLs itself.
    """

    def __init__(self, acls: CompiledAcls, services: AclServices, fallback) -> None:
        self.acls = acls
        self.services = services
        self.fallback = fallback
        self.connection: ConnectionState | None = None

    def check(self, stage: str, session) -> Verdict:
        top = self.acls.stages.get(stage)
        decision = _NO_ACL
        if top is None:
            verdict = self.fallback.check(stage, session)
        else:
            verdict, decision = self._run(stage, top, session)
        if self.services.observer is not None:
            self.services.observer(stage, verdict, decision)
        if not verdict.accepted and stage in _LOGGED_STAGES:
            self._log_refusal(stage, verdict, session)
        return verdict

    def _state(self, session) -> ConnectionState:
        if self.connection is None:
            self.connection = ConnectionState(session, self.services.lookups)
        return self.connection

    def _run(self, stage: str, top: Acl | Expansion, session) -> tuple[Verdict, Decision]:
        connection = self._state(session)
        connection.rates.start_acl()
        if stage in ("helo", "mail"):
            connection.rates.reset_message()
            connection.variables.message_variables_outside_transaction.clear()
        run = AclRun(self.acls, self.services, connection, session, stage)
        result = run.run_stage(top)
        if result == DISCARD and stage not in _DISCARD_STAGES:
            self.services.logs.panic(f'"discard" verb not allowed in {WHERE_NAMES[stage]} ACL')
            result = ERROR
        return self._verdict(result, run, session), run.decision

    def _verdict(self, result: str, run: AclRun, session) -> Verdict:
        if result == OK:
            return ACCEPTED
        log_message = (run.log_msg or "").split("\n", 1)[0]
        if result == DISCARD:
            if session.transaction is not None and run.stage != "rcpt":
                session.transaction.discard = True
            return Verdict("discard", "", log_message)
        if result == ERROR:
            return Verdict("defer", "", log_message)
        shown = run.user_msg if result != DEFER or run.temp_details else None
        return Verdict(_VERDICT_ACTIONS[result], split_message(shown) if shown else "", log_message)

    def _log_refusal(self, stage: str, verdict: Verdict, session) -> None:
        """Exim's smtp_handle_acl_fail log line."""
        logs = self.services.logs
        transaction = session.transaction
        what = _LOGGED_STAGES[stage]
        sender = ""
        if stage == "rcpt":
            what = f"RCPT <{session.current_recipient}>"
            sender = f"F=<{transaction.sender if transaction else ''}> "
        elif stage == "mail":
            what = f"MAIL <{transaction.sender if transaction else ''}>"
        elif stage == "helo":
            what = f"EHLO or HELO {session.helo}"
        reason = verdict.log_message or verdict.message.split("\n", 1)[0]
        temporarily = "temporarily " if verdict.action == "defer" else ""
        logs.reject(f"{host_and_ident(session, logs)} {sender}{temporarily}rejected {what}"
                    + (f": {printable(reason)}" if reason else ""))

"""Exim string expansion: compile once into a node tree, expand many times.

``compile_expansion`` parses the whole string and reports every syntax error,
unknown item, operator, condition or lookup type as ExpansionError, so that
configuration checking finds them. ``Expansion.expand`` then only walks the
tree; a string without ``$`` or ``\\`` is a constant and costs nothing.

Scoping follows Exim: ``$value`` is set by a successful lookup (and by
``inlist``/``match_*`` conditions) while the "yes" string is expanded and
restored afterwards; ``$0``..``$n`` are set by a successful ``match`` for the
rest of the ``if`` item and restored at its end. Branches that are not taken
are parsed but not evaluated, so unknown variables in them are not errors.

Not supported (compile-time errors): message header variables (``$h_...``),
query-style lookups and lookup types other than lsearch/iplsearch, and the
expansion items, conditions and operators not in ITEMS, CONDITIONS and
_operator_function. String lengths count characters, not bytes. After
``match_ip``/``match_domain``/``match_address``/``match_local_part``,
``$value`` is the subject that matched (Exim gives the list item).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from mta.lists import AddressList, DomainList, HostList, ListError, LocalPartList, NamedLists, \
    split_list
from mta.lookups import IPV4_BITS, LOOKUP_TYPES, LookupCache, LookupFailed, interpret_escape, \
    parse_ip

_NAME_CHARS = re.compile(r"[A-Za-z0-9_]*")
_DIGITS = re.compile(r"[0-9]+")
_SYMBOLS = re.compile(r"[=<>]+")
_MAX_DIGITS = 25
_OPERATOR_CHARS = re.compile(r"[A-Za-z0-9_-]*")
_LOOKUP_TYPE_CHARS = re.compile(r"[A-Za-z0-9_*@,=-]*")
_HEADER_PREFIXES = ("h_", "header_", "bh_", "bheader_", "rh_", "rheader_", "lh_", "lheader_")
_MAX_DEPTH = 50
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class ExpansionError(Exception):
    """The expansion failed; the message reads like Exim's."""


class ExpansionForcedFail(ExpansionError):
    """A ``fail`` keyword was reached: Exim's "forced expansion failure"."""


class ExpansionContext(Protocol):
    """What an expansion needs from its caller."""

    lookups: LookupCache

    def variable(self, name: str) -> str | None:
        """The variable's value, or None if there is no such variable."""


class DictContext:
    """An ExpansionContext over a mapping of variable names to values."""

    def __init__(self, variables: Mapping[str, str] | None = None,
                 lookups: LookupCache | None = None) -> None:
        self.variables = dict(variables or {})
        self.lookups = LookupCache() if lookups is None else lookups

    def variable(self, name: str) -> str | None:
        return self.variables.get(name)


class _State:
    """Per-expansion scope: the caller's context, ``$value`` and ``$0..$n``."""

    __slots__ = ("ctx", "value", "groups")

    def __init__(self, ctx: ExpansionContext) -> None:
        self.ctx = ctx
        self.value: str | None = None
        self.groups: tuple[str, ...] = ()


class Expansion:
    """A compiled expansion string."""

    __slots__ = ("text", "_node", "is_constant", "constant_value")

    def __init__(self, text: str, node: "_Node") -> None:
        self.text = text
        self._node = node
        self.is_constant = isinstance(node, _Literal)
        self.constant_value = node.text if isinstance(node, _Literal) else None

    def expand(self, ctx: ExpansionContext) -> str:
        if self.constant_value is not None:
            return self.constant_value
        return self._node.expand(_State(ctx))

    def expand_in_scope(self, state: _State) -> str:
        """Expand inside an expansion already running (``sg`` replacements)."""
        return self._node.expand(state)


def compile_expansion(text: str, *, named: NamedLists | None = None,
                      lookups: LookupCache | None = None) -> Expansion:
    """Parse ``text``; raise ExpansionError for anything Exim would reject.

    ``named`` supplies the named lists for ``match_domain`` & co., ``lookups``
    the cache the lists in those conditions use.
    """
    if "$" not in text and "\\" not in text:
        return Expansion(text, _Literal(text))
    parser = _Parser(text, named or NamedLists(), LookupCache() if lookups is None else lookups)
    return Expansion(text, parser.parse_top())


# --------------------------------------------------------------------------
# Nodes: each has expand(state) -> str


class _Node(Protocol):
    def expand(self, state: _State) -> str: ...


@dataclass(frozen=True)
class _Literal:
    text: str

    def expand(self, state: _State) -> str:
        return self.text


@dataclass(frozen=True)
class _Sequence:
    parts: tuple

    def expand(self, state: _State) -> str:
        return "".join([part.expand(state) for part in self.parts])


@dataclass(frozen=True)
class _Variable:
    name: str

    def expand(self, state: _State) -> str:
        value = state.ctx.variable(self.name)
        if value is None:
            raise ExpansionError(f'unknown variable name "{self.name}"')
        return value


class _Value:
    """``$value``: the innermost lookup/condition value, else the caller's."""

    def expand(self, state: _State) -> str:
        return _current_value(state)


def _current_value(state: _State) -> str:
    if state.value is not None:
        return state.value
    outer = state.ctx.variable("value")
    return "" if outer is None else outer


@dataclass(frozen=True)
class _Numeric:
    """``$0``..``$n``: empty when not set, as in Exim."""

    number: int

    def expand(self, state: _State) -> str:
        groups = state.groups
        return groups[self.number] if self.number < len(groups) else ""


@dataclass(frozen=True)
class _Operator:
    function: Callable[[str], str]
    argument: "_Node"

    def expand(self, state: _State) -> str:
        return self.function(self.argument.expand(state))


@dataclass(frozen=True)
class _Choice:
    """The yes/no/fail tail shared by ``if`` and ``lookup``."""

    yes: "_Node | None"
    no: "_Node | None"
    fail: bool

    def taken(self, state: _State, success: bool, default_yes: str) -> str:
        if success:
            return default_yes if self.yes is None else self.yes.expand(state)
        if self.fail:
            raise ExpansionForcedFail("forced failure")
        return "" if self.no is None else self.no.expand(state)


@dataclass(frozen=True)
class _If:
    condition: "_Condition"
    choice: _Choice

    def expand(self, state: _State) -> str:
        saved = state.value, state.groups
        try:
            success = self.condition.evaluate(state)
            return self.choice.taken(state, success, "true")
        finally:
            state.value, state.groups = saved


@dataclass(frozen=True)
class _Lookup:
    kind: str
    key: "_Node"
    path: "_Node"
    choice: _Choice

    def expand(self, state: _State) -> str:
        key = self.key.expand(state)
        path = self.path.expand(state)
        try:
            found = state.ctx.lookups.lookup(self.kind, key, path)
        except LookupFailed as exc:
            raise ExpansionError(f'lookup of "{key}" gave DEFER: {exc}') from None
        if found is None:
            return self.choice.taken(state, False, "")
        saved = state.value
        state.value = found
        try:
            return self.choice.taken(state, True, found)
        finally:
            state.value = saved


@dataclass(frozen=True)
class _Sg:
    """``${sg{subject}{regex}{replacement}}``; the replacement is expanded
    again for each match with ``$0``..``$n`` set to the match's groups."""

    subject: "_Node"
    regex: "_Node"
    replacement: "_Node"
    compiled: "re.Pattern[str] | None"

    def expand(self, state: _State) -> str:
        subject = self.subject.expand(state)
        regex = self.compiled or _compile_regex(self.regex.expand(state))
        template = compile_expansion(self.replacement.expand(state))
        saved = state.groups

        def replace(match: re.Match) -> str:
            state.groups = _groups_of(match)
            return template.expand_in_scope(state)

        try:
            return regex.sub(replace, subject)
        finally:
            state.groups = saved


@dataclass(frozen=True)
class _Substr:
    """``${substr{start}{length}{subject}}`` and ``${length{n}{subject}}``."""

    start: "_Node | None"
    length: "_Node | None"
    subject: "_Node"

    def expand(self, state: _State) -> str:
        start = 0 if self.start is None else _integer(self.start.expand(state))
        length = None if self.length is None else _integer(self.length.expand(state))
        if self.start is None and length is not None and length < 0:
            raise ExpansionError(f'"{length}" is not a positive number (in "length" expansion)')
        return _substring(self.subject.expand(state), start, length)


@dataclass(frozen=True)
class _Tr:
    subject: "_Node"
    characters: "_Node"
    replacements: "_Node"

    def expand(self, state: _State) -> str:
        return _translate(self.subject.expand(state), self.characters.expand(state),
                          self.replacements.expand(state))


# --------------------------------------------------------------------------
# Conditions: each has evaluate(state) -> bool


class _Condition(Protocol):
    def evaluate(self, state: _State) -> bool: ...


@dataclass(frozen=True)
class _Not:
    inner: "_Condition"

    def evaluate(self, state: _State) -> bool:
        return not self.inner.evaluate(state)


@dataclass(frozen=True)
class _Compare:
    """Two expanded strings compared by a pure function."""

    test: Callable[[str, str], bool]
    left: "_Node"
    right: "_Node"

    def evaluate(self, state: _State) -> bool:
        return self.test(self.left.expand(state), self.right.expand(state))


@dataclass(frozen=True)
class _Test:
    """One expanded string tested by a pure function."""

    test: Callable[[str], bool]
    argument: "_Node"

    def evaluate(self, state: _State) -> bool:
        return self.test(self.argument.expand(state))


@dataclass(frozen=True)
class _Defined:
    name: str

    def evaluate(self, state: _State) -> bool:
        if self.name == "value":
            return _current_value(state) != ""
        value = state.ctx.variable(self.name)
        if value is None:
            raise ExpansionError(f'unknown variable name "{self.name}"')
        return value != ""


@dataclass(frozen=True)
class _Match:
    subject: "_Node"
    regex: "_Node"
    compiled: "re.Pattern[str] | None"

    def evaluate(self, state: _State) -> bool:
        regex = self.compiled or _compile_regex(self.regex.expand(state))
        found = regex.search(self.subject.expand(state))
        if found is None:
            return False
        state.groups = _groups_of(found)
        return True


@dataclass(frozen=True)
class _Combine:
    """``and{{c1}{c2}...}`` / ``or{...}``: left to right, short-circuit."""

    want_all: bool
    conditions: tuple

    def evaluate(self, state: _State) -> bool:
        for condition in self.conditions:
            if condition.evaluate(state) != self.want_all:
                return not self.want_all
        return self.want_all


@dataclass(frozen=True)
class _InList:
    subject: "_Node"
    items: "_Node"
    caseless: bool

    def evaluate(self, state: _State) -> bool:
        subject = self.subject.expand(state)
        wanted = subject.lower() if self.caseless else subject
        for item in split_list(self.items.expand(state)):
            if (item.lower() if self.caseless else item) == wanted:
                state.value = item
                return True
        return False


@dataclass(frozen=True)
class _ListMatch:
    """``match_ip`` / ``match_domain`` / ``match_address`` / ``match_local_part``.

    The list is not expanded (as in Exim) and so is compiled once.
    """

    subject: "_Node"
    matcher: Callable[[str], bool]

    def evaluate(self, state: _State) -> bool:
        subject = self.subject.expand(state)
        try:
            found = self.matcher(subject)
        except ValueError as exc:
            raise ExpansionError(str(exc)) from None
        except LookupFailed as exc:
            raise ExpansionError(f"lookup gave DEFER: {exc}") from None
        if found:
            state.value = subject
        return found


# --------------------------------------------------------------------------
# The parser


class _Parser:
    def __init__(self, text: str, named: NamedLists, lookups: LookupCache) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0
        self.named = named
        self.lookups = lookups

    # ---- helpers

    def enter(self) -> None:
        """Count nesting so that hostile input cannot exhaust the stack."""
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ExpansionError("expansion nested too deeply")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def read(self, pattern: re.Pattern[str]) -> str:
        found = pattern.match(self.text, self.pos)
        self.pos = found.end()
        return found.group()

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            got = self.peek() or "end of string"
            raise ExpansionError(f'missing "{char}" {what} (found "{got}")')
        self.pos += 1

    # ---- strings

    def parse_top(self) -> "_Node":
        return self.parse_string(brace_ends=False)

    def parse_string(self, brace_ends: bool, honour_dollar: bool = True) -> "_Node":
        """Literal text, escapes and ``$`` items up to ``}`` or the end."""
        self.enter()
        parts: list = []
        chunk: list[str] = []
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char == "}" and brace_ends:
                break
            if char == "\\":
                self.read_escape(chunk)
            elif char == "$" and honour_dollar:
                if chunk:
                    parts.append(_Literal("".join(chunk)))
                    chunk = []
                parts.append(self.parse_dollar())
            else:
                chunk.append(char)
                self.pos += 1
        if brace_ends and self.pos >= len(text):
            raise ExpansionError("missing } at end of string")
        if chunk:
            parts.append(_Literal("".join(chunk)))
        self.depth -= 1
        return _simplify(parts)

    def read_escape(self, chunk: list[str]) -> None:
        """``\\N...\\N`` is copied verbatim; other escapes are decoded."""
        if self.text.startswith("\\N", self.pos):
            end = self.text.find("\\N", self.pos + 2)
            end = len(self.text) if end < 0 else end
            chunk.append(self.text[self.pos + 2:end])
            self.pos = min(end + 2, len(self.text))
            return
        char, self.pos = interpret_escape(self.text, self.pos)
        chunk.append(char)

    def parse_dollar(self) -> "_Node":
        self.pos += 1
        char = self.peek()
        if char.isascii() and char.isalpha():
            return self.variable(self.read(_NAME_CHARS))
        if char.isascii() and char.isdigit():
            return _Numeric(_parse_int(self.read(_DIGITS)))
        if char != "{":
            raise ExpansionError("'$' not followed by letter, digit, or {")
        self.pos += 1
        return self.parse_braced()

    def variable(self, name: str) -> "_Node":
        if name.lower().startswith(_HEADER_PREFIXES):
            raise ExpansionError(f'header expansions are not supported: "${name}"')
        if name == "value":
            return _Value()
        return _Variable(name)

    def parse_braced(self) -> "_Node":
        """After ``${``: a variable, an item, or an operator."""
        name = self.read(_NAME_CHARS)
        if not name:
            raise ExpansionError('missing variable name or expansion item after "${"')
        if self.peek() == "}":
            self.pos += 1
            return _Numeric(_parse_int(name)) if name.isdigit() else self.variable(name)
        item = ITEMS.get(name)
        if item is not None and (self.peek() == "{" or self.peek().isspace()):
            return item(self)
        name += self.read(_OPERATOR_CHARS)
        if self.peek() == ":":
            self.pos += 1
            return self.parse_operator(name)
        if self.peek() == "{" or self.peek().isspace():
            raise ExpansionError(f'unknown expansion item "{name}"')
        raise ExpansionError(f'unknown variable in "${{{name}"' if self.peek() else
                         "missing } at end of string")

    def parse_operator(self, name: str) -> "_Node":
        function = _operator_function(name)
        argument = self.parse_string(brace_ends=True)
        self.pos += 1
        if isinstance(argument, _Literal):
            folded = _fold(function, argument.text)
            if folded is not None:
                return folded
        return _Operator(function, argument)

    def braced_args(self, most: int, honour_dollar: bool = True) -> list:
        """Up to ``most`` ``{...}`` arguments, white space allowed between."""
        args: list = []
        while len(args) < most:
            self.skip_space()
            if self.peek() != "{":
                break
            self.pos += 1
            args.append(self.parse_string(brace_ends=True, honour_dollar=honour_dollar))
            self.pos += 1
        return args

    def required_args(self, count: int, what: str, honour_dollar: bool = True) -> list:
        args = self.braced_args(count, honour_dollar)
        if len(args) < count:
            raise ExpansionError(f'missing or misplaced {{ or }} in "{what}" '
                                 f"(wanted {count} arguments)")
        return args

    def close_item(self, what: str) -> None:
        self.skip_space()
        if self.peek() != "}":
            raise ExpansionError(f'missing }} at end of "{what}"')
        self.pos += 1

    def parse_choice(self, what: str) -> _Choice:
        """``{yes}{no}``, ``{yes} fail``, ``{yes}`` or nothing, then ``}``."""
        args = self.braced_args(2)
        self.skip_space()
        fail = False
        if len(args) == 1 and self.text.startswith("fail", self.pos):
            after = self.text[self.pos + 4:self.pos + 5]
            if after == "}" or after.isspace():
                fail = True
                self.pos += 4
        self.close_item(what)
        return _Choice(args[0] if args else None, args[1] if len(args) > 1 else None, fail)

    # ---- items

    def item_if(self) -> "_Node":
        condition = self.parse_condition()
        return _If(condition, self.parse_choice("if"))

    def item_lookup(self) -> "_Node":
        self.skip_space()
        if self.peek() != "{":
            kind = self.read(_LOOKUP_TYPE_CHARS)
            raise ExpansionError(f'query-style lookup "{kind}" is not supported '
                                 f"(single-key lookups need {{key}} first)")
        key = self.required_args(1, "lookup")[0]
        self.skip_space()
        kind = self.read(_LOOKUP_TYPE_CHARS)
        if kind not in LOOKUP_TYPES:
            raise ExpansionError(f'unknown lookup type "{kind}"' if kind else
                                 'missing lookup type in "lookup"')
        path = self.required_args(1, "lookup")[0]
        return _Lookup(kind, key, path, self.parse_choice("lookup"))

    def item_sg(self) -> "_Node":
        subject, regex, replacement = self.required_args(3, "sg")
        self.close_item("sg")
        return _Sg(subject, regex, replacement, _constant_regex(regex))

    def item_substr(self) -> "_Node":
        args = self.braced_args(3)
        if len(args) < 2:
            raise ExpansionError('missing or misplaced { or } in "substr"')
        self.close_item("substr")
        if len(args) == 2:
            return _Substr(args[0], None, args[1])
        return _Substr(args[0], args[1], args[2])

    def item_length(self) -> "_Node":
        length, subject = self.required_args(2, "length")
        self.close_item("length")
        return _Substr(None, length, subject)

    def item_tr(self) -> "_Node":
        subject, characters, replacements = self.required_args(3, "tr")
        self.close_item("tr")
        return _Tr(subject, characters, replacements)

    # ---- conditions

    def parse_condition(self) -> "_Condition":
        self.enter()
        self.skip_space()
        negated = False
        while self.peek() == "!":
            negated = not negated
            self.pos += 1
            self.skip_space()
        if self.peek() in ("=", "<", ">"):
            name = self.read(_SYMBOLS)
        else:
            name = self.read(_NAME_CHARS)
        if not name:
            got = self.peek() or "end of string"
            raise ExpansionError(f'condition name expected, but found "{got}"')
        parse = CONDITIONS.get(name)
        if parse is None:
            raise ExpansionError(f'unknown condition "{name}"')
        condition = parse(self, name)
        self.depth -= 1
        return _Not(condition) if negated else condition

    def cond_numeric(self, name: str) -> "_Condition":
        left, right = self.required_args(2, name)
        compare = _NUMERIC_COMPARISONS[name]
        return _Compare(lambda a, b: compare(_number(a), _number(b)), left, right)

    def cond_string(self, name: str) -> "_Condition":
        left, right = self.required_args(2, name)
        return _Compare(_STRING_COMPARISONS[name], left, right)

    def cond_match(self, name: str) -> "_Condition":
        subject, regex = self.required_args(2, name)
        return _Match(subject, regex, _constant_regex(regex))

    def cond_test(self, name: str) -> "_Condition":
        return _Test(_TESTS[name], self.required_args(1, name)[0])

    def cond_def(self, name: str) -> "_Condition":
        self.expect(":", 'after "def"')
        variable = self.read(_NAME_CHARS)
        if not variable:
            raise ExpansionError('variable name omitted after "def:"')
        if variable.lower().startswith(_HEADER_PREFIXES):
            raise ExpansionError(f'header expansions are not supported: "def:{variable}"')
        return _Defined(variable)

    def cond_combine(self, name: str) -> "_Condition":
        self.skip_space()
        self.expect("{", f'after "{name}"')
        conditions = []
        while True:
            self.skip_space()
            if self.peek() == "}":
                self.pos += 1
                break
            self.expect("{", f'in "{name}"')
            conditions.append(self.parse_condition())
            self.skip_space()
            self.expect("}", f'after sub-condition of "{name}"')
        return _Combine(name == "and", tuple(conditions))

    def cond_inlist(self, name: str) -> "_Condition":
        subject, items = self.required_args(2, name)
        return _InList(subject, items, caseless=name == "inlisti")

    def cond_list_match(self, name: str) -> "_Condition":
        subject = self.required_args(1, name)[0]
        list_text = self.required_args(1, name, honour_dollar=False)[0]
        try:
            matcher = self.list_matcher(name, list_text.text)
        except ListError as exc:
            raise ExpansionError(f"{name}: {exc}") from None
        return _ListMatch(subject, matcher)

    def list_matcher(self, name: str, text: str) -> Callable[[str], bool]:
        if name == "match_ip":
            return HostList(text, self.named, ip_only=True, lookups=self.lookups).match
        kinds = {"match_domain": DomainList, "match_address": AddressList,
                 "match_local_part": LocalPartList}
        return kinds[name](text, self.named, lookups=self.lookups).match


ITEMS: dict[str, Callable[[_Parser], "_Node"]] = {
    "if": _Parser.item_if,
    "lookup": _Parser.item_lookup,
    "sg": _Parser.item_sg,
    "substr": _Parser.item_substr,
    "length": _Parser.item_length,
    "tr": _Parser.item_tr,
}

_NUMERIC_COMPARISONS: dict[str, Callable[[int, int], bool]] = {
    "=": lambda a, b: a == b,
    "==": lambda a, b: a == b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}

_STRING_COMPARISONS: dict[str, Callable[[str, str], bool]] = {
    "eq": lambda a, b: a == b,
    "eqi": lambda a, b: a.lower() == b.lower(),
    "lt": lambda a, b: a < b,
    "lti": lambda a, b: a.lower() < b.lower(),
    "le": lambda a, b: a <= b,
    "lei": lambda a, b: a.lower() <= b.lower(),
    "gt": lambda a, b: a > b,
    "gti": lambda a, b: a.lower() > b.lower(),
    "ge": lambda a, b: a >= b,
    "gei": lambda a, b: a.lower() >= b.lower(),
}


def _ip_version(text: str) -> int:
    """4 or 6 for an IP address as written (a v4-mapped address is 6), else 0."""
    if parse_ip(text) is None or "%" in text:
        return 0
    return 6 if ":" in text else 4


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _strict_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "yes"):
        return True
    if word in ("false", "no", ""):
        return False
    if re.fullmatch(r"-?[0-9]+", word):
        return word.lstrip("-").strip("0") != ""
    raise ExpansionError(f'unrecognised boolean value "{text}"')


def _lax_bool(text: str) -> bool:
    return text.strip().lower() not in ("", "false", "no", "0")


_TESTS: dict[str, Callable[[str], bool]] = {
    "isip": lambda text: _ip_version(text) != 0,
    "isip4": lambda text: _ip_version(text) == 4,
    "isip6": lambda text: _ip_version(text) == 6,
    "exists": _exists,
    "bool": _strict_bool,
    "bool_lax": _lax_bool,
}

CONDITIONS: dict[str, Callable[[_Parser, str], "_Condition"]] = {
    **{name: _Parser.cond_numeric for name in _NUMERIC_COMPARISONS},
    **{name: _Parser.cond_string for name in _STRING_COMPARISONS},
    **{name: _Parser.cond_test for name in _TESTS},
    "match": _Parser.cond_match,
    "def": _Parser.cond_def,
    "and": _Parser.cond_combine,
    "or": _Parser.cond_combine,
    "inlist": _Parser.cond_inlist,
    "inlisti": _Parser.cond_inlist,
    "match_ip": _Parser.cond_list_match,
    "match_domain": _Parser.cond_list_match,
    "match_address": _Parser.cond_list_match,
    "match_local_part": _Parser.cond_list_match,
}


def _fold(function: Callable[[str], str], text: str) -> "_Literal | None":
    """Apply an operator to a constant now; None if it fails, because that
    is an error only if the expansion ever reaches it (it may be in a branch
    that is never taken)."""
    try:
        return _Literal(function(text))
    except ExpansionError:
        return None


def _simplify(parts: list) -> "_Node":
    if not parts:
        return _Literal("")
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(part, _Literal) for part in parts):
        return _Literal("".join(part.text for part in parts))
    return _Sequence(tuple(parts))


# --------------------------------------------------------------------------
# Regular expressions and numbers


def _compile_regex(pattern: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ExpansionError(f'regular expression error in "{pattern}": {exc}') from None


def _constant_regex(node: "_Node") -> "re.Pattern[str] | None":
    """Compile a regex argument now if it cannot change, to report errors early."""
    return _compile_regex(node.text) if isinstance(node, _Literal) else None


def _groups_of(match: re.Match) -> tuple[str, ...]:
    return (match.group(0),) + tuple(group or "" for group in match.groups())


_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _number(text: str) -> int:
    """Exim's numeric condition operands: signed decimal with K/M/G; "" is 0."""
    if text == "":
        return 0
    found = re.fullmatch(r"\s*([-+]?[0-9]+)([kKmMgG]?)\s*", text)
    if found is None:
        raise ExpansionError(f'"{text}" is not a number')
    return _checked(_parse_int(found[1]) * _SUFFIXES.get(found[2].lower(), 1))


def _integer(text: str) -> int:
    """A plain (possibly negative) integer argument, as for substr/length."""
    if not re.fullmatch(r"\s*-?[0-9]+\s*", text):
        raise ExpansionError(f'"{text}" is not a number')
    return _parse_int(text.strip())


def _parse_int(digits: str, base: int = 10) -> int:
    """int() for ASCII digits, refusing absurd lengths before converting."""
    if len(digits) > _MAX_DIGITS:
        raise ExpansionError("absolute value of numerical expression is too large (overflow)")
    return int(digits, base)


def _checked(value: int) -> int:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ExpansionError("absolute value of numerical expression is too large (overflow)")
    return value


# --------------------------------------------------------------------------
# Operators (pure str -> str functions)


def _substring(subject: str, start: int, length: int | None) -> str:
    """Exim's extract_substr: negative starts count from the right."""
    size = len(subject)
    wanted = -1 if length is None else length
    if start < 0:
        start += size
        if start < 0:
            wanted = max(wanted + start, 0)
            start = 0
        elif wanted < 0:
            start, wanted = 0, start
    elif start > size:
        start, wanted = size, 0
    elif wanted < 0:
        wanted = size
    wanted = min(wanted, size - start)
    return subject[start:start + wanted]


def _translate(subject: str, characters: str, replacements: str) -> str:
    if not replacements or not characters:
        return subject
    table = {}
    for index, char in enumerate(characters):
        table[ord(char)] = replacements[min(index, len(replacements) - 1)]
    return subject.translate(table)


def _quote(text: str) -> str:
    if text and re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        return text
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"')
               .replace("\n", "\\n").replace("\r", "\\r"))
    return f'"{escaped}"'


def _mask(text: str, normalised: bool = False) -> str:
    address, slash, bits_text = text.partition("/")
    ip = parse_ip(address)
    if ip is None or not slash or not re.fullmatch(r"[0-9]{1,3}", bits_text):
        raise ExpansionError(f'"{text}" is not an IP address with a mask')
    bits, value = ip
    if ":" in address:
        bits, value = 128, int.from_bytes(_packed_ipv6(address), "big")
    mask = int(bits_text)
    if mask > bits:
        raise ExpansionError(f'mask value too big in "{text}"')
    value = value >> (bits - mask) << (bits - mask)
    if bits == IPV4_BITS:
        return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0)) + f"/{mask}"
    if normalised:
        return f"{ipaddress.IPv6Address(value).compressed}/{mask}"
    groups = [(value >> shift) & 0xFFFF for shift in range(112, -1, -16)]
    return ".".join(f"{group:04x}" for group in groups) + f"/{mask}"


def _packed_ipv6(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])


def _parse_address(text: str) -> tuple[str, str] | None:
    """The (local part, domain) of an RFC 2822 address, or None.

    Handles ``phrase <addr>``, comments in parentheses, quoted local parts
    and source routes; an address without ``@`` has an empty domain.
    """
    text = _strip_comments(text).strip()
    if text.endswith(">") and "<" in text:
        text = text[text.rindex("<") + 1:-1].strip()
        if text.startswith("@") and ":" in text:
            text = text[text.index(":") + 1:]
    if not text:
        return None
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, ""
    if not _valid_local_part(local) or (at and not re.fullmatch(r"[^\s@<>()\",;:\\]+", domain)):
        return None
    return local, domain


def _strip_comments(text: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = False
    for char in text:
        if char == '"' and depth == 0:
            quoted = not quoted
        if not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(char)
    return "".join(out)


def _valid_local_part(local: str) -> bool:
    """A quoted string, or printable text without specials or white space."""
    if re.fullmatch(r'"(?:[^"\\]|\\.)*"', local):
        return True
    return re.fullmatch(r'[^\s"()<>@,;:\\\[\]]+', local) is not None and local.isprintable()


def _address_part(index: int) -> Callable[[str], str]:
    def extract(text: str) -> str:
        parsed = _parse_address(text)
        return "" if parsed is None else parsed[index]
    return extract


def _address(text: str) -> str:
    parsed = _parse_address(text)
    if parsed is None:
        return ""
    local, domain = parsed
    return f"{local}@{domain}" if domain else local


def _base64_decode(text: str) -> str:
    try:
        return base64.b64decode(text.encode("utf-8", "surrogateescape"), validate=False) \
            .decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        raise ExpansionError(f'"{text}" is not a well-formed base64 string') from None


def _digest(name: str) -> Callable[[str], str]:
    upper = name != "md5"

    def digest(text: str) -> str:
        value = hashlib.new(name, text.encode("utf-8", "surrogateescape")).hexdigest()
        return value.upper() if upper else value
    return digest


def _reverse_ip(text: str) -> str:
    ip = parse_ip(text)
    if ip is None:
        raise ExpansionError(f'"{text}" is not an IP address')
    if ":" not in text:
        return ".".join(reversed(text.split(".")))
    nibbles = _packed_ipv6(text).hex()
    return ".".join(reversed(nibbles))


def _rxquote(text: str) -> str:
    return "".join(char if char.isascii() and char.isalnum() else "\\" + char for char in text)


_SIMPLE_OPERATORS: dict[str, Callable[[str], str]] = {
    "lc": str.lower,
    "uc": str.upper,
    "quote": _quote,
    "mask": _mask,
    "mask_n": lambda text: _mask(text, normalised=True),
    "domain": _address_part(1),
    "local_part": _address_part(0),
    "address": _address,
    "strlen": lambda text: str(len(text)),
    "md5": _digest("md5"),
    "sha1": _digest("sha1"),
    "sha256": _digest("sha256"),
    "base64": lambda text: base64.b64encode(text.encode("utf-8", "surrogateescape")).decode(),
    "base64d": _base64_decode,
    "rxquote": _rxquote,
    "listcount": lambda text: str(len(split_list(text))),
    "reverse_ip": _reverse_ip,
}


def _operator_function(name: str) -> Callable[[str], str]:
    """The function for an operator name, including ``length_N``/``substr_N_M``."""
    simple = _SIMPLE_OPERATORS.get(name)
    if simple is not None:
        return simple
    if name in ("eval", "eval10"):
        decimal_only = name == "eval10"
        return lambda text: str(_evaluate(text, decimal_only))
    head, _, params = name.partition("_")
    numbers = params.split("_") if params else []
    if not all(re.fullmatch(r"-?[0-9]{1,18}", number) for number in numbers):
        raise ExpansionError(f'unknown expansion operator "{name}"')
    values = [int(number) for number in numbers]
    if head in ("length", "l") and len(values) == 1 and values[0] >= 0:
        return lambda text: text[:values[0]]
    if head in ("substr", "s") and len(values) in (1, 2):
        length = values[1] if len(values) == 2 else None
        return lambda text: _substring(text, values[0], length)
    raise ExpansionError(f'unknown expansion operator "{name}"')


# --------------------------------------------------------------------------
# ${eval:...}: C-like integer expressions


_C_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_EVAL_LEVELS = (("|",), ("^",), ("&",), ("<<", ">>"), ("+", "-"), ("*", "/", "%"))


def _evaluate(text: str, decimal_only: bool) -> int:
    evaluator = _Evaluator(text, decimal_only)
    value = evaluator.binary(0)
    evaluator.skip_space()
    if evaluator.pos < len(text):
        raise evaluator.error("extra characters")
    return value


class _Evaluator:
    """Recursive descent over Exim's operator priorities (C's)."""

    def __init__(self, text: str, decimal_only: bool) -> None:
        self.text = text
        self.pos = 0
        self.decimal_only = decimal_only
        self.depth = 0

    def error(self, message: str) -> ExpansionError:
        return ExpansionError(f'error in expression evaluation: {message} '
                              f'(after processing "{self.text[:self.pos]}")')

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def operator_at(self, level: int) -> str | None:
        self.skip_space()
        for operator in _EVAL_LEVELS[level]:
            if self.text.startswith(operator, self.pos):
                return operator
        return None

    def binary(self, level: int) -> int:
        if level == len(_EVAL_LEVELS):
            return self.unary()
        value = self.binary(level + 1)
        while (operator := self.operator_at(level)) is not None:
            self.pos += len(operator)
            value = self.apply(operator, value, self.binary(level + 1))
        return value

    def apply(self, operator: str, left: int, right: int) -> int:
        if operator in ("/", "%"):
            if right == 0:
                raise self.error("divide by zero")
            quotient = abs(left) // abs(right) * (1 if (left < 0) == (right < 0) else -1)
            return _checked(quotient if operator == "/" else left - quotient * right)
        if operator in ("<<", ">>"):
            if not 0 <= right < 64:
                raise self.error("shift count out of range")
            return _wrap(left << right) if operator == "<<" else left >> right
        results = {"|": left | right, "^": left ^ right, "&": left & right,
                   "+": left + right, "-": left - right, "*": left * right}
        return _checked(results[operator])

    def unary(self) -> int:
        self.skip_space()
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error("expression nested too deeply")
        try:
            char = self.text[self.pos:self.pos + 1]
            if char in ("-", "+", "~"):
                self.pos += 1
                value = self.unary()
                return _checked(-value if char == "-" else ~value if char == "~" else value)
            if char == "(":
                self.pos += 1
                value = self.binary(0)
                self.skip_space()
                if self.text[self.pos:self.pos + 1] != ")":
                    raise self.error("expecting ')'")
                self.pos += 1
                return value
            return self.number()
        finally:
            self.depth -= 1

    def number(self) -> int:
        found = (_DIGITS if self.decimal_only else _C_NUMBER).match(self.text, self.pos)
        if found is None:
            raise self.error("expecting number or opening parenthesis")
        self.pos = found.end()
        digits = found.group()
        if self.decimal_only:
            value = _parse_int(digits)
        elif digits[:2].lower() == "0x":
            value = _parse_int(digits[2:], 16)
        else:
            value = _parse_int(digits, 8 if digits.startswith("0") else 10)
        suffix = self.text[self.pos:self.pos + 1].lower()
        if suffix in _SUFFIXES:
            self.pos += 1
            value *= _SUFFIXES[suffix]
        return _checked(value)


def _wrap(value: int) -> int:
    """Two's complement 64-bit wrap, as C's left shift of a signed value."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value

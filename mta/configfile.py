"""Reading an Exim-style configuration file into logical lines.

This layer knows the file syntax only: comments, line continuation, macros,
`.include`, and `begin SECTION`.  What the lines mean is `mta.config`'s job.

Exim's rules, which this follows:
- `#` starts a comment only as the first non-blank character of a line.
- A trailing backslash joins the next line, whose leading blanks are dropped.
- A line `NAME = value` in the main section, NAME starting with an upper-case
  letter, defines a macro; later lines have it replaced where a word starts
  with its name.
- `.include FILE` and `.include_if_exists FILE` insert another file (a
  relative name is taken from the including file's folder).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

MACRO_DEFINITION = re.compile(r"^([A-Z][A-Za-z0-9_]*)\s*(==|=)\s*(.*)$")
SECTION_NAMES = ("acl", "routers", "transports", "retry", "rewrite", "authenticators")
MAX_INCLUDE_DEPTH = 20


class ConfigError(Exception):
    """A configuration problem, located at FILE:LINE when known."""

    def __init__(self, message: str, filename: str = "", line: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.line = line

    def __str__(self) -> str:
        if self.filename:
            return f"{self.filename}:{self.line}: {self.message}"
        return self.message


@dataclass(frozen=True)
class Line:
    """One logical line after continuation and macro replacement."""

    text: str
    filename: str
    number: int

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.filename, self.number)


@dataclass
class RawConfig:
    """The configuration split into its main part and its `begin` sections."""

    main: list[Line] = field(default_factory=list)
    sections: dict[str, list[Line]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    macros: dict[str, str] = field(default_factory=dict)


def read_config(path: str, predefined_macros: dict[str, str] | None = None) -> RawConfig:
    """Read PATH and everything it includes; raise ConfigError on a bad line."""
    raw = RawConfig(macros=dict(predefined_macros or {}))
    current: list[Line] = raw.main
    for line in _logical_lines(os.path.abspath(path), raw, 0):
        begin = re.fullmatch(r"begin\s+(\S+)", line.text)
        if begin:
            name = begin.group(1)
            if name not in SECTION_NAMES:
                raise line.error(f'unknown section "begin {name}"')
            if name in raw.sections:
                raise line.error(f'section "{name}" appears twice')
            current = raw.sections.setdefault(name, [])
            continue
        if current is raw.main and _define_macro(line, raw.macros):
            continue
        current.append(line)
    return raw


def _define_macro(line: Line, macros: dict[str, str]) -> bool:
    match = MACRO_DEFINITION.match(line.text)
    if not match:
        return False
    name, operator, value = match.groups()
    if name in macros and operator != "==":
        raise line.error(f'macro "{name}" is already defined (use == to redefine)')
    macros[name] = value
    return True


def _logical_lines(path: str, raw: RawConfig, depth: int):
    if depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(f".include nested deeper than {MAX_INCLUDE_DEPTH}: {path}")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            physical = handle.read().split("\n")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    raw.files.append(path)
    for number, text in _join_continuations(physical):
        text = _replace_macros(text, raw.macros)
        if text.startswith("."):
            yield from _directive(path, number, text, raw, depth)
            continue
        yield Line(text, path, number)


def _join_continuations(physical: list[str]):
    """Yield (first line number, joined text) with comments and blanks removed."""
    pending: list[str] = []
    start = 0
    for index, text in enumerate(physical, start=1):
        stripped = text.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = index
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        yield start, "".join(pending).strip()
        pending = []
    if pending:
        yield start, "".join(pending).strip()


def _replace_macros(text: str, macros: dict[str, str]) -> str:
    if not macros or not re.search(r"[A-Z]", text):
        return text
    definition = MACRO_DEFINITION.match(text)
    if definition and definition.group(1) in macros and definition.group(2) == "==":
        head = text[: definition.start(3)]
        return head + _replace_words(definition.group(3), macros)
    return _replace_words(text, macros)


def _replace_words(text: str, macros: dict[str, str]) -> str:
    """Exim's rule: where an upper-case letter starts a word, the most
    recently defined macro whose name is a prefix of the text there is
    replaced (so `LIMITM` with LIMIT=5 gives `5M`)."""
    newest_first = sorted(macros, key=list(macros).index, reverse=True)

    def substitute(match: re.Match) -> str:
        word = match.group(0)
        for name in newest_first:
            if word.startswith(name):
                return macros[name] + word[len(name):]
        return word

    return re.sub(r"(?<![A-Za-z0-9_$])[A-Z][A-Za-z0-9_]*", substitute, text)


def _directive(path: str, number: int, text: str, raw: RawConfig, depth: int):
    words = text.split(None, 1)
    if words[0] not in (".include", ".include_if_exists") or len(words) != 2:
        raise ConfigError(f'unknown directive "{words[0]}"', path, number)
    target = words[1].strip().strip('"')
    if not os.path.isabs(target):
        target = os.path.join(os.path.dirname(path), target)
    if words[0] == ".include_if_exists" and not os.path.exists(target):
        return
    if not os.path.exists(target):
        raise ConfigError(f".include: no such file {target}", path, number)
    yield from _logical_lines(target, raw, depth + 1)

"""Pure parsing of SMTP command lines (RFC 5321 server side).

Everything here takes bytes or strings and returns values; nothing does I/O.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_COMMAND_LINE = 4096  # Exim accepts up to 16K; RFC 5321 says 512 at least.
VERBS = frozenset(
    b"HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY EXPN STARTTLS BDAT AUTH ETRN".split()
)

# A conservative mailbox: anything printable but <, >, space, inside the angle brackets.
_PATH = re.compile(r"<([^<>\s]*)>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HELO_NAME = re.compile(r"[!-~]+")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~]+))?")


class SmtpSyntaxError(Exception):
    """A malformed command; `reply` is the full SMTP reply to send."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Command:
    verb: str       # upper case, e.g. "MAIL"
    argument: str   # the rest of the line, stripped


def split_command(line: bytes) -> Command:
    """Split one command line (without CRLF) into verb and argument.

    Non-ASCII or NUL bytes in the verb make it an unknown command; in the
    argument they are kept (as surrogate escapes) for the verb to judge.
    """
    verb, _, rest = line.strip(b" \t").partition(b" ")
    upper = verb.upper()
    if upper not in VERBS:
        return Command(upper.decode("ascii", "replace")[:32], "")
    return Command(upper.decode("ascii"), rest.strip(b" \t").decode("utf-8", "surrogateescape"))


def parse_path(argument: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """Parse `FROM:<addr> PARAMS` or `TO:<addr> PARAMS` into (address, params).

    Exim tolerates a space after the colon and a missing pair of brackets
    around a bare address; so do we.
    """
    head = argument[: len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise SmtpSyntaxError(f"501 5.5.2 {keyword}: required")
    rest = argument[len(keyword) + 1:].lstrip(" ")
    match = _PATH.match(rest)
    if match:
        address, params_text = match.group(1), rest[match.end():]
    else:
        address, _, params_text = rest.partition(" ")
        if not address or "<" in address or ">" in address:
            raise SmtpSyntaxError("501 5.1.7 malformed address: missing or bad angle brackets")
    _check_address(address)
    return address, parse_parameters(params_text)


def _check_address(address: str) -> None:
    if _CONTROL.search(address):
        raise SmtpSyntaxError("501 5.1.7 malformed address: control character")
    if len(address) > 256:
        raise SmtpSyntaxError("501 5.1.7 address too long")
    if address.startswith("@") and ":" in address:  # source route: keep the mailbox
        return
    if address and address.count("@") != 1 and address != "postmaster":
        if "@" in address:
            raise SmtpSyntaxError("501 5.1.3 malformed address: more than one @")


def strip_source_route(address: str) -> str:
    """`@a,@b:user@c` -> `user@c` (RFC 5321 says to ignore source routes)."""
    if address.startswith("@") and ":" in address:
        return address.split(":", 1)[1]
    return address


def parse_parameters(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        match = _PARAM.fullmatch(word)
        if not match:
            raise SmtpSyntaxError(f'501 5.5.4 malformed parameter "{word[:40]}"')
        params[match.group(1).upper()] = match.group(2)
    return params


def parse_size_parameter(params: dict[str, str | None]) -> int | None:
    value = params.get("SIZE")
    if "SIZE" not in params:
        return None
    if value is None or not value.isdigit() or len(value) > 18:
        raise SmtpSyntaxError("501 5.5.4 SIZE parameter must be a number")
    return int(value)


def parse_body_parameter(params: dict[str, str | None]) -> str:
    value = (params.get("BODY") or "7BIT").upper()
    if value not in ("7BIT", "8BITMIME"):
        raise SmtpSyntaxError(f"501 5.5.4 unknown BODY type {value[:20]}")
    return value


def check_helo_name(name: str) -> None:
    """Printable ASCII, no space, not empty."""
    if not _HELO_NAME.fullmatch(name):
        raise SmtpSyntaxError("501 5.5.2 Syntactically invalid HELO argument(s)")


def split_address(address: str) -> tuple[str, str]:
    """`user@Example.COM` -> ("user", "example.com"); no @ -> (address, "")."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower()

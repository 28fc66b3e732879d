"""Pure parsers for Exim's value syntaxes: booleans, integers, sizes, times."""
from __future__ import annotations

import re

TIME_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
SIZE_SUFFIXES = {"k": 1024, "m": 1024 * 1024, "g": 1024 ** 3}
TRUE_WORDS = ("true", "yes")
FALSE_WORDS = ("false", "no")
SERVICE_PORTS = {"smtp": 25, "smtps": 465, "submission": 587, "submissions": 465}


class BadValue(ValueError):
    """A value that does not parse; the message says what was expected."""


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadValue(f'"{text}" is not a boolean (true, false, yes or no)')


def parse_int(text: str) -> int:
    """An integer with an optional K/M/G multiplier, decimal or 0x hex."""
    value = text.strip()
    match = re.fullmatch(r"(-?)(0x[0-9a-fA-F]+|\d+)([kKmMgG]?)", value)
    if not match:
        raise BadValue(f'"{text}" is not an integer')
    sign, digits, suffix = match.groups()
    number = int(digits, 16) if digits.lower().startswith("0x") else int(digits)
    number *= SIZE_SUFFIXES.get(suffix.lower(), 1)
    return -number if sign else number


def parse_time(text: str, allow_bare: bool = True) -> float:
    """Exim's time syntax: `1w2d3h4m5s`; a bare number is seconds when allowed."""
    value = text.strip()
    if allow_bare and re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if not value or not re.fullmatch(r"(\d+(\.\d+)?[wdhms])+", value):
        raise BadValue(f'"{text}" is not a time interval (such as 30s, 5m, 2h30m)')
    return float(sum(float(n) * TIME_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([wdhms])", value)))


def parse_port(text: str) -> int:
    value = text.strip()
    if value in SERVICE_PORTS:
        return SERVICE_PORTS[value]
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise BadValue(f'"{text}" is not a port number or service name')
    return int(value)


def format_size(size: int) -> str:
    """Exim-style short size for `mailq` output (e.g. 1.2K, 34M)."""
    for unit, factor in (("M", 1024 * 1024), ("K", 1024)):
        if size >= factor:
            scaled = size / factor
            return f"{scaled:.1f}{unit}" if scaled < 10 else f"{scaled:.0f}{unit}"
    return str(size)

"""Exim-format main, reject and panic logs.

Each line is built with one string format and written with one `os.write`
on an O_APPEND descriptor, so lines from many processes never interleave.
Logs are not fsynced: the spool is the durable record, logs are a report.
"""
from __future__ import annotations

import functools
import os
import sys
import time


@functools.lru_cache(maxsize=4)
def _format_second(second: int, pattern: str) -> str:
    return time.strftime(pattern, time.localtime(second))


def timestamp(now: float | None = None) -> str:
    """`2026-11-25 09:43:05`, formatted once per second, not once per line."""
    return _format_second(int(time.time() if now is None else now), "%Y-%m-%d %H:%M:%S")


def tod_full(now: float | None = None) -> str:
    """RFC 5322 date as Exim's $tod_full: `Wed, 25 Nov 2026 09:43:05 +0000`."""
    return _format_second(int(time.time() if now is None else now), "%a, %d %b %Y %H:%M:%S %z")


def host_field(address: str, port: int | None, helo: str = "", with_port: bool = False) -> str:
    """Exim's H= value: `(helo) [ip]:port`, the port only with +incoming_port."""
    text = f"({helo}) [{address}]" if helo else f"[{address}]"
    return f"{text}:{port}" if with_port and port else text


class Logs:
    """The three log files named by `log_file_path` (with %s)."""

    def __init__(self, path_template: str, selector: frozenset[str]) -> None:
        self.template = path_template
        self.selector = selector
        self._fds: dict[str, int] = {}
        self._pid_prefix = ""

    def set_process(self, pid: int) -> None:
        """Call after fork: the +pid item shows the writer's pid."""
        self._pid_prefix = f" [{pid}]" if "pid" in self.selector else ""

    def selected(self, item: str) -> bool:
        return item in self.selector

    def _fd(self, kind: str) -> int:
        fd = self._fds.get(kind)
        if fd is None:
            path = self.template.replace("%s", kind)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._fds[kind] = fd
        return fd

    def _write(self, kind: str, text: str) -> None:
        line = f"{timestamp()}{self._pid_prefix} {text}\n"
        try:
            os.write(self._fd(kind), line.encode("utf-8", "backslashreplace"))
        except OSError as exc:
            sys.stderr.write(f"mta-server: cannot write {kind} log ({exc}): {line}")

    def main(self, text: str) -> None:
        self._write("main", text)

    def reject(self, text: str) -> None:
        """Rejections go to both the main and the reject log, as in Exim."""
        self._write("main", text)
        self._write("reject", text)

    def panic(self, text: str) -> None:
        """Internal errors: the panic log and the main log."""
        self._write("main", text)
        self._write("panic", text)

    def reopen(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

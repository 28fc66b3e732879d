"""The reliability suite: faults, floods and hostile input against the real server.

The `mta` fixture comes from ../conftest.py.  Tests add rows to the report
with the `report` fixture; the table is printed at the end of the run:
each fault or attack, what was tried, how many times, and what was lost.
"""
from __future__ import annotations

import resource

import pytest

ROWS: list[tuple[str, str, str, str, str]] = []
HEADINGS = ("fault / attack", "what was tried", "times", "lost", "notes")


def pytest_configure(config) -> None:
    # A flood opens a thousand sockets from this process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def report():
    """report(fault, tried, times, lost, notes="") adds a row to the final table."""

    def add(fault: str, tried: str, times: int | str, lost: int | str, notes: str = "") -> None:
        ROWS.append((fault, tried, str(times), str(lost), notes))

    return add


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [HEADINGS, *rows]) for i in range(len(HEADINGS))]
    line = "  ".join("-" * width for width in widths)
    formatted = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [HEADINGS, *rows]]
    return [formatted[0], line, *formatted[1:]]


def pytest_terminal_summary(terminalreporter) -> None:
    if not ROWS:
        return
    terminalreporter.section("reliability: faults and attacks")
    for text in format_table(ROWS):
        terminalreporter.write_line(text)

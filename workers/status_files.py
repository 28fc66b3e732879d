"""Reading what the running server publishes: the master's and the workers'
status files (msgpack, rewritten every second), the spool's size and the
ratelimit table's fill.  Used by `mta-server status` and the metrics worker;
nothing here writes.
"""
from __future__ import annotations

import os

import msgpack

from mta.config import Config
from mta.spool import Spool
from shared.ratetable import RateTable, RateTableFormatError
from workers.shared_setup import ratelimit_path, runtime_directory


def read_status(path: str) -> dict | None:
    """One status file, or None if it is missing or half-written."""
    try:
        with open(path, "rb") as handle:
            record = msgpack.unpackb(handle.read(), raw=False)
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    return record if isinstance(record, dict) else None


def master_status(config: Config) -> dict:
    return read_status(os.path.join(runtime_directory(config), "master.status")) or {}


def worker_statuses(master: dict) -> dict[int, dict]:
    """Each listed worker's own status by pid ({} while it is starting)."""
    return {worker["pid"]: read_status(worker["status_path"]) or {} for worker in master.get("workers", [])}


def queue_size(config: Config) -> int:
    return len(Spool(config.spool_directory).message_ids())


def ratelimit_fill(config: Config) -> tuple[int, int] | None:
    """(records used, slots) of the ratelimit table, read-only; None if absent."""
    try:
        table = RateTable.open(ratelimit_path(config))
    except (OSError, RateTableFormatError):
        return None
    try:
        return table.fill()
    finally:
        table.close()

"""What the master prepares before forking: directories and shared memory."""
from __future__ import annotations

import os
import pwd

from mta.config import Config
from mta.configfile import ConfigError
from mta.log import Logs
from mta.spool import Spool
from shared.conncount import ConnCounts
from shared.proxypool import ProxyPool
from shared.ratetable import RateTable
from workers.context import SharedState

MAX_WORKER_SLOTS = 64          # live worker processes at once, old generations included
KEYS_PER_SLOT = 4096           # distinct client/proxy addresses one worker tracks


def runtime_directory(config: Config) -> str:
    return os.path.join(config.spool_directory, "run")


def ratelimit_path(config: Config) -> str:
    return os.path.join(config.spool_directory, "db", "ratelimit")


def prepare_directories(config: Config) -> None:
    """Create the spool, log and run folders, owned by exim_user when root.

    Messages are readable by that user only (mode 0750 folders, 0600 files).
    """
    Spool(config.spool_directory).create_directories()
    folders = [
        config.spool_directory, os.path.join(config.spool_directory, "input"),
        os.path.join(config.spool_directory, "corrupt"), os.path.join(config.spool_directory, "db"),
        runtime_directory(config), os.path.dirname(config.log_file_path),
    ]
    for folder in folders:
        os.makedirs(folder, mode=0o750, exist_ok=True)
    owner = _exim_ids(config)
    if owner is None:
        return
    for folder in folders:
        os.chown(folder, *owner)
        for name in os.listdir(folder):
            os.chown(os.path.join(folder, name), *owner, follow_symlinks=False)


def _exim_ids(config: Config) -> tuple[int, int] | None:
    if os.getuid() != 0 or not config.exim_user:
        return None
    try:
        entry = pwd.getpwnam(config.exim_user)
    except KeyError:
        raise ConfigError(f'exim_user "{config.exim_user}" does not exist') from None
    return entry.pw_uid, entry.pw_gid


def create_shared_state(config: Config, logs: Logs) -> SharedState:
    table = RateTable.create(ratelimit_path(config), config.ratelimit_table_size)
    if table.recreated:
        logs.main(f"ratelimit table {ratelimit_path(config)} recreated: {table.recreated}")
    owner = _exim_ids(config)
    if owner is not None:
        os.chown(ratelimit_path(config), *owner)
    state = SharedState(
        ratetable=table,
        conncounts=ConnCounts.create(MAX_WORKER_SLOTS, KEYS_PER_SLOT),
        proxypool=ProxyPool.create(max_proxies=256, max_processes=MAX_WORKER_SLOTS),
        conncounts_slots=MAX_WORKER_SLOTS,
    )
    return state

"""What the master prepares before forking: directories and shared memory."""
from __future__ import annotations

import os
import pwd
import resource

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


PRIVATE_UMASK = 0o027         # what we create is not for others (0640 files, 0750 folders at most)
LOG_KINDS = ("main", "reject", "panic")


def prepare_process() -> None:
    """Limits the master sets for itself and every worker it forks.

    Every connection is a descriptor: take the hard limit (a service
    manager's soft default of 1024 is below smtp_accept_max's 1000 plus
    spool and log files).  And nothing we create is readable by others.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.umask(PRIVATE_UMASK)


def runtime_directory(config: Config) -> str:
    return os.path.join(config.spool_directory, "run")


def ratelimit_path(config: Config) -> str:
    return os.path.join(config.spool_directory, "db", "ratelimit")


def prepare_directories(config: Config) -> None:
    """Create the spool, log and run folders, owned by exim_user when root.

    Messages are readable by that user only (mode 0750 folders, 0600 files).
    The log files are created here too, so that they belong to exim_user
    rather than to the master that writes their first line.  A log folder
    outside the spool that exists already may be shared (/var/log): it is
    left as it is.
    """
    spool = config.spool_directory
    Spool(spool).create_directories()
    spool_folders = [spool, os.path.join(spool, "input"), os.path.join(spool, "corrupt"),
                     os.path.join(spool, "db"), runtime_directory(config)]
    for folder in spool_folders:
        os.makedirs(folder, mode=0o750, exist_ok=True)
    prepare_log_files(config)
    owner = _exim_ids(config)
    if owner is None:
        return
    for folder in spool_folders:
        os.chown(folder, *owner)
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if path != config.pid_file_path:  # root signals the pid it names: exim_user must not own it
                os.chown(path, *owner, follow_symlinks=False)
    for folder in mailbox_roots(config):
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o750)
            os.chown(folder, *owner)


def prepare_log_files(config: Config) -> None:
    """Create the log files (and their folders), owned by exim_user when
    root: at start, and again at each reload, when a log rotated away
    would otherwise be recreated by the master, as root, and the workers
    could no longer write to it."""
    spool = config.spool_directory
    log_files = [config.log_file_path.replace("%s", kind) for kind in LOG_KINDS]
    log_folders = [folder for folder in dict.fromkeys(os.path.dirname(path) for path in log_files)
                   if not os.path.isdir(folder) or os.path.commonpath([folder, spool]) == spool]
    for folder in log_folders:
        os.makedirs(folder, mode=0o750, exist_ok=True)
    owner = _exim_ids(config)
    for path in log_files:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        if owner is not None:
            os.chown(path, *owner, follow_symlinks=False)
    if owner is not None:
        for folder in log_folders:
            os.chown(folder, *owner)


def mailbox_roots(config: Config) -> list[str]:
    """The fixed part of every appendfile `directory` (`../var/mail/` of
    `../var/mail/$local_part`), which the workers, no longer root, could not
    create themselves.  A folder that exists already is left as it is."""
    roots = []
    for transport in config.transports:
        options = dict(_option(line.text) for line in transport.body)
        directory = options.get("directory", "")
        if options.get("driver") != "appendfile" or not directory:
            continue
        fixed = os.path.dirname(directory.split("$", 1)[0]) if "$" in directory else directory
        if fixed:
            roots.append(config.resolve_path(fixed))
    return roots


def _option(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    return name.strip(), value.strip()


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

"""The `mta-server` command."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from mta.config import Config, load_config
from mta.configfile import ConfigError
from mta.log import timestamp
from mta.spool import Spool, SpoolError
from mta.validate import validate_config
from mta.values import format_size

DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "etc", "mta.conf"))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # `mta-server status | head -1`: stop quietly, as other Unix tools do
        _redirect_to_devnull(sys.stdout.fileno())  # or the interpreter's flush at exit fails on the pipe again
        return 1
    except (ConfigError, OSError) as exc:
        print(f"mta-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta-server", description="A mail transfer agent for proxied mail.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in (
        ("start", cmd_start, "start the server (in the background unless --foreground)"),
        ("stop", cmd_stop, "stop the server, letting sessions finish"),
        ("reload", cmd_reload, "re-read the configuration and hostlists (SIGHUP)"),
        ("status", cmd_status, "show the master, its workers and the queue"),
        ("check-config", cmd_check_config, "check the configuration; print FILE:LINE for errors"),
        ("queue", cmd_queue, "list spooled messages, like mailq"),
        ("ratelimit-dump", cmd_ratelimit_dump, "print the ratelimit records, like exim_dumpdb"),
        ("host-check", cmd_host_check, "an SMTP session on stdin/stdout as if from IP, like exim -bh"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("-C", dest="config", default=os.environ.get("MTA_CONFIG", DEFAULT_CONFIG),
                             help=f"configuration file (default: $MTA_CONFIG or {DEFAULT_CONFIG})")
        command.set_defaults(handler=handler)
        if name == "start":
            command.add_argument("--foreground", action="store_true", help="do not detach; log to stderr too")
        if name == "host-check":
            _host_check_arguments(command)
    return parser


def _load(args) -> Config:
    config = load_config(args.config)
    validate_config(config)
    return config


def cmd_check_config(args) -> int:
    config = _load(args)
    print(f"{config.path}: configuration OK ({len(config.files)} file(s) read)")
    return 0


def cmd_start(args) -> int:
    from workers.master import run_master

    config = _load(args)
    if args.foreground:
        print(f"mta-server: starting in the foreground; main log {config.log_file_path.replace('%s', 'main')}",
              file=sys.stderr)
        status = run_master(args.config)
        if status:
            panic = config.log_file_path.replace("%s", "panic")
            print(f"mta-server: stopped with status {status}; the reason is in {panic}:", file=sys.stderr)
            print(_tail(panic), file=sys.stderr)
        return status
    return _start_detached(args.config, config)


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).rstrip()
    except OSError as exc:
        return f"(cannot read it: {exc.strerror})"


def _start_detached(config_path: str, config: Config) -> int:
    """Double fork; the parent waits until the pid file names a live master."""
    from workers.master import run_master

    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        status = os.read(read_end, 1024).decode()
        if status.startswith("ok"):
            print(f"mta-server started: pid {status[3:]}")
            return 0
        print(f"mta-server: failed to start: {status or 'see the panic log'}", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    _redirect_to_devnull(0, 1, 2)
    try:
        code = run_master(config_path, ready=lambda: os.write(write_end, f"ok {os.getpid()}".encode()))
    except (ConfigError, OSError) as exc:
        os.write(write_end, str(exc).encode())
        code = 1
    os._exit(code)


def _redirect_to_devnull(*fds: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


def _master_pid(config: Config) -> int | None:
    """The live master named by the pid file, or None.

    The spool belongs to exim_user, so a compromised worker could write a
    pid file of its own: believe only one owned by us (the master's user)
    naming a process whose command line is an mta-server start.
    """
    try:
        with open(config.pid_file_path) as handle:
            if os.fstat(handle.fileno()).st_uid != os.geteuid():
                return None
            pid = int(handle.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().split(b"\x00")
    except (OSError, ValueError):
        return None
    if b"start" not in command or not any(b"workers.cli" in part or b"mta-server" in part for part in command):
        return None
    return pid


def _signal_master(args, signum: int, verb: str) -> tuple[Config, int] | None:
    config = load_config(args.config)
    pid = _master_pid(config)
    if pid is None:
        print(f"mta-server: not running (no live master in {config.pid_file_path})", file=sys.stderr)
        return None
    os.kill(pid, signum)
    print(f"mta-server: {verb} sent to master pid {pid}")
    return config, pid


def cmd_stop(args) -> int:
    found = _signal_master(args, signal.SIGTERM, "stop (TERM)")
    if found is None:
        return 1
    config, pid = found
    deadline = time.time() + config.shutdown_timeout + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("mta-server: stopped")
            return 0
        time.sleep(0.1)
    print(f"mta-server: master pid {pid} still running", file=sys.stderr)
    return 1


def cmd_reload(args) -> int:
    config = load_config(args.config)
    validate_config(config)
    return 0 if _signal_master(args, signal.SIGHUP, "reload (HUP)") else 1


def cmd_status(args) -> int:
    from workers import status_files
    from workers.metrics import live_workers, totals

    config = load_config(args.config)
    pid = _master_pid(config)
    if pid is None:
        print("mta-server: not running")
        return 3
    master = status_files.master_status(config)
    if master.get("pid") != pid:  # a previous master's file, in the moment before this one writes its own
        print(f"master pid {pid}, starting")
        return 0
    workers = live_workers(master, status_files.worker_statuses(master))
    now = time.time()
    print(f"master pid {pid}, generation {master.get('generation', '?')}, up {_age(now - master.get('started', now))}")
    print(f"listening: {', '.join(master.get('listening', []))}"
          + (f"; metrics on {master['metrics']}" if master.get("metrics") else ""))
    print(f"smtp workers: {master.get('smtp_workers', '?')} (smtp_workers = {config.smtp_workers}, "
          "TTIN/TTOU to change)")
    print(f"{'pid':>7} {'kind':<9} {'index':>5} {'gen':>4} {'age':>8} {'conns':>6} {'cpu':>4}  state")
    for worker, status in workers:
        stats = status.get("stats", {})
        state = "retiring" if worker.get("retiring") else ("starting" if not status else "serving")
        conns = stats.get("connections", stats.get("deliveries_in_flight", 0))
        cpu = status.get("cpu")
        print(f"{worker['pid']:>7} {worker['kind']:<9} {worker['index']:>5} {worker['generation']:>4} "
              f"{_age(now - worker['started']):>8} {conns:>6} {'-' if cpu is None else cpu:>4}  {state}")
    counted = totals(master, workers)
    print(f"queue: {status_files.queue_size(config)} message(s); since start: received {counted.get('received', 0)}, "
          f"delivered {counted.get('delivered', 0)}, deferred {counted.get('deferred', 0)}, "
          f"failed {counted.get('failed', 0)}")
    fill = status_files.ratelimit_fill(config)
    if fill is not None:
        print(f"ratelimit table: {fill[0]} of {fill[1]} records used")
    _print_socks_proxies(workers, now)
    return 0


def _print_socks_proxies(workers: list[tuple[dict, dict]], now: float) -> None:
    """The proxy pool is shared memory: any runner's snapshot is all of it."""
    proxies: list[dict] = []
    for _, status in workers:
        proxies = status.get("stats", {}).get("socks_proxies") or proxies
    for proxy in proxies:
        print(f"socks proxy {proxy.get('ip')}:{proxy.get('port')}: dials {proxy.get('dials')} "
              f"failures {proxy.get('failures')} in use {proxy.get('in_use')}"
              + (" DOWN" if (proxy.get("down_until") or 0) > now else ""))


def _age(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def cmd_queue(args) -> int:
    """One entry per message as `mailq` prints it: age, size, id, sender,
    then the recipients not yet delivered."""
    config = load_config(args.config)
    spool = Spool(config.spool_directory)
    now = time.time()
    for message_id in spool.message_ids():
        try:
            envelope = spool.read_envelope(message_id)
            size = spool.data_size(message_id)
        except (SpoolError, OSError) as exc:
            print(f"{message_id} unreadable: {exc}")
            continue
        done = spool.read_journal(message_id)
        print(f"{_age(now - envelope.received_time):>4} {format_size(size):>5} {message_id} <{envelope.sender}>")
        for recipient in envelope.recipients:
            mark = "D " if recipient in done else "  "
            print(f"        {mark}{recipient}")
        print()
    return 0


def cmd_ratelimit_dump(args) -> int:
    from shared.ratetable import RateTable, RateTableFormatError
    from workers.shared_setup import ratelimit_path

    config = load_config(args.config)
    try:
        table = RateTable.open(ratelimit_path(config))
    except (OSError, RateTableFormatError) as exc:
        print(f"mta-server: cannot read the ratelimit table: {exc}", file=sys.stderr)
        return 1
    for item in sorted(table.items(), key=lambda item: item.key):
        print(f"{timestamp(item.time)}  rate: {item.rate:10.3f} key: {item.key}")
    table.close()
    return 0


def _host_check_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("ip", type=_ip_address, help="the client's address")
    command.add_argument("--proxy", type=_ip_address, metavar="PROXY_IP",
                         help="the client comes through this proxy (PROXY protocol)")
    command.add_argument("--update-ratelimits", action="store_true",
                         help="write the ratelimit records (by default they are read, never written)")


def _ip_address(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not an IP address') from None


def cmd_host_check(args) -> int:
    """Exim's -bh: the real ACLs and ratelimit records, nothing spooled."""
    from mta.host_check import Peer, run_host_check
    from workers.listeners import listen_addresses

    config = _load(args)
    first = listen_addresses(config.local_interfaces, config.daemon_smtp_ports, config.tls_on_connect_ports)[0]
    store = _host_check_store(config, args.update_ratelimits)
    try:
        run_host_check(config, store, Peer(args.ip, args.proxy or "", (first.address, first.port)),
                       sys.stdin.buffer, sys.stdout)
    finally:
        store.close()
    return 0


def _host_check_store(config: Config, update: bool):
    """The ratelimit table itself with --update-ratelimits, else an overlay
    that reads it and keeps this session's updates in memory."""
    from mta.host_check import OverlayRateStore
    from shared.ratetable import RateTable, RateTableFormatError
    from workers.shared_setup import ratelimit_path

    path = ratelimit_path(config)
    if update:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return RateTable.create(path, config.ratelimit_table_size)
    try:
        return OverlayRateStore(RateTable.open(path))
    except (FileNotFoundError, RateTableFormatError) as exc:
        print(f">>> ratelimit table not usable ({exc}): rates start from zero")
        return OverlayRateStore(None)


if __name__ == "__main__":
    sys.exit(main())

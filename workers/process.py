"""What every forked worker does before it serves: the process's set-up.

In order: die with the master (PR_SET_PDEATHSIG), take a name, reinitialise
gevent after fork, bind an SMTP worker to its CPU, drop root for `exim_user`
(no capabilities left, PR_SET_NO_NEW_PRIVS), install signal handlers, start
the heartbeat.
Exit codes tell the master how the worker ended (see `EXIT_*`).
"""
from __future__ import annotations

import grp
import os
import pwd
import signal
import sys
import time
import traceback
from typing import Callable, Iterable

import gevent
import msgpack
import prctl

from workers.context import WorkerContext

EXIT_OK = 0
EXIT_BOOT_ERROR = 3   # set-up failed: respawning would fail the same way
HEARTBEAT_INTERVAL = 1.0


def run_worker(ctx: WorkerContext, serve: Callable[[WorkerContext], None], status_path: str) -> None:
    """The body of a freshly forked child; never returns."""
    code = EXIT_OK
    try:
        gevent.reinit()
        _set_up_process(ctx)
        started = time.time()
        gevent.spawn(_heartbeat, ctx, status_path, started)
        serve(ctx)
        _write_status(ctx, status_path, started)  # the final counters, for the master's totals
    except BootError as exc:
        ctx.logs.panic(f"{ctx.kind} worker {ctx.index} failed to start: {exc}")
        code = EXIT_BOOT_ERROR
    except Exception:  # noqa: BLE001 - the panic log must see every crash
        ctx.logs.panic(f"{ctx.kind} worker {ctx.index} crashed:\n" + traceback.format_exc())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class BootError(Exception):
    """A worker cannot start (bad user, unreadable certificate, ...)."""


def _set_up_process(ctx: WorkerContext) -> None:
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() == 1:  # the master died between fork and prctl
        os._exit(EXIT_OK)
    prctl.set_proctitle(f"mta-server: {ctx.kind} worker {ctx.index} gen {ctx.generation}")
    ctx.logs.set_process(os.getpid())
    if ctx.kind == "smtp" and ctx.config.smtp_worker_cpu_affinity:
        bind_smtp_worker(ctx)
    drop_privileges(ctx.config.exim_user)
    _install_signals(ctx)


def cpu_for_worker(index: int, allowed: Iterable[int]) -> int | None:
    """The CPU for SMTP worker `index` (1-based): the allowed ones in turn;
    None when only one is allowed (nothing to choose)."""
    cpus = sorted(allowed)
    if len(cpus) < 2:
        return None
    return cpus[(index - 1) % len(cpus)]


def bind_smtp_worker(ctx: WorkerContext) -> None:
    """Keep this worker, and the sync thread it starts later, on one CPU;
    if the kernel refuses, say so and run unbound.

    Unbound, the scheduler often woke a worker on the CPU of the process
    that woke it (smtp-source, the disk's interrupt), away from its warm
    caches, and at one session put client and worker on the same CPU in
    some runs.  Bound: 4-9 % more messages/s at 20 sessions in six of six
    interleaved rounds against Postfix; ±0 at one session, 100 sessions
    and 100 KiB (README, load testing).  The CPUs are those the master may
    use (its affinity, a cpuset), so `taskset` on the master chooses them."""
    cpu = cpu_for_worker(ctx.index, os.sched_getaffinity(0))
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # a CPU taken offline meanwhile, a sandbox that forbids it
        ctx.logs.main(f"smtp worker {ctx.index} runs unbound: cannot bind it to a CPU ({exc.strerror})")
        return
    ctx.cpu = cpu


def drop_privileges(user: str) -> None:
    """Become `user` if we are root; nothing is kept (no capabilities)."""
    prctl.set_no_new_privs(True)
    if os.getuid() != 0 or not user:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise BootError(f'exim_user "{user}" does not exist') from None
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    prctl.capbset.limit()  # an empty bounding set: no capability can come back, even through exec
    os.setgroups(groups)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise BootError("could not give up root")


def _install_signals(ctx: WorkerContext) -> None:
    """TERM: drain; INT/QUIT: exit now; HUP is the master's business."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    gevent.signal_handler(signal.SIGTERM, ctx.stopping.set)
    gevent.signal_handler(signal.SIGINT, os._exit, EXIT_OK)
    gevent.signal_handler(signal.SIGQUIT, os._exit, EXIT_OK)


def _heartbeat(ctx: WorkerContext, path: str, started: float) -> None:
    """Rewrite the status file every second; the master watches its mtime."""
    while True:
        _write_status(ctx, path, started)
        gevent.sleep(HEARTBEAT_INTERVAL)


def _write_status(ctx: WorkerContext, path: str, started: float) -> None:
    record = {
        "pid": os.getpid(), "kind": ctx.kind, "index": ctx.index, "generation": ctx.generation,
        "started": started, "stopping": ctx.stopping.is_set(), "stats": ctx.stats, "cpu": ctx.cpu,
    }
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(msgpack.packb(record, default=str))
    os.replace(temporary, path)

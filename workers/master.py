"""The master process (the arbiter): binds, forks, supervises, reloads.

Modelled on gunicorn's arbiter: signal handlers only enqueue the signal and
wake the loop through a pipe; the loop ticks once a second, reaps children,
kills the hung (stale heartbeat file), respawns the dead with back-off, and
replaces workers generation by generation on HUP.  The master never serves a
connection and never starts a gevent hub.
"""
from __future__ import annotations

import errno
import importlib
import fcntl
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import msgpack

from mta import fsinfo
from mta.config import Config, load_config
from mta.configfile import ConfigError
from mta.log import Logs
from mta.spool import Spool
from mta.validate import validate_config
from workers.context import SharedState, WorkerContext
from workers.listeners import ListenAddress, bind, listen_addresses
from workers.metrics import add_counters
from workers.notify import sd_notify
from workers.process import EXIT_BOOT_ERROR, run_worker
from workers.shared_setup import (create_shared_state, prepare_directories, prepare_log_files, prepare_process,
                                  runtime_directory)
from workers.status_files import read_status

TICK = 1.0
MAX_BACKOFF = 30.0
STATUS_MODE = 0o644         # the metrics worker (exim_user) reads it; the run folder keeps others out
QUICK_DEATH = 10.0          # a worker dying sooner than this after start counts as a crash loop
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                   signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU)
WORKER_MODULES = {"smtp": "workers.smtp", "delivery": "workers.delivery", "metrics": "workers.metrics_http"}


class MasterExit(Exception):
    """Stop the master with this exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class Worker:
    pid: int
    kind: str
    index: int
    generation: int
    slot: int
    started: float
    status_path: str
    retiring: bool = False


@dataclass
class Respawn:
    failures: int = 0
    not_before: float = 0.0


@dataclass
class Master:
    config: Config
    logs: Logs
    generation: int = 1
    workers: dict[int, Worker] = field(default_factory=dict)
    listeners: dict[ListenAddress, socket.socket] = field(default_factory=dict)
    metrics_listener: tuple[ListenAddress, socket.socket] | None = None
    retired: dict = field(default_factory=dict)
    """Counters of workers that have exited (see workers/metrics.py)."""
    shared: SharedState = field(default_factory=SharedState)
    inboxes: list[tuple[socket.socket, socket.socket]] = field(default_factory=list)
    respawn: dict[tuple[str, int], Respawn] = field(default_factory=dict)
    free_slots: list[int] = field(default_factory=list)
    extra_smtp_workers: int = 0
    signals: list[int] = field(default_factory=list)
    kill_stragglers_at: float | None = None   # set when stopping: SIGKILL whoever is left then
    stop_status: int = 0
    started: float = field(default_factory=time.time)

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        prepare_process()
        prepare_directories(self.config)
        self._remove_orphans()
        self.shared = create_shared_state(self.config, self.logs)
        self.free_slots = list(range(1, self.shared.conncounts_slots))
        self._bind_listeners()
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._enqueue_signal)
        listening = ", ".join(str(where) for where in self.listeners)
        self.logs.main(f"mta-server daemon started: pid={os.getpid()}, listening for SMTP on {listening}"
                       + (f", metrics on {self.metrics_listener[0]}" if self.metrics_listener else ""))
        self._log_spool_sync()
        self._spawn_missing()
        self._write_status()  # before anyone is told we are up: a previous master's file may still be there
        self._notify("READY=1")

    def _log_spool_sync(self) -> None:
        if self.config.spool_sync != "syncfs":
            return
        filesystem = fsinfo.filesystem(Spool(self.config.spool_directory).input)  # read /proc once
        if fsinfo.needs_flush(*filesystem):
            self.logs.main(f"spool on {fsinfo.describe(*filesystem)}: each batch's syncfs is followed by a"
                           " directory fsync, as syncfs alone does not make it durable there")

    def _remove_orphans(self) -> None:
        """Data files without an envelope are messages that were never
        acknowledged (their session died); with no worker running yet,
        none of them can still be in progress."""
        for path in Spool(self.config.spool_directory).orphans():
            os.unlink(path)
            self.logs.main(f"removed unacknowledged spool file {path}")

    def _enqueue_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)
        try:
            os.write(self._wakeup_write, b".")
        except BlockingIOError:
            return  # the pipe is full: the loop is awake already

    def _bind_listeners(self) -> None:
        config = self.config
        wanted = listen_addresses(config.local_interfaces, config.daemon_smtp_ports, config.tls_on_connect_ports)
        fresh = {where: self.listeners.get(where) or bind(where) for where in wanted}
        metrics = self._metrics_listener(config.metrics_listen)
        for where, sock in self.listeners.items():
            if where not in fresh:
                sock.close()
        if self.metrics_listener is not None and self.metrics_listener is not metrics:
            self.metrics_listener[1].close()
        self.listeners = fresh
        self.metrics_listener = metrics

    def _metrics_listener(self, address: tuple) -> tuple[ListenAddress, socket.socket] | None:
        """The metrics socket: kept across reloads while its address stays."""
        if not address:
            return None
        where = ListenAddress(address[0], address[1], False)
        if self.metrics_listener is not None and self.metrics_listener[0] == where:
            return self.metrics_listener
        return where, bind(where)

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        try:
            while True:
                self._sleep()
                self._handle_signals()
                self._reap()
                if self.kill_stragglers_at is not None:
                    self._continue_stop()
                    continue
                self._kill_hung()
                self._spawn_missing()
                self._write_status()
        except MasterExit as done:
            self._write_status()
            return done.status

    def _sleep(self) -> None:
        if self.signals:
            return
        try:
            ready, _, _ = select.select([self._wakeup_read], [], [], TICK)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wakeup_read, 4096):
                    continue
            except BlockingIOError:
                return

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTERM:
                self.begin_stop(graceful=True)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.begin_stop(graceful=False)
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                self._resize(+1 if signum == signal.SIGTTIN else -1)

    def _resize(self, change: int) -> None:
        """TTIN/TTOU: one SMTP worker more or less (at least one; at most
        what leaves half the shared-memory slots for draining generations)."""
        name = "SIGTTIN" if change > 0 else "SIGTTOU"
        if self.smtp_worker_count + change < 1 or len(self._desired()) + change > self.shared.conncounts_slots // 2:
            self.logs.main(f"{name} ignored: {self.smtp_worker_count} SMTP worker(s) is the limit")
            return
        self.extra_smtp_workers += change
        self.logs.main(f"SMTP workers: {self.smtp_worker_count} ({name})")

    @property
    def smtp_worker_count(self) -> int:
        return self.config.smtp_workers + self.extra_smtp_workers

    # -- children -----------------------------------------------------------------

    def _desired(self) -> list[tuple[str, int]]:
        smtp = self.smtp_worker_count
        runners = self.config.queue_runners
        metrics = [("metrics", 1)] if self.metrics_listener is not None else []
        return [("smtp", i) for i in range(1, smtp + 1)] + [("delivery", i) for i in range(1, runners + 1)] + metrics

    def _spawn_missing(self) -> None:
        current = {(w.kind, w.index) for w in self.workers.values() if not w.retiring}
        desired = self._desired()
        now = time.time()
        for key in desired:
            state = self.respawn.setdefault(key, Respawn())
            if key not in current and now >= state.not_before:
                self._spawn(*key)
        for worker in self._oldest_first():
            if not worker.retiring and (worker.kind, worker.index) not in desired:
                self._retire(worker)

    def _spawn(self, kind: str, index: int) -> None:
        if not self.free_slots:
            self.logs.panic(f"no free shared-memory slot for {kind} worker {index}; too many workers still draining")
            return
        slot = self.free_slots.pop(0)
        status_path = os.path.join(runtime_directory(self.config), f"{kind}-{index}-{slot}.status")
        ctx = self._context(kind, index, slot)
        pid = os.fork()
        if pid == 0:
            self._become_child(ctx, status_path)
        self.workers[pid] = Worker(pid, kind, index, self.generation, slot, time.time(), status_path)

    def _context(self, kind: str, index: int, slot: int) -> WorkerContext:
        ctx = WorkerContext(kind, index, self.generation, self.config, self.logs, self.shared)
        ctx.stats["slot"] = slot
        if kind == "smtp":
            ctx.listeners = [(sock, where.tls_on_connect) for where, sock in self.listeners.items()]
            ctx.runner_inboxes = [sender for sender, _ in self._runner_inboxes()]
        elif kind == "delivery":
            ctx.runner_inboxes = [receiver for _, receiver in self._runner_inboxes()]
        elif self.metrics_listener is not None:
            ctx.listeners = [(self.metrics_listener[1], False)]
        return ctx

    def _runner_inboxes(self) -> list[tuple[socket.socket, socket.socket]]:
        while len(self.inboxes) < self.config.queue_runners:
            sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
            self.inboxes.append((sender, receiver))
        return self.inboxes[: self.config.queue_runners]

    def _become_child(self, ctx: WorkerContext, status_path: str) -> None:
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self._wakeup_read)
        os.close(self._wakeup_write)
        if ctx.kind == "delivery":
            self.shared.proxypool.bind_slot(ctx.stats["slot"])
        serve = importlib.import_module(WORKER_MODULES[ctx.kind]).serve
        run_worker(ctx, serve, status_path)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, status)

    def _worker_exited(self, worker: Worker, status: int) -> None:
        self._release_slot(worker)
        code = os.waitstatus_to_exitcode(status)
        if worker.retiring or self.kill_stragglers_at is not None:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        self.logs.panic(f"{worker.kind} worker {worker.index} (pid {worker.pid}) {how}")
        if code == EXIT_BOOT_ERROR:
            self.logs.panic(f"{worker.kind} worker could not start; stopping (see the panic log for why)")
            self.begin_stop(graceful=False, status=EXIT_BOOT_ERROR)
            return
        state = self.respawn.setdefault((worker.kind, worker.index), Respawn())
        if time.time() - worker.started < QUICK_DEATH:
            state.failures += 1
        else:
            state.failures = 0
        delay = min(MAX_BACKOFF, 2.0 ** (state.failures - 1)) if state.failures else 0.0
        state.not_before = time.time() + delay
        if delay:
            self.logs.main(f"respawning {worker.kind} worker {worker.index} in {delay:g}s")

    def _release_slot(self, worker: Worker) -> None:
        if worker.kind == "smtp":
            self.shared.conncounts.clear_slot(worker.slot)
        elif worker.kind == "delivery":
            self.shared.proxypool.retire_slot(worker.slot)
        self.free_slots.append(worker.slot)
        last = read_status(worker.status_path)
        if last is not None:
            add_counters(self.retired, last.get("stats", {}))
        self._write_status()  # the worker is counted as retired, no longer as live: now its file may go
        try:
            os.unlink(worker.status_path)
        except FileNotFoundError:
            return  # it never wrote one

    def _kill_hung(self) -> None:
        timeout = self.config.worker_heartbeat_timeout
        now = time.time()
        for worker in list(self.workers.values()):
            if now - worker.started < timeout:
                continue
            try:
                beat = os.stat(worker.status_path).st_mtime
            except FileNotFoundError:
                beat = worker.started
            if now - beat > timeout:
                self.logs.panic(f"{worker.kind} worker {worker.index} (pid {worker.pid}) hung "
                                f"(no heartbeat for {now - beat:.0f}s); killing it")
                self._signal(worker, signal.SIGKILL)

    def _retire(self, worker: Worker) -> None:
        worker.retiring = True
        self._signal(worker, signal.SIGTERM)

    def _signal(self, worker: Worker, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            return

    def _oldest_first(self) -> list[Worker]:
        return sorted(self.workers.values(), key=lambda w: (w.generation, w.started))

    # -- reload and stop ----------------------------------------------------------

    def reload(self) -> None:
        """Re-read everything; if valid, a new generation replaces the old."""
        self._notify("RELOADING=1")
        self._reload()
        self._notify("READY=1")

    def _reload(self) -> None:
        try:
            config = load_config(self.config.path)
            validate_config(config)
        except ConfigError as exc:
            self.logs.panic(f"reload failed, still running the previous configuration: {exc}")
            return
        old_config = self.config
        self.config = config
        try:
            self._bind_listeners()
        except OSError as exc:
            self.config = old_config
            self.logs.panic(f"reload failed, still running the previous configuration: {exc}")
            return
        try:
            prepare_log_files(config)  # a log rotated away is recreated for exim_user, not as root
        except OSError as exc:
            self.logs.panic(f"reload: cannot create the log files: {exc}")
        self.logs = Logs(config.log_file_path, config.log_selector)
        self.generation += 1
        self.logs.main(f"configuration reloaded from {config.path} (generation {self.generation})")
        old = [w for w in self._oldest_first() if not w.retiring]
        self.respawn.clear()
        for kind, index in self._desired():
            self._spawn(kind, index)
        for worker in old:
            self._retire(worker)

    def begin_stop(self, graceful: bool, status: int = 0) -> None:
        """TERM lets sessions finish for up to shutdown_timeout; INT/QUIT
        tells workers to exit at once (and kills them 2s later if not)."""
        self.stop_status = status
        grace = self.config.shutdown_timeout if graceful else 2.0
        deadline = time.time() + grace
        if self.kill_stragglers_at is None:
            self.logs.main("mta-server daemon stopping" + ("" if graceful else " (fast)"))
            self._notify("STOPPING=1")
        else:
            deadline = min(deadline, self.kill_stragglers_at)
        self.kill_stragglers_at = deadline
        for worker in self.workers.values():
            self._signal(worker, signal.SIGTERM if graceful else signal.SIGQUIT)

    def _continue_stop(self) -> None:
        if not self.workers:
            for sock in self.listeners.values():
                sock.close()
            if self.metrics_listener is not None:
                self.metrics_listener[1].close()
            self.logs.main("mta-server daemon stopped")
            raise MasterExit(self.stop_status)
        if time.time() > self.kill_stragglers_at:
            for worker in self.workers.values():
                self._signal(worker, signal.SIGKILL)

    # -- status ---------------------------------------------------------------------

    def _write_status(self) -> None:
        record = {
            "pid": os.getpid(), "started": self.started, "generation": self.generation,
            "config": self.config.path, "stopping": self.kill_stragglers_at is not None,
            "listening": [str(where) for where in self.listeners],
            "metrics": str(self.metrics_listener[0]) if self.metrics_listener else "",
            "smtp_workers": self.smtp_worker_count, "retired": self.retired,
            "workers": [
                {"pid": w.pid, "kind": w.kind, "index": w.index, "generation": w.generation,
                 "started": w.started, "retiring": w.retiring, "status_path": w.status_path}
                for w in self._oldest_first()
            ],
        }
        path = os.path.join(runtime_directory(self.config), "master.status")
        temporary = path + ".new"
        with open(temporary, "wb") as handle:
            os.fchmod(handle.fileno(), STATUS_MODE)
            handle.write(msgpack.packb(record))
        os.replace(temporary, path)

    def _notify(self, state: str) -> None:
        try:
            sd_notify(state)
        except OSError as exc:
            self.logs.panic(f"cannot notify systemd ({state}): {exc}")


def acquire_pid_file(path: str) -> int:
    """Lock and write the pid file; refuse if another master holds it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode().strip()
        os.close(fd)
        raise ConfigError(f"another mta-server master (pid {other or '?'}) is running on this spool ({path})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def run_master(config_path: str, ready: Callable[[], object] | None = None) -> int:
    """Load, check, lock, bind, then supervise until stopped.  `ready` is
    called once the listeners are bound (a detaching parent waits for it)."""
    config = load_config(config_path)
    validate_config(config)
    logs = Logs(config.log_file_path, config.log_selector)
    pid_fd = acquire_pid_file(config.pid_file_path)
    master = Master(config, logs)
    try:
        master.start()
        if ready is not None:
            ready()
        return master.run()
    finally:
        try:
            os.unlink(config.pid_file_path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        os.close(pid_fd)

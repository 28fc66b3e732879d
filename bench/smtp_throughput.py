"""Receive throughput: smtp-source against mta-server, smtp-sink and Postfix.

Every peer is measured in the same run, interleaved round by round (and the
order of the peers rotated), so a busy machine slows them alike; the figures
that matter are the ratios.

- mta-server: started through tests/harness.py with `queue_runners = 0`, so
  nothing is delivered; every 250 is sent after the message is synced.
- smtp-sink: Postfix's test server, no storage at all: the ceiling.
- postfix: a private Postfix instance that this script configures in a
  temporary directory, on a spare loopback port, and starts as its own child
  (`master -c DIR` in the foreground, never `/etc/postfix` nor the system's
  instance). Every message it accepts is received, fsynced and put on hold
  (`smtpd_end_of_data_restrictions = check_client_access static:hold`),
  never delivered. `in_flow_delay = 0`: with no delivery, Postfix's inflow
  control would otherwise stall smtpd a second per message.
- mta+haproxy (with --through-haproxy): a second mta-server with
  `hosts_proxy = 127.0.0.1`, behind a real HAProxy (mode tcp, send-proxy-v2).

Every peer that stores messages is checked to have received exactly the
number sent (Postfix: files in its hold queue; mta-server: `-H` files in its
spool); smtp-sink is trusted through smtp-source's exit status. smtp-source
opens one connection per message (its default).

    python bench/smtp_throughput.py [--rounds 2] [--scale 1.0] [--through-haproxy] [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import collections
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from harness import MtaServer, base_config, find_program, free_port  # noqa: E402

# (label, sessions, message size, messages) — enough messages for several seconds each.
CASES = [("1 KiB x1", 1, 1024, 2000), ("1 KiB x20", 20, 1024, 10000),
         ("1 KiB x100", 100, 1024, 10000), ("100 KiB x20", 20, 100 * 1024, 3000)]
# mta-server / Postfix ratios the project aims at (DESIGN.md: "beating Postfix twice over").
TARGETS = {"1 KiB x1": 1.2, "1 KiB x20": 2.0, "1 KiB x100": 2.0, "100 KiB x20": 1.5}
WARMUP = (20, 1024, 200)  # sessions, size, messages: sent to every peer first, not measured
START_ATTEMPTS = 3        # a spare port taken by someone else between free_port() and bind


def bench_directory(peer: str) -> str:
    """A fresh folder for one peer's spool/queue, under the repository's
    var/bench, on the same file system for every peer.

    var/bench is marked as a top of directory hierarchy (`chattr +T`), so
    ext4 places each peer's folder in a block group of its own.  Without
    it, every folder would share the block group of var/, and on ext4
    without a journal (this kind of VM) the inode allocator skips each
    inode freed in the last seconds, one by one: after a test run has
    deleted thousands of spool files, creating a file cost up to 1 ms
    instead of 30 us, and whoever created more files per message paid more.
    """
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "var", "bench")
    os.makedirs(base, exist_ok=True)
    chattr = shutil.which("chattr")
    if chattr:  # best effort: other file systems ignore or refuse the flag
        subprocess.run([chattr, "+T", base], capture_output=True)
    return tempfile.mkdtemp(prefix=f"{peer}-", dir=base)


RECENTLY_FREED_SECONDS = 6  # ext4 without a journal: 5 s once the inode tables are written out


def settle_file_system() -> None:
    """Write everything out, then wait until ext4 (without a journal) no
    longer skips the inodes freed before this run.

    Its inode allocator passes over, one by one, every inode freed in the
    last 5 seconds (5 minutes while the inode table block is still dirty).
    A test suite or an earlier benchmark that has just deleted thousands of
    spool files cost mta-server's workers about 180 µs more system time per
    message at 20 sessions (506 against 317-327 µs in the same hour), and
    whoever creates more files per message pays more (mta-server two,
    Postfix one).  On other file systems this only costs the wait.
    """
    os.sync()
    time.sleep(RECENTLY_FREED_SECONDS)


class PeerError(RuntimeError):
    pass


def run_source(port: int, sessions: int, size: int, count: int) -> float:
    source = find_program("smtp-source")
    if source is None:
        raise SystemExit("smtp-source not found (apt-get install postfix; `make bench` does it)")
    command = [source, "-4", "-s", str(sessions), "-m", str(count), "-l", str(size), "-M", "source.bench",
               "-f", "bench@example.org", "-t", "user@localhost", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120 + count * 0.05)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"smtp-source timed out after {exc.timeout:.0f}s") from None
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise PeerError(f"smtp-source exited with {result.returncode}: {(result.stdout + result.stderr).strip()[-500:]}")
    return count / elapsed


def banner_from(port: int, timeout: float = 5.0) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(200)
    except OSError:
        return b""


def wait_for_banner(port: int, alive, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise PeerError(f"{what} exited while starting")
        if banner_from(port).startswith(b"220"):
            return
        time.sleep(0.1)
    raise PeerError(f"{what}: no 220 banner on 127.0.0.1:{port} after {timeout:.0f}s")


def retry_start(factory, what: str):
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return factory()
        except (PeerError, RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            if attempt == START_ATTEMPTS:
                raise PeerError(f"{what} did not start: {exc}") from exc
            print(f"({what} did not start, trying again on another port: {str(exc).splitlines()[0]})", flush=True)


def stop_process_group(process: subprocess.Popen, leader_pid: int, term_timeout: float = 10.0) -> None:
    """TERM `process`, wait, then KILL what is left of the process group it leads (by its id)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=term_timeout)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(leader_pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(leader_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.kill()
    process.wait()


class Sink:
    name = "smtp-sink"

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([find_program("smtp-sink"), "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_for_banner(self.port, lambda: self.process.poll() is None, 15, "smtp-sink")
        except PeerError:
            self.stop()
            raise PeerError(f"smtp-sink: {self.process.stderr.read().decode(errors='replace').strip()}") from None

    def count(self) -> int | None:
        return None

    def diagnose(self) -> str:
        return "" if self.process.poll() is None else f"smtp-sink exited with {self.process.returncode}"

    def stop(self) -> None:
        stop_process_group(self.process, self.process.pid)


class Mta:
    """mta-server started through the tests' harness, receiving only (queue_runners = 0)."""

    name = "mta-server"

    def __init__(self, workers: int, extra: str = "", name: str = "mta-server") -> None:
        self.name = name
        self.directory = bench_directory("mta")
        os.chmod(self.directory, 0o755)  # the workers drop root and must reach their spool
        self.port = free_port()
        self.server = MtaServer(self.directory, self.port, base_config(
            self.directory, self.port, f"smtp_accept_max = 2000\n{extra}", workers, 0, log_selector=""))
        self.output: collections.deque[str] = collections.deque(maxlen=50)
        try:
            self.server.start()
        except BaseException:
            self.stop()
            raise
        # The harness gives the server a pipe for stdout/stderr; drain it so that it never fills.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.server.process.stdout:
            self.output.append(line.decode(errors="replace").rstrip())

    def count(self) -> int:
        return len(self.server.spooled_ids())

    def diagnose(self) -> str:
        text = "\n".join(self.output)
        if self.server.process and self.server.process.poll() is not None:
            text += f"\nmta-server exited with {self.server.process.returncode}"
        main_log = "\n".join(self.server.log().splitlines()[-5:])
        return "\n".join([text, main_log, self.server.log("panic")[-2000:]]).strip()

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class HAProxyFront:
    """A second mta-server (hosts_proxy = 127.0.0.1) behind HAProxy, mode tcp, send-proxy-v2."""

    name = "mta+haproxy"

    def __init__(self, workers: int) -> None:
        haproxy = find_program("haproxy")
        if haproxy is None:
            raise PeerError("haproxy is not installed (`make test` installs it)")
        self.mta = retry_start(lambda: Mta(workers, "hosts_proxy = 127.0.0.1", self.name), "mta-server for haproxy")
        try:
            self.directory = bench_directory("haproxy")
            self.process = retry_start(lambda: self._start(haproxy), "haproxy")
        except BaseException:
            self.mta.stop()
            raise

    def _start(self, haproxy: str) -> subprocess.Popen:
        self.port = free_port()
        config = os.path.join(self.directory, "haproxy.cfg")
        with open(config, "w") as handle:
            handle.write(f"""global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend fe_bench
  bind 127.0.0.1:{self.port}
  default_backend be_bench
backend be_bench
  server mta 127.0.0.1:{self.mta.port} send-proxy-v2 maxconn 2000
""")
        check = subprocess.run([haproxy, "-c", "-f", config], capture_output=True, text=True)
        if check.returncode != 0:
            raise PeerError(f"haproxy -c: {check.stdout}{check.stderr}")
        self.log = open(os.path.join(self.directory, "haproxy.out"), "w+")
        process = subprocess.Popen([haproxy, "-db", "-f", config], stdout=self.log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            wait_for_banner(self.port, lambda: process.poll() is None, 15, "haproxy")
        except PeerError as exc:
            stop_process_group(process, process.pid)
            raise PeerError(f"{exc}: {self._log_tail()}") from None
        return process

    def _log_tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as handle:
            return handle.read()[-1500:]

    def count(self) -> int:
        return self.mta.count()

    def diagnose(self) -> str:
        text = self.mta.diagnose()
        log = self.mta.server.log()
        failures = [line for line in log.splitlines() if "PROXY" in line][-5:]
        if self.process.poll() is not None:
            text += f"\nhaproxy exited with {self.process.returncode}"
        return "\n".join([text, *failures, self._log_tail()]).strip()

    def stop(self) -> None:
        try:
            stop_process_group(self.process, self.process.pid)
            self.log.close()
            shutil.rmtree(self.directory, ignore_errors=True)
        finally:
            self.mta.stop()


def postfix_command(config: str, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run `postfix -c CONFIG ARGS` and return its exit status and what it said.

    Postfix commands write their errors to stderr only when it is a terminal
    (otherwise to syslog, which may not exist here: `postfix start` then fails
    silently), so stderr is given a pseudo-terminal.
    """
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([find_program("postfix"), "-c", config, *args], stdin=subprocess.DEVNULL,
                                   stdout=follower, stderr=follower, start_new_session=True)
    finally:
        os.close(follower)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    data = os.read(leader, 4096)
                except OSError:  # EIO: every copy of the terminal's other end is closed
                    data = b""
                if not data:
                    break
                output += data
            elif process.poll() is not None:
                break
            if time.monotonic() > deadline:
                process.kill()
                break
        returncode = process.wait(timeout=10)
    finally:
        os.close(leader)
    return returncode, output.decode(errors="replace").replace("\r\n", "\n").strip()


class Postfix:
    """A private Postfix instance that holds every message it accepts.

    Everything lives in one temporary directory: etc/ (main.cf, master.cf),
    queue/ and data/. `postfix -c etc check` creates the queue directories
    (post-install create-missing, touching only this instance's directories
    since shared files exist already) and validates the configuration; then
    the master runs in the foreground as this script's child, in its own
    session, and is stopped with TERM (what `postfix stop` sends).
    As root, no `alternate_config_directories` entry is needed in
    /etc/postfix/main.cf (Postfix trusts the configuration directory of a
    root caller), so the system configuration is never read for this
    instance's settings nor changed.
    """

    name = "postfix"

    def __init__(self) -> None:
        for program in ("postfix", "postconf"):
            if find_program(program) is None:
                raise PeerError(f"{program} not found (apt-get install postfix)")
        pwd.getpwnam("postfix")  # KeyError if Postfix's user is missing
        self.process: subprocess.Popen | None = None
        self.directory = bench_directory("postfix")
        # mkdtemp gives 0700; Postfix's daemons run as the postfix user and must traverse it.
        os.chmod(self.directory, 0o755)
        self.config = os.path.join(self.directory, "etc")
        self.queue = os.path.join(self.directory, "queue")
        self.maillog = os.path.join(self.directory, "maillog")
        os.makedirs(self.config)
        os.makedirs(self.queue)  # root-owned; post-install creates what is under it
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        with open(os.path.join(self.config, "main.cf"), "w") as handle:
            handle.write(f"""# private benchmark instance, written by bench/smtp_throughput.py
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.directory}/data
mail_owner = postfix
setgid_group = postdrop
multi_instance_enable = no
maillog_file_prefixes = {self.directory}
maillog_file = {self.maillog}
myhostname = postfix.bench
mydomain = bench
myorigin = $myhostname
mydestination = localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_end_of_data_restrictions = check_client_access static:hold
in_flow_delay = 0s
default_process_limit = 250
""")
        # Written out rather than copied from /etc/postfix/master.cf, which may be customised.
        # chroot off everywhere: the private instance has no chroot set up.
        with open(os.path.join(self.config, "master.cf"), "w") as handle:
            handle.write(f"""# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{self.port} inet n -       n       -       250     smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
smtp      unix  -       -       n       -       -       smtp
local     unix  -       n       n       -       -       local
postlog   unix-dgram n  -       n       -       1       postlogd
""")

    def _start(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            self._write_config()
            returncode, output = postfix_command(self.config, "check")
            if returncode != 0:
                raise PeerError(f"`postfix -c {self.config} check` exited with {returncode}: {output}\n{self._log_tail()}")
            daemon_directory = subprocess.run(["postconf", "-c", self.config, "-h", "daemon_directory"],
                                              capture_output=True, text=True, check=True).stdout.strip()
            # Without -d/-w the master stays in the foreground (it only calls setsid()), so it is our
            # child: its death is seen at once and TERM stops it and, through it, every daemon.
            environment = dict(os.environ, MAIL_CONFIG=self.config)
            self.process = subprocess.Popen([os.path.join(daemon_directory, "master"), "-c", self.config],
                                            env=environment, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for_banner(self.port, lambda: self.process.poll() is None, 30, "postfix master")
                return
            except PeerError as exc:
                stop_process_group(self.process, self.process.pid)
                self.process = None
                if attempt == START_ATTEMPTS:
                    raise PeerError(f"{exc}\n{self._log_tail()}") from None
                print(f"(Postfix did not start on port {self.port}, trying another: {exc})", flush=True)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.maillog, errors="replace") as handle:
                return "\n".join(handle.read().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no maillog)"

    def count(self) -> int:
        return sum(len(files) for _, _, files in os.walk(os.path.join(self.queue, "hold")))

    def diagnose(self) -> str:
        text = self._log_tail()
        if self.process is not None and self.process.poll() is not None:
            text += f"\npostfix master exited with {self.process.returncode}"
        return text

    def stop(self) -> None:
        try:
            if self.process is not None:
                stop_process_group(self.process, self.process.pid)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def measure(peer, sessions: int, size: int, count: int) -> float:
    before = peer.count()
    try:
        rate = run_source(peer.port, sessions, size, count)
    except PeerError as exc:
        raise PeerError(f"{exc}\n{peer.diagnose()}".strip()) from None
    if before is not None:
        # a message whose 250 was sent is on disk; allow a moment for a directory listing race
        for _ in range(20):
            arrived = peer.count() - before
            if arrived >= count:
                break
            time.sleep(0.1)
        if arrived != count:
            raise PeerError(f"{arrived} of {count} messages arrived\n{peer.diagnose()}".strip())
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts (0.1 for a quick run)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="mta-server's smtp_workers")
    parser.add_argument("--through-haproxy", action="store_true",
                        help="also measure mta-server behind HAProxy (send-proxy-v2, hosts_proxy = 127.0.0.1)")
    parser.add_argument("--no-postfix", action="store_true", help="leave the private Postfix instance out")
    parser.add_argument("--plot", metavar="FILE.png", help="draw messages/s against sessions for each peer")
    args = parser.parse_args()
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: .venv/bin/pip install 'matplotlib>=3.7' (or -e '.[bench]')")
    if os.geteuid() != 0:
        print("(not root: mta-server keeps running as this user, and the private Postfix cannot start)")

    settle_file_system()
    peers: dict[str, object] = {}
    skipped: dict[str, str] = {}
    failures: dict[tuple[str, str], str] = {}
    results: dict[tuple[str, str], list[float]] = {}
    try:
        starters = [("mta-server", lambda: Mta(args.workers)), ("smtp-sink", Sink)]
        if not args.no_postfix:
            starters.append(("postfix", Postfix))
        if args.through_haproxy:
            starters.append(("mta+haproxy", lambda: HAProxyFront(args.workers)))
        for name, factory in starters:
            try:
                peers[name] = retry_start(factory, name) if name != "mta+haproxy" else factory()
            except (PeerError, KeyError) as exc:
                if name in ("mta-server", "smtp-sink"):
                    raise
                skipped[name] = str(exc)
                print(f"({name} not measured: {exc})", flush=True)
        print("peers: " + ", ".join(f"{name} on 127.0.0.1:{peer.port}" for name, peer in peers.items()), flush=True)

        sessions, size, count = WARMUP
        for name, peer in list(peers.items()):
            try:
                measure(peer, sessions, size, max(sessions, int(count * min(1.0, args.scale * 2))))
            except PeerError as exc:
                failures[("warm-up", name)] = str(exc)
                print(f"warm-up {name}: FAILED: {exc}", flush=True)

        names = list(peers)
        for round_number in range(args.rounds):
            for case_number, (label, sessions, size, count) in enumerate(CASES):
                count = max(sessions, int(count * args.scale))
                shift = (round_number + case_number) % len(names)
                for name in names[shift:] + names[:shift]:
                    if any(key[1] == name for key in failures):
                        continue  # a peer that failed once is not trusted again
                    try:
                        rate = measure(peers[name], sessions, size, count)
                    except PeerError as exc:
                        failures[(label, name)] = str(exc)
                        print(f"round {round_number + 1} {label:>11} {name:>11}: FAILED: {exc}", flush=True)
                        continue
                    results.setdefault((label, name), []).append(rate)
                    print(f"round {round_number + 1} {label:>11} {name:>11}: {rate:8.0f} msg/s"
                          f"  ({count} messages)", flush=True)
    finally:
        for name, peer in reversed(list(peers.items())):
            try:
                peer.stop()
            except Exception as exc:  # keep stopping the others
                print(f"(stopping {name}: {exc})", file=sys.stderr)

    print_table(results, list(peers), args.rounds)
    for name, reason in skipped.items():
        print(f"\n{name} was not measured: {reason}")
    for (label, name), reason in failures.items():
        print(f"\n{name} failed at {label}: {reason}")
    if args.plot:
        plot(results, list(peers), args.plot)
        print(f"\nplot written to {args.plot}")
    return 1 if failures or ("postfix" in skipped) else 0


def print_table(results, names, rounds: int) -> None:
    def best(label: str, name: str) -> float | None:
        values = results.get((label, name))
        return max(values) if values else None

    def ratio(top: float | None, bottom: float | None, width: int) -> str:
        return f"{top / bottom:{width}.2f}" if top and bottom else f"{'n/a':>{width}}"

    print(f"\nmessages/s, best of {rounds} round(s); every stored message counted on arrival")
    header = f"{'case':>11} " + " ".join(f"{name:>11}" for name in names)
    header += "   mta/sink  mta/postfix  target"
    if "mta+haproxy" in names:
        header += "  haproxy/direct"
    print(header)
    for label, *_ in CASES:
        figures = {name: best(label, name) for name in names}
        line = f"{label:>11} " + " ".join(f"{figures[name]:11.0f}" if figures[name] else f"{'-':>11}"
                                          for name in names)
        mta = figures.get("mta-server")
        line += f"   {ratio(mta, figures.get('smtp-sink'), 8)}  {ratio(mta, figures.get('postfix'), 11)}"
        line += f"  {TARGETS[label]:5.1f}x"
        if "mta+haproxy" in names:
            line += f"  {ratio(figures.get('mta+haproxy'), mta, 14)}"
        print(line)
    print("(target: the mta-server / Postfix ratio aimed at)")


def plot(results, names, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    colours = {}
    for name in names:
        points = [(sessions, max(results[(label, name)])) for label, sessions, size, _ in CASES
                  if size == 1024 and results.get((label, name))]
        if points:
            line, = axes.plot(*zip(*points), marker="o", label=f"{name}, 1 KiB")
            colours[name] = line.get_color()
    for name in names:
        for label, sessions, size, _ in CASES:
            if size != 1024 and results.get((label, name)):
                axes.plot([sessions], [max(results[(label, name)])], marker="s", linestyle="none",
                          fillstyle="none", markersize=9, color=colours.get(name), label=f"{name}, 100 KiB")
    axes.set_xscale("log")
    axes.set_xticks([1, 20, 100])
    axes.set_xticklabels(["1", "20", "100"])
    axes.minorticks_off()
    axes.set_xlabel("concurrent sessions (smtp-source -s)")
    axes.set_ylabel("messages/s (best of rounds)")
    axes.set_ylim(bottom=0)
    axes.set_title("Receive throughput, one connection per message")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except KeyboardInterrupt as interruption:
        print(f"\ninterrupted ({interruption or 'SIGINT'}); every peer was stopped", file=sys.stderr)
        sys.exit(130)

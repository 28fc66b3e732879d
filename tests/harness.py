"""Start the real server as a subprocess on free loopback ports, for tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msgpack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The connect ACL of Exim's "Proxies" chapter, verbatim; its LIMIT macro is set by each user.
CHAPTER_CONNECT_ACL = """\
acl_check_connect:
  defer   message        = Too many connections from this IP right now
          ratelimit      = LIMIT / 5s / per_conn / strict
  accept
"""


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def find_program(name: str) -> str | None:
    for folder in ("/usr/sbin", "/usr/bin", "/usr/lib/postfix/sbin", "/usr/local/bin", "/usr/local/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


@dataclass
class MtaServer:
    directory: str
    port: int
    config_text: str
    process: subprocess.Popen | None = None
    config_path: str = ""
    extra_ports: dict[str, int] = field(default_factory=dict)

    @property
    def spool(self) -> str:
        return os.path.join(self.directory, "spool")

    @property
    def input(self) -> str:
        return os.path.join(self.spool, "input")

    def log(self, kind: str = "main") -> str:
        try:
            with open(os.path.join(self.spool, "log", f"{kind}log"), encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 10.0, kind: str = "main") -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            log = self.log(kind)
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the {kind} log after {timeout}s:\n{self.log(kind)[-3000:]}")

    def write_config(self) -> None:
        self.config_path = os.path.join(self.directory, "mta.conf")
        with open(self.config_path, "w") as handle:
            handle.write(self.config_text)

    def start(self, wait: bool = True) -> "MtaServer":
        self.write_config()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "start", "--foreground", "-C", self.config_path],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if wait:
            self.wait_until_serving()
        return self

    def wait_until_serving(self, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace")
                raise RuntimeError(f"mta-server exited with {self.process.returncode}:\n{output}\n{self.log('panic')}")
            if len(self.worker_statuses("smtp")) >= 1 and self._accepts():
                return
            time.sleep(0.05)
        raise TimeoutError("mta-server did not start serving")

    def _accepts(self) -> bool:
        try:
            # from an address no test lists in hosts_proxy, so no PROXY header is due
            with socket.create_connection(("127.0.0.1", self.port), timeout=2,
                                          source_address=("127.0.0.254", 0)) as sock:
                sock.settimeout(5)
                return sock.recv(100).startswith(b"220")
        except OSError:
            return False

    def master_status(self) -> dict:
        try:
            with open(os.path.join(self.spool, "run", "master.status"), "rb") as handle:
                return msgpack.unpackb(handle.read(), raw=False)
        except (OSError, ValueError):
            return {}

    def worker_statuses(self, kind: str | None = None) -> list[dict]:
        statuses = []
        for worker in self.master_status().get("workers", []):
            if kind and worker["kind"] != kind:
                continue
            try:
                with open(worker["status_path"], "rb") as handle:
                    statuses.append(msgpack.unpackb(handle.read(), raw=False))
            except (OSError, ValueError):
                continue
        return statuses

    def worker_pids(self, kind: str) -> list[int]:
        return [w["pid"] for w in self.master_status().get("workers", []) if w["kind"] == kind and not w["retiring"]]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "workers.cli", *args, "-C", self.config_path],
            cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )

    def spooled_ids(self) -> list[str]:
        try:
            return sorted(name[:-2] for name in os.listdir(self.input) if name.endswith("-H"))
        except FileNotFoundError:
            return []

    def signal_master(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def kill_all(self) -> None:
        """SIGKILL the master and every worker (its process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


LOCAL_DELIVERY = """
begin routers
local_user:
  driver = accept
  domains = +local_domains
  transport = local_delivery

begin transports
local_delivery:
  driver = appendfile
  directory = mail/$local_part
  maildir_format
"""
"""Routers and transports for maildir delivery under the config's folder."""


def base_config(directory: str, port: int, extra: str = "", workers: int = 2, runners: int = 0,
                log_selector: str = "+smtp_connection") -> str:
    return f"""
primary_hostname = mta.test
local_interfaces = 127.0.0.1
daemon_smtp_ports = {port}
spool_directory = {directory}/spool
{"" if "log_selector" in extra else "log_selector = " + log_selector}
domainlist local_domains = localhost : mta.test
smtp_workers = {workers}
queue_runners = {runners}
shutdown_timeout = 5s
{extra}
"""

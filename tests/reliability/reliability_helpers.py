"""What the reliability tests share: a local-delivery configuration, load,
and the bookkeeping that says what was acknowledged, delivered and spooled."""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

from harness import LOCAL_DELIVERY as DELIVERY_SECTIONS, find_program

LOCAL_DELIVERY = "queue_run_interval = 1s\n" + DELIVERY_SECTIONS

ACKED = re.compile(r"<<< 250 OK id=(\S+)")
RECEIVED_ID = re.compile(rb"\tid (\S+?)(?:;|\r?\n)")
ARRIVAL = re.compile(r"^\S+ \S+ (\S+) <= ", re.MULTILINE)
DELIVERY = re.compile(r"^\S+ \S+ (\S+) => \S+ <([^>]+)>", re.MULTILINE)


def wait_until(predicate, timeout: float, interval: float = 0.1):
    """Poll `predicate` until it returns something true or `timeout` passes."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value or time.time() > deadline:
            return value
        time.sleep(interval)


# -------------------------------------------------------------------- load

class SmtpSourceLoad:
    """smtp-source -v in the background; its transcript names every message
    that got `250 OK id=...`.  Restarted when it gives up (a killed worker
    ends its sessions), until `stop`."""

    def __init__(self, port: int, output_path: str, sessions: int = 8, recipients: int = 2,
                 messages: int = 200, length: int = 2048) -> None:
        self.command = [find_program("smtp-source"), "-v", "-s", str(sessions), "-m", str(messages),
                        "-r", str(recipients), "-l", str(length), "-f", "load@example.org",
                        "-t", "rcpt@localhost", f"127.0.0.1:{port}"]
        self.output_path = output_path
        self.runs = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> "SmtpSourceLoad":
        self.runs += 1
        with open(self.output_path, "ab") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT)
        return self

    def keep_going(self) -> None:
        """Start another run if the last one has ended."""
        if self.process.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)

    def acked(self) -> set[str]:
        with open(self.output_path, encoding="utf-8", errors="replace") as handle:
            return set(ACKED.findall(handle.read()))


# -------------------------------------------------------------------- accounting

@dataclass
class Ledger:
    acked: set[str]                       # ids the client saw 250 for
    logged: set[str]                      # ids with a `<=` line (committed)
    delivered: collections.Counter        # (id, recipient) -> copies in the maildirs
    logged_deliveries: collections.Counter  # (id, recipient) -> `=>` lines
    spooled: set[str]                     # ids still in the spool

    @property
    def lost(self) -> set[str]:
        """Committed messages neither delivered (to anyone) nor spooled."""
        delivered_ids = {message_id for message_id, _ in self.delivered}
        return (self.acked | self.logged) - delivered_ids - self.spooled

    @property
    def duplicates(self) -> dict[tuple[str, str], int]:
        return {key: count for key, count in self.delivered.items() if count > 1}

    @property
    def logged_twice(self) -> dict[tuple[str, str], int]:
        return {key: count for key, count in self.logged_deliveries.items() if count > 1}


def maildir_deliveries(mail_root: str) -> collections.Counter:
    """(message id, recipient) -> number of copies in mail_root/<local part>/new."""
    copies: collections.Counter = collections.Counter()
    if not os.path.isdir(mail_root):
        return copies
    for local_part in os.listdir(mail_root):
        folder = os.path.join(mail_root, local_part, "new")
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as handle:
                match = RECEIVED_ID.search(handle.read(4096))
            copies[(match.group(1).decode() if match else "?", f"{local_part}@localhost")] += 1
    return copies


def ledger(server, acked: set[str]) -> Ledger:
    log = server.log()
    return Ledger(
        acked=acked,
        logged=set(ARRIVAL.findall(log)),
        delivered=maildir_deliveries(os.path.join(server.directory, "mail")),
        logged_deliveries=collections.Counter(DELIVERY.findall(log)),
        spooled=set(server.spooled_ids()),
    )


def wait_for_empty_queue(server, timeout: float = 60.0) -> bool:
    return bool(wait_until(lambda: not server.spooled_ids(), timeout, interval=0.2))


# -------------------------------------------------------------------- processes

def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def peak_rss_kib(pid: int) -> int:
    """The process's resident-set high-water mark (VmHWM), in KiB."""
    return int(proc_status(pid)["VmHWM"].split()[0])

"""Receive throughput: smtp-source against mta-server, smtp-sink and Postfix.

Every peer is measured in the same run, interleaved round by round, so a
busy machine slows them alike; the figures that matter are the ratios.
mta-server runs with every 250 fsynced and no queue runner (so delivery
does not compete); Postfix is configured by this script on a spare loopback
port to put every message on hold (received and fsynced, never delivered).

    python bench/smtp_throughput.py [--rounds 2] [--scale 1.0] [--through-haproxy]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from harness import MtaServer, base_config, find_program, free_port, wait_for_port  # noqa: E402

# (label, sessions, message size, messages) — enough messages for several seconds each.
CASES = [("1 KiB x1", 1, 1024, 2000), ("1 KiB x20", 20, 1024, 10000),
         ("1 KiB x100", 100, 1024, 10000), ("100 KiB x20", 20, 100 * 1024, 3000)]
# Measured by the author on this kind of machine (msg/s), for reference.
TARGETS = {"1 KiB x1": 1.2, "1 KiB x20": 2.0, "1 KiB x100": 2.0, "100 KiB x20": 1.5}


def run_source(port: int, sessions: int, size: int, count: int) -> float:
    source = find_program("smtp-source")
    started = time.perf_counter()
    result = subprocess.run([source, "-s", str(sessions), "-m", str(count), "-l", str(size),
                             "-f", "bench@example.org", "-t", "user@localhost", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed against port {port}: {result.stdout}{result.stderr}")
    return count / elapsed


class Sink:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([find_program("smtp-sink"), "-u", "nobody", "-c",
                                         f"127.0.0.1:{self.port}", "1024"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)

    def count(self) -> int | None:
        return None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class Mta:
    def __init__(self, workers: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="bench-mta-")
        self.port = free_port()
        self.server = MtaServer(self.directory, self.port, base_config(
            self.directory, self.port, "smtp_accept_max = 2000", workers, 0, log_selector=""))
        self.server.start()

    def count(self) -> int:
        return len(self.server.spooled_ids())

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class Postfix:
    """A private Postfix instance that holds every message it accepts."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="bench-postfix-")
        self.port = free_port()
        config, queue = os.path.join(self.directory, "etc"), os.path.join(self.directory, "queue")
        os.makedirs(config)
        os.makedirs(queue)
        os.makedirs(os.path.join(self.directory, "data"))
        shutil.chown(os.path.join(self.directory, "data"), "postfix")
        with open(os.path.join(config, "main.cf"), "w") as handle:
            handle.write(f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {self.directory}/data
mail_owner = postfix
myhostname = postfix.bench
mydestination = localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
smtpd_end_of_data_restrictions = check_client_access static:hold
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
smtpd_peername_lookup = no
disable_dns_lookups = yes
smtp_dns_support_level = disabled
maillog_file = {self.directory}/maillog
""")
        master = subprocess.run(["postconf", "-M"], capture_output=True, text=True).stdout
        services = [_without_chroot(line) for line in master.splitlines() if not line.startswith(("smtp ", "smtp\t"))]
        with open(os.path.join(config, "master.cf"), "w") as handle:
            handle.write(f"127.0.0.1:{self.port} inet n - n - - smtpd\n")
            handle.write("smtp unix - - n - - smtp\n")
            handle.write("\n".join(services) + "\n")
        self.config = config
        subprocess.run(["postfix", "-c", config, "post-install", "create-missing"], check=True, capture_output=True)
        subprocess.run(["postfix", "-c", config, "start"], check=True, capture_output=True)
        wait_for_port("127.0.0.1", self.port, timeout=30)
        self.queue = queue

    def count(self) -> int:
        return sum(len(files) for _, _, files in os.walk(os.path.join(self.queue, "hold")))

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", self.config, "stop"], capture_output=True)
        time.sleep(1)
        shutil.rmtree(self.directory, ignore_errors=True)


def _without_chroot(service: str) -> str:
    """master.cf line with chroot off (the private instance has no chroot set up)."""
    fields = service.split()
    if len(fields) >= 8:
        fields[4] = "n"
    return " ".join(fields)


def postfix_available() -> bool:
    return shutil.which("postfix") is not None or os.path.exists("/usr/sbin/postfix")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    peers = {"mta-server": Mta(args.workers), "smtp-sink": Sink()}
    if postfix_available():
        try:
            peers["postfix"] = Postfix()
        except (subprocess.CalledProcessError, TimeoutError) as exc:
            print(f"(Postfix not measured: {exc})")
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for round_number in range(args.rounds):
            for label, sessions, size, count in CASES:
                count = max(sessions, int(count * args.scale))
                for name, peer in peers.items():
                    before = peer.count()
                    rate = run_source(peer.port, sessions, size, count)
                    after = peer.count()
                    if before is not None and after - before != count:
                        raise RuntimeError(f"{name}: {after - before} of {count} messages arrived")
                    results.setdefault((label, name), []).append(rate)
                    print(f"round {round_number + 1} {label:>12} {name:>10}: {rate:8.0f} msg/s", flush=True)
    finally:
        for peer in peers.values():
            peer.stop()
    print_table(results, list(peers))
    return 0


def print_table(results, names) -> None:
    print("\nmessages/s (best of rounds); every message counted on arrival where the peer stores it")
    header = f"{'case':>12} " + " ".join(f"{name:>11}" for name in names) + "   mta/sink  mta/postfix  target"
    print(header)
    for label, *_ in CASES:
        best = {name: max(results.get((label, name), [0])) for name in names}
        mta = best["mta-server"]
        line = f"{label:>12} " + " ".join(f"{best[name]:11.0f}" for name in names)
        line += f"   {mta / best['smtp-sink']:8.2f}"
        line += f"  {mta / best['postfix']:11.2f}" if best.get("postfix") else "          n/a"
        line += f"  {TARGETS[label]:5.1f}x"
        print(line)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())

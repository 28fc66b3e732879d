"""How fast could any Python SMTP front end go on top of our spool?

A minimal gevent responder (the SMTP verbs answered blindly, the data found
by a bytes search, no policy, no log) runs as the same number of forked
processes as mta-server's workers, in three modes:

- `bare`: nothing stored; the cost of gevent, the sockets and smtp-source.
- `spool`: each message stored through `mta.spool` and the `GroupCommitter`
  exactly as mta-server stores it (two files, rename, syncfs batches, the
  lone session committed inline) before its 250.
- `onefile`: the same committer, but Postfix's layout: envelope and data
  in one file, marked complete by its mode before the batch's sync, no
  rename.  What a one-file spool format would gain over ours.

mta-server and the private Postfix of `smtp_throughput.py` are measured
in the same run, one peer after the other in each round, each warmed up
first.  `spool` is the ceiling for mta-server with its storage design:
what separates the two is our SMTP logic; what separates `spool` from
`bare` is the storage; `spool/postfix` is the best mta-server / Postfix
ratio that any SMTP code above this spool could reach, `onefile/postfix`
the same above a one-file spool.

    python bench/spool_ceiling.py [--rounds 2] [--workers 2]

Needs smtp-source and Postfix, as `make bench` does (run that once first).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import socket
import subprocess
import sys
import time

import gevent
import gevent.socket

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smtp_throughput import (  # noqa: E402
    WARMUP, Mta, PeerError, Postfix, bench_directory, measure, settle_file_system, stop_process_group,
    wait_for_banner)

from harness import free_port  # noqa: E402  (smtp_throughput puts tests/ and the repository on the path)
from mta.committer import GroupCommitter  # noqa: E402
from mta.message_id import MessageIdSource  # noqa: E402
from mta.spool import Envelope, IncomingMessage, Spool, write_all  # noqa: E402

CASES = [("1 KiB x1", 1, 1024, 2000), ("1 KiB x20", 20, 1024, 10000)]
ONE_FILE_SUFFIX = "M"
MODES = ("bare", "onefile", "spool")


class OneFileMessage(IncomingMessage):
    """Postfix's queue-file layout, for comparison only: a length-prefixed
    envelope, then the data, in one file whose mode (0700) says it is
    complete; the batch's syncfs makes it durable, as it does ours."""

    def write_out(self) -> None:
        self._data_fd = os.open(self.spool.path(self.id, ONE_FILE_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                0o600)
        write_all(self._data_fd, len(self._envelope).to_bytes(4, "big") + self._envelope + self._pending)
        os.fchmod(self._data_fd, 0o700)

    def publish(self) -> None:
        """Nothing to rename: the mode set in `write_out` marks the file complete."""


class Responder:
    """The minimal responder, started as `--serve` in a child process group."""

    def __init__(self, mode: str, workers: int) -> None:
        self.name = mode
        self.directory = bench_directory(mode)
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", mode, str(self.port), self.directory, str(workers)],
            start_new_session=True)
        try:
            wait_for_banner(self.port, lambda: self.process.poll() is None, 15, mode)
        except PeerError:
            self.stop()
            raise

    def count(self) -> int | None:
        if self.name == "bare":
            return None
        spool = Spool(os.path.join(self.directory, "spool"))
        if self.name == "onefile":
            return sum(name.endswith(f"-{ONE_FILE_SUFFIX}") for name in os.listdir(spool.input))
        return len(spool.message_ids())

    def diagnose(self) -> str:
        return "" if self.process.poll() is None else f"{self.name} exited with {self.process.returncode}"

    def stop(self) -> None:
        try:
            stop_process_group(self.process, self.process.pid)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def serve(mode: str, port: int, directory: str, workers: int) -> None:
    """Fork `workers` gevent processes that share one listener; wait for them."""
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            _worker(mode, listener, os.path.join(directory, "spool"))
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def _worker(mode: str, listener: socket.socket, spool_directory: str) -> None:
    spool = Spool(spool_directory)
    spool.create_directories()
    connections = collections.Counter()
    committer = GroupCommitter(spool, "syncfs", alone=lambda: connections["open"] <= 1)
    ids = MessageIdSource(os.getpid())

    def store(data: bytes, peer: tuple) -> str:
        """What mta-server does with a message once its data has arrived."""
        envelope = Envelope(id=ids.next_id(), sender="bench@example.org", recipients=["user@localhost"],
                            received_time=time.time(), host_address=peer[0], host_port=peer[1], helo="ceiling")
        message = (OneFileMessage if mode == "onefile" else IncomingMessage)(spool, envelope.id)
        message.write(data)
        envelope.size = message.size
        message.finish(envelope)
        committer.commit(message)
        return envelope.id

    storage = None if mode == "bare" else store
    server_socket = gevent.socket.socket(fileno=os.dup(listener.fileno()))
    while True:
        sock, peer = server_socket.accept()
        gevent.spawn(_session, sock, peer, storage, connections)


def _session(sock, peer, store, connections) -> None:
    connections["open"] += 1
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"220 ceiling ESMTP\r\n")
        buffer = b""
        in_data = False
        while True:
            received = sock.recv(65536)
            if not received:
                return
            buffer += received
            while True:
                if in_data:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    message_id = store(buffer[:end + 2], peer) if store else "bare"
                    buffer, in_data = buffer[end + 5:], False
                    sock.sendall(f"250 OK id={message_id}\r\n".encode())
                    continue
                end = buffer.find(b"\n")
                if end < 0:
                    break
                verb, buffer = buffer[:4].upper(), buffer[end + 1:]
                if verb == b"QUIT":
                    sock.sendall(b"221 bye\r\n")
                    return
                in_data = verb == b"DATA"
                sock.sendall({b"DATA": b"354 go ahead\r\n", b"EHLO": b"250-ceiling\r\n250 PIPELINING\r\n"}
                             .get(verb, b"250 OK\r\n"))
    finally:
        connections["open"] -= 1
        sock.close()


def measure_all(rounds: int, workers: int) -> dict[tuple[str, str], float]:
    factories = [*(lambda mode=mode: Responder(mode, workers) for mode in MODES), lambda: Mta(workers), Postfix]
    best: dict[tuple[str, str], float] = {}
    for round_number in range(1, rounds + 1):
        for factory in factories:
            peer = factory()
            try:
                measure(peer, *WARMUP)
                for label, sessions, size, count in CASES:
                    rate = measure(peer, sessions, size, count)
                    print(f"round {round_number} {label:>9} {peer.name:>10}: {rate:8.0f} msg/s", flush=True)
                    best[(label, peer.name)] = max(rate, best.get((label, peer.name), 0.0))
            finally:
                peer.stop()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--serve", nargs=4, metavar=("MODE", "PORT", "DIR", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        mode, port, directory, workers = args.serve
        serve(mode, int(port), directory, int(workers))
        return
    settle_file_system()
    best = measure_all(args.rounds, args.workers)
    print(f"\nmessages/s, best of {args.rounds} round(s)")
    print(f"{'case':>11} {'bare':>8} {'onefile':>8} {'spool':>8} {'mta-server':>11} {'postfix':>8}"
          f" {'spool/bare':>11} {'mta/spool':>10} {'onefile/postfix':>16} {'spool/postfix':>14} {'mta/postfix':>12}")
    for label, *_ in CASES:
        bare, onefile, spool, mta, postfix = (
            best[(label, name)] for name in (*MODES, "mta-server", "postfix"))
        print(f"{label:>11} {bare:8.0f} {onefile:8.0f} {spool:8.0f} {mta:11.0f} {postfix:8.0f}"
              f" {spool / bare:11.2f} {mta / spool:10.2f} {onefile / postfix:16.2f} {spool / postfix:14.2f}"
              f" {mta / postfix:12.2f}")


if __name__ == "__main__":
    main()

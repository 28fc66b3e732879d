"""Delivery throughput: spooled messages delivered to Postfix's smtp-sink,
directly and through a Dante SOCKS5 proxy, in the same run.

Each case spools N messages (not timed), then times one Deliverer with a
gevent pool of `--parallel` greenlets delivering them all, exactly as a queue
runner does (lock, route, SMTP with connection reuse, journal fsync, log,
removal with a directory fsync).  Cases are interleaved round by round so a
busy machine slows them alike; the ratio is what matters.

    .venv/bin/python bench/delivery.py [--messages 2000] [--parallel 16] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import gevent.pool  # noqa: E402

from delivery_support import make_deliverer, smarthost_config, spool_message  # noqa: E402
from harness import find_program, free_port, wait_for_port  # noqa: E402
from mta.delivery import COMPLETED  # noqa: E402
from socks_servers import start_danted  # noqa: E402

BODY = b"".join(b"Line %d of a benchmark message body, about one kilobyte in all.\r\n" % n
                for n in range(15))


def config(sink_port: int, socks_proxy: str, connection_max: int) -> str:
    return "remote_max_parallel = 16\n" + smarthost_config(
        f"127.0.0.1::{sink_port}", f"  connection_max = {connection_max}\n  socks_proxy = {socks_proxy}")


def run_case(workdir: str, sink_port: int, socks_proxy: str, messages: int, parallel: int,
             connection_max: int) -> float:
    """Messages per second for one case (spooling not timed)."""
    directory = tempfile.mkdtemp(dir=workdir)
    deliverer, spool, _ = make_deliverer(directory, config(sink_port, socks_proxy, connection_max))
    ids = [spool_message(spool, "bench@example.org", [f"user{n % 50}@example.net"], body=BODY)
           for n in range(messages)]
    pool = gevent.pool.Pool(parallel)
    started = time.perf_counter()
    results = pool.map(deliverer.deliver, ids)
    elapsed = time.perf_counter() - started
    deliverer.close()
    failed = len(results) - results.count(COMPLETED)
    if failed:
        raise RuntimeError(f"{failed} of {messages} messages not delivered ({socks_proxy or 'direct'})")
    shutil.rmtree(directory)
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-delivery-")
    sink_port = free_port()
    sink = subprocess.Popen([find_program("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dante = start_danted(workdir, auth=False)
    try:
        wait_for_port("127.0.0.1", sink_port)
        proxy = f"127.0.0.1 port={dante.port}"
        cases = [("direct", "", 500), ("via Dante", proxy, 500),
                 ("direct, no reuse", "", 1), ("via Dante, no reuse", proxy, 1)]
        rates: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        for _ in range(args.rounds):
            for label, socks_proxy, connection_max in cases:
                rates[label].append(run_case(workdir, sink_port, socks_proxy, args.messages,
                                             args.parallel, connection_max))
    finally:
        dante.stop()
        sink.terminate()
        sink.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rates, args)


def print_table(rates: dict[str, list[float]], args: argparse.Namespace) -> None:
    best = {label: max(values) for label, values in rates.items()}
    print(f"{args.messages} messages of {len(BODY) // 1024 + 1} KiB, {args.parallel} in parallel, "
          f"best of {args.rounds} rounds, to smtp-sink")
    print(f"{'case':<22}{'msg/s':>10}{'vs direct':>12}   rounds")
    for label, value in best.items():
        base = best["direct" if "no reuse" not in label else "direct, no reuse"]
        runs = " ".join(f"{v:.0f}" for v in rates[label])
        print(f"{label:<22}{value:>10.0f}{value / base:>11.2f}x   {runs}")


if __name__ == "__main__":
    main()

"""Ratelimit checks per second: the shared table under N processes versus a
plain dict in one process.

Each check is what the connect ACL does for the chapter's example
``5 / 5s / per_conn / strict`` (parsed once): new per-connection cache,
then :func:`mta.ratelimit.check`, i.e. evaluate() inside table.update().
strict mode writes the record on every check, the worst case.

    .venv/bin/python bench/ratelimit.py [--procs N] [--checks C] [--keys K]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mta.ratelimit import ConnectionCache, DictRateStore, check, parse_ratelimit  # noqa: E402
from shared.ratetable import RateTable  # noqa: E402

SPEC_TEXT = "5 / 5s / per_conn / strict"


def run_checks(store, keys: list[str], checks: int, offset: int) -> None:
    """``checks`` ratelimit checks cycling over ``keys``."""
    spec = parse_ratelimit(SPEC_TEXT, "connect")
    cache = ConnectionCache()
    n_keys = len(keys)
    for index in range(checks):
        cache.new_connection()
        check(store, cache, spec, default_key=keys[(index + offset) % n_keys],
              now=time.time(), count=1.0)


def in_processes(store, keys: list[str], checks: int, procs: int) -> float:
    """Wall-clock seconds for ``procs`` forked processes doing ``checks`` each,
    started together."""
    start_read, start_write = os.pipe()
    pids = []
    for worker in range(procs):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(start_write)
                os.read(start_read, 1)
                run_checks(store, keys, checks, worker * 7919)
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    os.close(start_read)
    time.sleep(0.1)
    started = time.perf_counter()
    os.write(start_write, b"g" * procs)
    os.close(start_write)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise RuntimeError(f"benchmark workers failed: {failed}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--checks", type=int, default=100_000, help="per process")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--slots", type=int, default=65_536)
    parser.add_argument("--repeat", type=int, default=3, help="report the best run")
    args = parser.parse_args()

    print(f"ratelimit = {SPEC_TEXT}; {args.checks} checks per process, "
          f"best of {args.repeat}")
    print(f"{'keys':>8} {'store':<22} {'procs':>5} {'checks/s':>12} {'us/check':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for n_keys in (1, args.keys):
            keys = [f"192.0.{i // 256 % 256}.{i % 256}" if n_keys > 1 else "192.0.2.1"
                    for i in range(n_keys)]
            seconds = min(in_processes(DictRateStore(), keys, args.checks, 1)
                          for _ in range(args.repeat))
            report(n_keys, "dict, one process", 1, args.checks, seconds)
            for procs in sorted({1, args.procs}):
                table = RateTable.create(os.path.join(tmp, f"t{n_keys}.{procs}"), args.slots)
                seconds = min(in_processes(table, keys, args.checks, procs)
                              for _ in range(args.repeat))
                report(n_keys, "RateTable (mmap+fcntl)", procs, args.checks * procs, seconds)
                table.close()


def report(n_keys: int, store: str, procs: int, checks: int, seconds: float) -> None:
    rate = checks / seconds
    print(f"{n_keys:>8} {store:<22} {procs:>5} {rate:>12,.0f} {1e6 / rate * procs:>9.2f}")


if __name__ == "__main__":
    main()

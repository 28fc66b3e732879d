"""ACL checks per second, in process, and what ACLs cost end to end.

In process: a connection's policy runs the chapter's connect ACL
(`ratelimit = 5 / 5s / per_conn / strict` in the shared mmap table, one new
client address per connection) and a typical RCPT ACL (hosts, domains,
local_parts, a nested ACL) for each recipient; the baseline is the built-in
local-domains rule.  With --smtp, smtp-source sends through two real servers,
with and without those ACLs, measured in turn round by round.

    .venv/bin/python bench/acl.py [--checks N] [--smtp [--messages M] [--rounds R]]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from harness import CHAPTER_CONNECT_ACL, MtaServer, base_config, find_program, free_port  # noqa: E402
from mta.acl import AclPolicy, AclServices, compile_acls  # noqa: E402
from mta.config import load_config  # noqa: E402
from mta.lists import DomainList  # noqa: E402
from mta.log import Logs  # noqa: E402
from mta.lookups import LookupCache  # noqa: E402
from mta.policy import LocalDomainsPolicy  # noqa: E402
from mta.smtp_session import ConnectionInfo, Limits, SmtpSession, Transaction  # noqa: E402
from shared.ratetable import RateTable  # noqa: E402

ACLS = """
LIMIT = 5
acl_smtp_connect = acl_check_connect
acl_smtp_rcpt = acl_check_rcpt
hostlist relay_from_hosts = 10.0.0.0/8 : 192.168.0.0/16
begin acl
""" + CHAPTER_CONNECT_ACL + """\
acl_check_rcpt:
  accept  hosts = :
  deny    local_parts = ^[.] : ^.*[@%!/|]
  accept  local_parts = postmaster
          domains = +local_domains
  require acl = known_sender
  accept  domains = +local_domains
  accept  hosts = +relay_from_hosts
  deny    message = relay not permitted
known_sender:
  deny    senders = *@spam.example
  accept
"""
LIMITS = Limits("mta.test", 10_000_000, 1000, 3, False, "mta.test")


def policies(directory: str, acl_text: str):
    path = os.path.join(directory, "bench.conf")
    with open(path, "w") as handle:
        handle.write(f"primary_hostname = mta.test\nspool_directory = {directory}/spool\n"
                     f"domainlist local_domains = localhost : mta.test\n{acl_text}")
    config = load_config(path)
    table = RateTable.create(os.path.join(directory, "ratelimit"), 65536)
    services = AclServices(table, Logs(config.log_file_path, config.log_selector), LookupCache())
    fallback = LocalDomainsPolicy(DomainList("+local_domains", config.compiled_lists, "mta.test"))
    acls = compile_acls(config)
    return lambda: AclPolicy(acls, services, fallback)


def per_second(make_policy, checks: int) -> tuple[float, float]:
    """(connect checks/s, RCPT checks/s) over `checks` connections of one RCPT each."""
    connect_time = rcpt_time = 0.0
    for index in range(checks):
        address = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
        session = SmtpSession(ConnectionInfo(address, 4000, "127.0.0.1", 25), LIMITS, make_policy())
        started = time.perf_counter()
        session.policy.check("connect", session)
        middle = time.perf_counter()
        session.helo, session.transaction = "c.example", Transaction("a@example.org")
        session.current_recipient = "user@localhost"
        session.policy.check("rcpt", session)
        rcpt_time += time.perf_counter() - middle
        connect_time += middle - started
    return checks / connect_time, checks / rcpt_time


def start_server(directory: str, extra: str) -> MtaServer:
    os.makedirs(directory)
    port = free_port()
    return MtaServer(directory, port, base_config(directory, port, extra, workers=2,
                                                  log_selector="-tls_cipher")).start()


def smtp_rate(port: int, messages: int) -> float:
    started = time.perf_counter()
    subprocess.run([find_program("smtp-source"), "-s", "20", "-m", str(messages), "-l", "1024",
                    "-f", "bench@example.org", "-t", "user@localhost", f"127.0.0.1:{port}"],
                   check=True, capture_output=True, timeout=600)
    return messages / (time.perf_counter() - started)


def compare_smtp(directory: str, messages: int, rounds: int) -> tuple[float, float]:
    """Median msg/s (with ACLs, without), the two servers measured in turn."""
    # smtp-source connects from 127.0.0.1 for every message: give it a high limit
    with_acls = start_server(os.path.join(directory, "a"), ACLS.replace("LIMIT = 5", "LIMIT = 100000"))
    without = start_server(os.path.join(directory, "b"), "")
    try:
        rates: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            rates[0].append(smtp_rate(with_acls.port, messages))
            rates[1].append(smtp_rate(without.port, messages))
        return statistics.median(rates[0]), statistics.median(rates[1])
    finally:
        with_acls.stop()
        without.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=20000)
    parser.add_argument("--smtp", action="store_true", help="also run smtp-source with and without ACLs")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        connect, rcpt = per_second(policies(directory, ACLS), args.checks)
        _, baseline = per_second(policies(directory, ""), args.checks)
        print(f"connect ACL (ratelimit in shared table): {connect:10.0f} checks/s")
        print(f"RCPT ACL (hosts, local_parts, nested):   {rcpt:10.0f} checks/s")
        print(f"RCPT without ACL (local_domains rule):   {baseline:10.0f} checks/s")
        if args.smtp:
            with_acls, without = compare_smtp(directory, args.messages, args.rounds)
            print(f"smtp-source 1 KiB x20 (median of {args.rounds}): {with_acls:.0f} msg/s with ACLs, "
                  f"{without:.0f} msg/s without")


if __name__ == "__main__":
    main()

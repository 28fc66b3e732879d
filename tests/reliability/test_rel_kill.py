"""kill -9 under smtp-source load: nothing acknowledged is lost.

Every message that got `250 OK id=` (smtp-source -v transcript) and every
message with a `<=` line must end up in a maildir or still be in the spool
after the server has been restarted (if it had to be) and the queue drained.
A recipient may be delivered twice only if its first delivery was in flight
at the moment of the kill: it then has at most one `=>` line, and there are
at most `remote_max_parallel` x recipients-per-message of them per runner killed.
"""
from __future__ import annotations

import collections
import os
import signal
import time

from reliability_helpers import LOCAL_DELIVERY, SmtpSourceLoad, ledger, wait_for_empty_queue, wait_until

RECIPIENTS = 2
PARALLEL = 8
CONFIG = f"remote_max_parallel = {PARALLEL}\n" + LOCAL_DELIVERY
KILLS = 2


def load_through(server, load: SmtpSourceLoad, kill, kills: int = KILLS) -> None:
    """Kill (via `kill()`) `kills` times while the load runs, then stop the load."""
    for _ in range(kills):
        before = len(load.acked())
        assert wait_until(lambda: load.keep_going() or len(load.acked()) >= before + 40, 30), \
            "the load made no progress"
        kill()
        deadline = time.time() + 1.0
        while time.time() < deadline:
            load.keep_going()
            time.sleep(0.1)
    load.stop()


def check_nothing_lost(server, load: SmtpSourceLoad, report, fault: str, runners_killed: int) -> None:
    assert wait_for_empty_queue(server), f"queue not drained: {server.spooled_ids()[:5]}"
    books = ledger(server, load.acked())
    in_flight_bound = runners_killed * PARALLEL * RECIPIENTS
    duplicates = sum(count - 1 for count in books.duplicates.values())
    kept_unacked = {message_id for message_id, _ in books.delivered} - books.acked
    print(f"\n{fault}: {len(books.acked)} acknowledged, {len(books.logged)} logged, "
          f"{sum(books.delivered.values())} delivered, {duplicates} duplicate deliveries (in flight), "
          f"{len(kept_unacked)} delivered without a 250 seen")
    report(fault, "smtp-source -s 8 -r 2 under kill -9", f"{KILLS} kills, {len(books.acked)} msgs acked",
           len(books.lost), f"{duplicates} rcpt dup. (in flight); {len(kept_unacked)} delivered w/o 250")
    assert books.acked <= books.logged, "a 250 was sent for a message without a <= line"
    assert books.lost == set()
    assert books.logged_twice == {}, "a recipient logged as delivered was delivered again"
    assert duplicates <= in_flight_bound
    recipients = collections.Counter(message_id for message_id, _ in books.delivered)
    assert set(recipients.values()) <= {RECIPIENTS}, "a message lost a recipient"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def first_worker(server, kind: str) -> int:
    pids = wait_until(lambda: server.worker_pids(kind), 10)
    assert pids, f"no {kind} worker"
    return pids[0]


def test_kill_smtp_worker_under_load(mta, tmp_path, report):
    server = mta(CONFIG, workers=2, runners=1)
    load = SmtpSourceLoad(server.port, str(tmp_path / "load.txt")).start()

    def kill() -> None:
        os.kill(first_worker(server, "smtp"), signal.SIGKILL)

    load_through(server, load, kill)
    server.wait_for_log("smtp worker", kind="panic")
    check_nothing_lost(server, load, report, "kill -9 SMTP worker", runners_killed=0)


def test_kill_queue_runner_under_load(mta, tmp_path, report):
    server = mta(CONFIG, workers=2, runners=1)
    load = SmtpSourceLoad(server.port, str(tmp_path / "load.txt")).start()

    def kill() -> None:
        runner = first_worker(server, "delivery")
        os.kill(runner, signal.SIGKILL)
        assert wait_until(lambda: server.worker_pids("delivery") not in ([], [runner]), 15)

    load_through(server, load, kill)
    check_nothing_lost(server, load, report, "kill -9 queue runner", runners_killed=KILLS)


def test_kill_master_under_load(mta, tmp_path, report):
    server = mta(CONFIG, workers=2, runners=1)
    load = SmtpSourceLoad(server.port, str(tmp_path / "load.txt")).start()

    def kill() -> None:
        workers = server.worker_pids("smtp") + server.worker_pids("delivery")
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 10), "workers outlived the master"
        server.start()

    load_through(server, load, kill)
    check_nothing_lost(server, load, report, "kill -9 master (all)", runners_killed=KILLS)

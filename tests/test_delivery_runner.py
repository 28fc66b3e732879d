"""Queue runners as real processes: `workers.delivery.serve` in subprocesses
sharing one spool, fed by spool scans and by `{"queued": id}` datagrams.

Run as a script (`python test_delivery_runner.py CONFIG INDEX INBOX_FD`) this
file is the runner process the tests start.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import gevent
import msgpack

from delivery_support import SmtpRecorder, main_log, spool_message, wait_until, write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runner_config(port: int, interval: str = "1s", parallel: int = 4) -> str:
    return f"""
queue_run_interval = {interval}
remote_max_parallel = {parallel}
begin routers
smarthost:
  driver = manualroute
  route_list = * 127.0.0.1::{port}
  transport = remote_smtp
begin transports
remote_smtp:
  driver = smtp
  command_timeout = 10s
begin retry
* * F,1h,1s
"""


class Runner:
    """A queue runner subprocess with its notification socket."""

    def __init__(self, config_path: str, index: int) -> None:
        self.notify, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.process = subprocess.Popen(
            [sys.executable, __file__, config_path, str(index), str(inbox.fileno())],
            pass_fds=[inbox.fileno()], cwd=REPO,
            env=dict(os.environ, PYTHONPATH=f"{REPO}:{os.path.dirname(__file__)}"))
        inbox.close()

    def queued(self, message_id: str) -> None:
        self.notify.send(msgpack.packb({"queued": message_id}))

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        while self.process.poll() is None and time.time() < deadline:
            gevent.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
        self.notify.close()
        return self.process.wait()


def setup(tmp_path, port: int, **options):
    from mta.config import load_config
    from mta.log import Logs
    from mta.spool import Spool

    path = write_config(tmp_path, runner_config(port, **options))
    config = load_config(path)
    spool = Spool(config.spool_directory)
    spool.create_directories()
    return path, spool, Logs(config.log_file_path, config.log_selector)


def test_two_runners_never_deliver_a_message_twice(tmp_path):
    recorder = SmtpRecorder(data_reply=lambda data: gevent.sleep(0.005)).start()
    path, spool, logs = setup(tmp_path, recorder.port, interval="0.2")
    ids = [spool_message(spool, "a@example.org", [f"r{n}@example.net"]) for n in range(60)]
    runners = [Runner(path, 1), Runner(path, 2)]
    try:
        wait_until(lambda: spool.message_ids() == [])
    finally:
        codes = [runner.stop() for runner in runners]
        recorder.stop()
    assert codes == [0, 0]
    assert sorted(recorder.recipients()) == sorted(f"r{n}@example.net" for n in range(60))
    log = main_log(logs)
    assert all(log.count(f"{message_id} Completed") == 1 for message_id in ids)
    pids = {line.split()[2] for line in log.splitlines() if " => " in line}
    assert len(pids) == 2, "both runners should have delivered some messages"


def test_notification_is_delivered_at_once(tmp_path):
    recorder = SmtpRecorder().start()
    path, spool, logs = setup(tmp_path, recorder.port, interval="1h")
    runner = Runner(path, 1)
    try:
        gevent.sleep(0.5)  # the runner's first scan finds an empty spool
        message_id = spool_message(spool, "a@example.org", ["now@example.net"])
        started = time.time()
        runner.queued(message_id)
        wait_until(lambda: f"{message_id} Completed" in main_log(logs), timeout=5)
        assert time.time() - started < 3
    finally:
        assert runner.stop() == 0
        recorder.stop()
    assert recorder.recipients() == ["now@example.net"]


def test_runner_killed_mid_delivery_loses_nothing(tmp_path):
    calls = []

    def stall_first(data):
        calls.append(time.time())
        if len(calls) == 1:
            gevent.sleep(3)
            return "451 4.3.0 too late"
        return None

    recorder = SmtpRecorder(data_reply=stall_first).start()
    path, spool, logs = setup(tmp_path, recorder.port, interval="0.3")
    message_id = spool_message(spool, "a@example.org", ["once@example.net"])
    first = Runner(path, 1)
    try:
        wait_until(lambda: calls, timeout=10)
        first.process.kill()
        first.process.wait()
        second = Runner(path, 2)
        try:
            wait_until(lambda: f"{message_id} Completed" in main_log(logs), timeout=10)
        finally:
            assert second.stop() == 0
    finally:
        first.stop()
        recorder.stop()
    assert recorder.recipients() == ["once@example.net"]
    assert main_log(logs).count(" => once@example.net") == 1


def test_graceful_stop_finishes_the_delivery_in_flight(tmp_path):
    recorder = SmtpRecorder(data_reply=lambda data: gevent.sleep(1)).start()
    path, spool, logs = setup(tmp_path, recorder.port)
    message_id = spool_message(spool, "a@example.org", ["slow@example.net"])
    runner = Runner(path, 1)
    try:
        wait_until(lambda: "DATA" in recorder.commands, timeout=10)
        started = time.time()
        assert runner.stop() == 0
        assert time.time() - started >= 0.5
    finally:
        recorder.stop()
    assert f"{message_id} Completed" in main_log(logs)
    assert recorder.commands[-1] == "QUIT"


def run_runner(config_path: str, index: int, inbox_fd: int) -> None:
    """The body of a runner subprocess (what the master's child would do)."""
    from mta.config import load_config
    from mta.log import Logs
    from workers.context import SharedState, WorkerContext
    from workers.delivery import serve

    config = load_config(config_path)
    logs = Logs(config.log_file_path, config.log_selector | {"pid"})
    logs.set_process(os.getpid())
    inbox = socket.socket(fileno=inbox_fd)
    ctx = WorkerContext("delivery", index, 1, config, logs, SharedState(), runner_inboxes=[inbox] * index)
    gevent.signal_handler(signal.SIGTERM, ctx.stopping.set)
    serve(ctx)


if __name__ == "__main__":
    run_runner(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

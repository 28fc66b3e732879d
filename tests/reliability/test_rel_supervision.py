"""The master restarts a worker that keeps dying, with growing back-off, and
stops with a clear error when the configuration makes every worker fail."""
from __future__ import annotations

import os
import re
import signal
import time

from harness import MtaServer, base_config, free_port
from reliability_helpers import wait_until
from test_smtp_server import send_one

DEATHS = 3


def test_worker_dying_in_a_loop_is_respawned_with_growing_back_off(mta, report):
    server = mta(workers=1)
    killed: list[int] = []
    for _ in range(DEATHS):
        pids = wait_until(lambda: [pid for pid in server.worker_pids("smtp") if pid not in killed], 20)
        assert pids, "the worker was not respawned"
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])
    delays = [float(d) for d in re.findall(r"respawning smtp worker 1 in ([\d.]+)s",
                                          server.wait_for_log(f"respawning smtp worker 1 in {2 ** (DEATHS - 1)}s"))]
    assert delays == [2.0 ** n for n in range(DEATHS)]
    assert wait_until(lambda: [pid for pid in server.worker_pids("smtp") if pid not in killed], 20)
    assert send_one(server.port).startswith("250 OK id=")
    report("worker dies in a loop", "kill -9 the SMTP worker as soon as it is back", DEATHS, 0,
           "back-off " + ", ".join(f"{d:g}s" for d in delays) + "; serves after")


def start_failing(tmp_path, name: str, extra: str) -> MtaServer:
    port = free_port()
    directory = str(tmp_path / name)
    os.makedirs(directory)
    server = MtaServer(directory, port, base_config(directory, port, extra))
    server.start(wait=False)
    return server


def test_every_worker_failing_at_start_stops_the_master_with_the_reason(tmp_path, report):
    (tmp_path / "cert.pem").write_text("not a certificate")
    server = start_failing(tmp_path, "bad-cert",
                           f"tls_certificate = {tmp_path}/cert.pem\ntls_privatekey = {tmp_path}/cert.pem")
    started = time.time()
    try:
        assert server.process.wait(timeout=30) == 3
    finally:
        server.kill_all()
    panic = server.log("panic")
    assert "failed to start: cannot load tls_certificate/tls_privatekey" in panic
    assert "could not start; stopping" in panic
    assert "respawning" not in server.log()
    report("every worker fails at start", "a tls_certificate that is not one", 1, 0,
           f"master exits 3 after {time.time() - started:.1f}s, reason in panic log")


def test_unknown_exim_user_is_refused_before_any_worker(tmp_path):
    server = start_failing(tmp_path, "bad-user", "exim_user = no-such-user-here")
    try:
        assert server.process.wait(timeout=30) != 0
    finally:
        server.kill_all()
    assert 'exim_user "no-such-user-here" does not exist' in server.process.stdout.read().decode()

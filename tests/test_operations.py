"""Operating the real server: reloads under load through HAProxy, hostlist
files re-read on reload, invalid configurations, TTIN/TTOU, `status`."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness import REPO, find_program
from mta.proxy_protocol import build_v1
from test_proxy_integration import HAPROXY, HAProxy
from test_smtp_server import send_one

SMTP_SOURCE = find_program("smtp-source")
BANNER = "smtp_banner = $primary_hostname ESMTP h=$sender_host_address"


def wait_for(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met after {timeout}s")


def settled(server) -> bool:
    """Every worker belongs to the current generation: no old one still accepts."""
    master = server.master_status()
    workers = master.get("workers", [])
    return bool(workers) and all(w["generation"] == master["generation"] and not w["retiring"] for w in workers)


def reload_and_settle(server, generation: int) -> None:
    result = server.cli("reload")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: server.master_status().get("generation") == generation, what=f"generation {generation}")
    wait_for(lambda: settled(server), what="old workers gone")


def banner_host(port: int, source: str) -> tuple[str, str]:
    """Connect from `source`, send a PROXY v1 header naming 192.0.2.33 at once;
    (the address the banner names, the reply to whatever followed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(build_v1("TCP4", "192.0.2.33", "192.0.2.1", 40000, 25) + b"NOOP\r\n")
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    banner, reply = data.decode().split("\r\n")[:2]
    return banner.rsplit("h=", 1)[1], reply


@pytest.mark.skipif(HAPROXY is None or SMTP_SOURCE is None, reason="needs haproxy and smtp-source (make test)")
def test_ten_reloads_under_load_through_haproxy_lose_nothing(mta, tmp_path):
    proxies = tmp_path / "proxies"
    proxies.write_text("# HAProxy\n127.0.0.1\n")
    server = mta(f"hosts_proxy = {proxies}\nproxy_protocol_timeout = 2s\n{BANNER}",
                 workers=2)
    haproxy = HAProxy(str(tmp_path), {"lb": f"127.0.0.1:{server.port} send-proxy-v2"})
    messages = 600  # 50 sessions at once, each waiting 1s between messages: about 12s of load
    try:
        load = subprocess.Popen([SMTP_SOURCE, "-s", "50", "-m", str(messages), "-w", "1", "-l", "1024",
                                 "-f", "a@example.org", "-t", "user@localhost", f"127.0.0.1:{haproxy.ports['lb']}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert banner_host(server.port, "127.0.0.3") == ("127.0.0.3", "500 5.5.1 Unrecognized command")
        for generation in range(2, 12):
            if generation == 5:
                proxies.write_text("127.0.0.1\n127.0.0.3\n")
            if generation == 8:
                proxies.write_text("127.0.0.1\n")
            reload_and_settle(server, generation)
            if generation in (5, 7):
                assert banner_host(server.port, "127.0.0.3") == ("192.0.2.33", "250 2.0.0 OK")
            if generation == 8:
                assert banner_host(server.port, "127.0.0.3") == ("127.0.0.3", "500 5.5.1 Unrecognized command")
        assert load.poll() is None, "the load ended before the tenth reload"
        output, _ = load.communicate(timeout=120)
    finally:
        haproxy.stop()
    assert load.returncode == 0, output
    wait_for(lambda: len(server.spooled_ids()) >= messages, timeout=5, what="every message spooled")
    assert len(server.spooled_ids()) == messages
    assert "configuration reloaded" in server.log() and "(generation 11)" in server.log()
    assert "PROXY protocol failure" not in server.log()


def test_invalid_configuration_names_its_line_and_the_old_one_serves(mta, tmp_path):
    proxies = tmp_path / "proxies"
    proxies.write_text("127.0.0.2\n")
    server = mta(f"hosts_proxy = {proxies}")
    with open(server.config_path) as handle:
        option_line = next(number for number, line in enumerate(handle, 1) if line.startswith("hosts_proxy"))
    proxies.write_text("127.0.0.2\n10.0.0.0/99\n")
    result = server.cli("reload")
    assert result.returncode == 1
    assert (f'{server.config_path}:{option_line}: hosts_proxy: in {proxies}: '
            'malformed IP address or network "10.0.0.0/99"') in result.stderr
    assert server.master_status()["generation"] == 1  # the CLI checks before it signals

    with open(server.config_path, "a") as handle:
        handle.write("no_such_option = 1\n")
    bad_line = sum(1 for _ in open(server.config_path))
    server.signal_master(signal.SIGHUP)  # past the CLI's check: the master must refuse it itself
    panic = server.wait_for_log("reload failed", kind="panic")
    assert f"still running the previous configuration: {server.config_path}:{bad_line}: " \
           'main option "no_such_option" unknown' in panic
    assert server.master_status()["generation"] == 1
    assert send_one(server.port).startswith("250")


def test_ttin_and_ttou_change_the_number_of_smtp_workers(mta):
    server = mta(workers=1)

    def smtp_workers(count: int) -> None:
        wait_for(lambda: len(server.worker_pids("smtp")) == count and
                 len(server.worker_statuses("smtp")) == count, what=f"{count} SMTP workers")

    for _ in range(2):
        server.signal_master(signal.SIGTTIN)
        time.sleep(0.2)
    smtp_workers(3)
    status = server.cli("status").stdout
    assert "smtp workers: 3 (smtp_workers = 1, TTIN/TTOU to change)" in status
    assert status.count(" smtp ") == 3
    server.signal_master(signal.SIGTTOU)
    smtp_workers(2)
    for _ in range(3):  # never below one
        server.signal_master(signal.SIGTTOU)
        time.sleep(0.2)
    smtp_workers(1)
    server.wait_for_log("SIGTTOU ignored: 1 SMTP worker(s) is the limit")
    assert send_one(server.port).startswith("250")
    assert "smtp workers: 1 " in server.cli("status").stdout


def test_reload_keeps_the_ttin_workers(mta):
    server = mta(workers=1)
    server.signal_master(signal.SIGTTIN)
    wait_for(lambda: len(server.worker_pids("smtp")) == 2, what="2 SMTP workers")
    reload_and_settle(server, 2)
    assert len(server.worker_pids("smtp")) == 2


def test_status_without_a_server(tmp_path):
    from harness import MtaServer, base_config, free_port

    server = MtaServer(str(tmp_path), free_port(), base_config(str(tmp_path), 2525))
    server.write_config()
    result = server.cli("status")
    assert result.returncode == 3 and "not running" in result.stdout
    assert os.path.exists(server.config_path)


def test_systemd_notifications_ready_reloading_stopping(mta, tmp_path, monkeypatch):
    """Type=notify: the master reports to the datagram socket in $NOTIFY_SOCKET."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        server = mta()
        assert listener.recv(256) == b"READY=1"
        assert len(server.worker_pids("smtp")) == 2  # ready means serving
        server.signal_master(signal.SIGHUP)
        assert listener.recv(256) == b"RELOADING=1"
        assert listener.recv(256) == b"READY=1"
        server.stop()
        assert listener.recv(256) == b"STOPPING=1"
    finally:
        listener.close()


def test_notify_addresses():
    from workers.notify import notify_address

    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract/name") == b"\0abstract/name"
    assert notify_address("") is None and notify_address("relative") is None and notify_address("@") is None


def test_status_right_after_a_detached_start_describes_the_new_master(mta):
    """The previous master's status file (generation 2 here) stays behind
    when it stops; the new master replaces it before `start` returns."""
    server = mta(workers=1)
    reload_and_settle(server, 2)
    assert server.stop() == 0
    started = server.cli("start")
    try:
        assert started.returncode == 0, started.stderr
        pid = int(started.stdout.rsplit("pid ", 1)[1])
        status = server.cli("status")
        assert status.stdout.startswith(f"master pid {pid}, generation 1, up "), status.stdout
    finally:
        assert server.cli("stop").returncode == 0


def test_status_into_a_closed_pipe_ends_quietly(mta):
    """As in `mta-server status | head -1`, but with the reader gone before
    the first write, so that the write always fails."""
    server = mta(workers=1)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "workers.cli", "status", "-C", server.config_path],
                                cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, "")

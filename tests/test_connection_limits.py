"""Connection limits across workers, on the real client behind a proxy."""
import time

from mta.proxy_protocol import build_v1
from test_smtp_server import Client


def proxied(port: int, client_ip: str, client_port: int) -> Client:
    client = Client(port)
    client.send(build_v1("TCP4", client_ip, "192.0.2.1", client_port, 25))
    return client


def test_per_host_limit_counts_the_real_client_across_workers(mta):
    server = mta("hosts_proxy = 127.0.0.1\nsmtp_accept_max_per_host = 2", workers=2)
    held = [proxied(server.port, "198.51.100.7", 1000 + i) for i in range(2)]
    assert all(client.reply().startswith("220") for client in held)
    refused = proxied(server.port, "198.51.100.7", 1003)
    assert refused.reply().startswith("421 Too many concurrent SMTP connections from this IP address")
    other = proxied(server.port, "198.51.100.8", 1004)
    assert other.reply().startswith("220")
    server.wait_for_log("refused: too many connections from that IP address", kind="reject")
    for client in held:
        client.command("QUIT")
    time.sleep(0.3)
    again = proxied(server.port, "198.51.100.7", 1005)
    assert again.reply().startswith("220")


def test_per_proxy_limit_counts_the_tcp_peer(mta):
    server = mta("hosts_proxy = 127.0.0.1\nsmtp_accept_max_per_proxy = 3", workers=2)
    held = [proxied(server.port, f"198.51.100.{i}", 2000) for i in range(1, 4)]
    assert all(client.reply().startswith("220") for client in held)
    refused = proxied(server.port, "198.51.100.9", 2000)
    assert refused.reply().startswith("421 Too many concurrent SMTP connections from this proxy")
    direct = Client(server.port, source="127.0.0.6")  # not a proxy: not counted against it
    assert direct.reply().startswith("220")


def test_global_limit_and_counts_return_to_zero(mta):
    server = mta("smtp_accept_max = 4", workers=2)
    held = [Client(server.port, source="127.0.0.7") for _ in range(4)]
    assert all(client.reply().startswith("220") for client in held)
    assert Client(server.port, source="127.0.0.7").reply().startswith("421 Too many concurrent SMTP connections")
    for client in held:
        client.close()
    deadline = time.time() + 5
    while time.time() < deadline:
        time.sleep(0.2)
        fresh = Client(server.port, source="127.0.0.7")
        if fresh.reply().startswith("220"):
            break
    time.sleep(1.2)
    assert sum(s["stats"].get("connections", 0) for s in server.worker_statuses("smtp")) <= 1


def test_dead_worker_does_not_leak_counts(mta):
    import os
    import signal
    server = mta("hosts_proxy = 127.0.0.1\nsmtp_accept_max_per_host = 1", workers=2)
    held = proxied(server.port, "198.51.100.20", 3000)
    assert held.reply().startswith("220")
    assert proxied(server.port, "198.51.100.20", 3001).reply().startswith("421")
    time.sleep(1.2)
    busy = [s["pid"] for s in server.worker_statuses("smtp") if s["stats"].get("connections")]
    os.kill(busy[0], signal.SIGKILL)
    assert held.closed()
    server.wait_for_log("killed by signal 9", kind="panic")
    time.sleep(1.5)
    assert proxied(server.port, "198.51.100.20", 3002).reply().startswith("220")

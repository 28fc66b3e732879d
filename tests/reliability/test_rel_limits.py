"""Connection limits under a flood across all workers.

`smtp_accept_max`, `smtp_accept_max_per_host` (the real client, from the
PROXY header) and `smtp_accept_max_per_proxy` (the TCP peer) are never
exceeded while hundreds of connections arrive at once on two workers, and
the counts return to zero when the flood ends: the same flood again is
admitted just as far.
"""
from __future__ import annotations

import collections
import socket
import time

from mta.proxy_protocol import build_v1
from reliability_helpers import wait_until


def flood(port: int, arrivals: list[tuple[str, str | None]]) -> list[tuple[socket.socket, str, str]]:
    """Open one connection per (TCP source, real client or None) at once;
    then read each one's first reply.  Returns (socket, real client, reply)."""
    opened = []
    for source, client in arrivals:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0))
        if client is not None:
            sock.sendall(build_v1("TCP4", client, "192.0.2.1", 40000 + len(opened), 25))
        opened.append((sock, client or source))
    return [(sock, client, _first_line(sock)) for sock, client in opened]


def _first_line(sock: socket.socket) -> str:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def admitted(results) -> list[tuple[socket.socket, str, str]]:
    return [result for result in results if result[2].startswith("220")]


def close_all(results) -> None:
    for sock, _, _ in results:
        sock.close()


def open_connections(server) -> int:
    return sum(s["stats"].get("connections", 0) for s in server.worker_statuses("smtp"))


def drained(server) -> bool:
    """Every worker's count at zero (status files are rewritten each second)."""
    time.sleep(1.1)
    return wait_until(lambda: open_connections(server) == 0, 5)


def test_global_limit_holds_under_a_flood_and_recovers(mta, report):
    limit, arrivals = 50, 300
    server = mta(f"smtp_accept_max = {limit}", workers=2)
    rounds = []
    for _ in range(2):
        results = flood(server.port, [("127.0.0.5", None)] * arrivals)
        accepted = admitted(results)
        assert len(accepted) <= limit
        assert all(reply.startswith("421 Too many concurrent") for _, _, reply in results
                   if not reply.startswith("220"))
        time.sleep(1.2)
        busy_workers = sum(1 for s in server.worker_statuses("smtp") if s["stats"].get("connections"))
        assert open_connections(server) == len(accepted)
        close_all(results)
        assert drained(server), "connection counts did not return to zero"
        rounds.append((len(accepted), busy_workers))
    assert rounds[1][0] >= limit - 2, "the second flood was admitted less far: counts leaked"
    report("flood vs smtp_accept_max", f"{arrivals} conns at once, limit {limit}, 2 workers, twice",
           2 * arrivals, 0, f"admitted {rounds[0][0]} then {rounds[1][0]}; counts back to 0")


def test_per_host_and_per_proxy_limits_hold_under_a_flood(mta, report):
    per_host, per_proxy, clients = 3, 20, 10
    proxies = ["127.0.0.1", "127.0.0.2"]
    server = mta(f"hosts_proxy = {' : '.join(proxies)}\nsmtp_accept_max_per_host = {per_host}\n"
                 f"smtp_accept_max_per_proxy = {per_proxy}", workers=2)
    waves = [[(proxy, f"198.51.100.{1 + i % clients}") for i in range(100)] for proxy in proxies]
    rounds = []
    for _ in range(2):
        # One proxy's flood, then the other's, the first one's admitted
        # connections held open meanwhile: the first proxy then fills up
        # (per-proxy refusals) and the second meets clients already at
        # their limit (per-host refusals).  Flooded together, either kind
        # could go missing, limits holding all the same, when one worker
        # fell behind and the other admitted the second proxy's
        # connections first.
        results = [result for wave in waves for result in flood(server.port, wave)]
        accepted = admitted(results)
        per_client = collections.Counter(client for _, client, _ in accepted)
        per_peer = collections.Counter(sock.getsockname()[0] for sock, _, _ in accepted)
        refusals = collections.Counter(reply.split(" from ")[-1] for _, _, reply in results
                                       if not reply.startswith("220"))
        assert max(per_client.values()) <= per_host, per_client
        assert max(per_peer.values()) <= per_proxy, per_peer
        assert len(per_client) == clients, "some real client was not admitted at all"
        assert set(refusals) == {"this proxy; please try again later.", "this IP address; please try again later."}
        close_all(results)
        assert drained(server), "connection counts did not return to zero"
        rounds.append(len(accepted))
    assert rounds[1] >= rounds[0] - 2, "the second flood was admitted less far: counts leaked"
    arrivals = sum(len(wave) for wave in waves)
    report("flood vs per_host/per_proxy", f"{arrivals} PROXY conns, {clients} clients via 2 proxies, twice",
           2 * arrivals, 0,
           f"admitted {rounds[0]} then {rounds[1]} (<= {per_host}/client, {per_proxy}/proxy)")

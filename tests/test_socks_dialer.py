"""The SOCKS5 dialer against real danted and microsocks, and the shared proxy pool."""

import os
import time

import gevent
import pytest
from gevent.server import StreamServer

from shared.proxypool import MAX_BACKOFF, ProxyPool
from shared.socks5 import ProxySpec
from shared.socks_dialer import SocksDialError, dial
from socks_servers import (
    MICROSOCKS_PASSWORD, MICROSOCKS_USER, TEST_PASSWORD, TEST_USER, closed_port,
    start_banner_server, start_danted, start_microsocks, start_silent_listener,
)

BANNER = b"220 test\r\n"


@pytest.fixture(scope="module")
def banner():
    server = start_banner_server(BANNER)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def banner6():
    server = start_banner_server(BANNER, host="::1")
    yield server
    server.stop()


def _started(servers, server):
    servers.append(server)
    return server


@pytest.fixture(scope="module")
def proxies(tmp_path_factory, banner):
    """The real proxies, started once for the module."""
    tmp = tmp_path_factory.mktemp("socks")
    servers = []
    yield {
        "danted_auth": _started(servers, start_danted(tmp, auth=True)),
        "danted_none": _started(servers, start_danted(tmp, auth=False)),
        "danted_block": _started(servers, start_danted(tmp, auth=False, block_port=banner.port)),
        "micro_auth": _started(servers, start_microsocks(auth=True, log_dir=tmp)),
        "micro_none": _started(servers, start_microsocks(auth=False, log_dir=tmp)),
    }
    for server in servers:
        server.stop()


@pytest.fixture
def silent():
    server = start_silent_listener()
    yield server
    server.stop()


def spec(server, **options) -> ProxySpec:
    return ProxySpec(server.host, server.port, **options)


def danted_auth(proxies, password=TEST_PASSWORD, **options):
    return spec(proxies["danted_auth"], auth="name", name=TEST_USER, password=password, **options)


def micro_auth(proxies, password=MICROSOCKS_PASSWORD, **options):
    return spec(proxies["micro_auth"], auth="name", name=MICROSOCKS_USER, password=password, **options)


def dead_proxy(**options) -> ProxySpec:
    return ProxySpec("127.0.0.1", closed_port(), **options)


def read_banner(sock) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(100)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def assert_talks_to_banner(result, banner):
    assert read_banner(result.sock) == BANNER
    result.sock.sendall(b"EHLO me\r\n")
    assert read_banner(result.sock) == b"EHLO me\r\n"


def row(pool, proxy):
    [found] = [r for r in pool.snapshot() if (r["ip"], r["port"]) == proxy.key]
    return found


# ------------------------------------------------------------------ each real proxy


def test_danted_username_auth(proxies, banner):
    pool = ProxyPool.create()
    proxy = danted_auth(proxies)
    with dial([proxy], "127.0.0.1", banner.port, deadline=5, pool=pool) as result:
        assert_talks_to_banner(result, banner)
        assert result.proxy == proxy and result.attempts == []
        # danted reports the address it connects from; the destination saw that very peer
        assert (result.bound_address, result.bound_port) == banner.peers[-1][:2]
        assert row(pool, proxy) | {"down_until": 0} == {
            "ip": "127.0.0.1", "port": proxy.port, "dials": 1, "failures": 0, "in_use": 1,
            "state": "up", "fail_streak": 0, "down_until": 0}
    assert row(pool, proxy)["in_use"] == 0
    assert result.sock.fileno() == -1


def test_danted_no_auth(proxies, banner):
    with dial([spec(proxies["danted_none"])], "127.0.0.1", banner.port, deadline=5) as result:
        assert_talks_to_banner(result, banner)
        assert result.bound_address == "127.0.0.1"


def test_microsocks_with_and_without_auth(proxies, banner):
    for proxy in (micro_auth(proxies), spec(proxies["micro_none"])):
        with dial([proxy], "127.0.0.1", banner.port, deadline=5) as result:
            assert_talks_to_banner(result, banner)
            assert (result.bound_address, result.bound_port) == ("0.0.0.0", 0)


def test_banner_is_not_held_by_delayed_ack(proxies, banner):
    """microsocks has Nagle on: unless we ACK its reply at once, the banner waits ~40 ms."""
    proxy = spec(proxies["micro_none"])
    times = []
    for _ in range(5):
        started = time.monotonic()
        with dial([proxy], "127.0.0.1", banner.port, deadline=5) as result:
            assert read_banner(result.sock) == BANNER
        times.append(time.monotonic() - started)
    assert sorted(times)[2] < 0.02


def test_ipv6_destination(proxies, banner6):
    with dial([spec(proxies["micro_none"])], "::1", banner6.port, deadline=5) as result:
        assert_talks_to_banner(result, banner6)
    assert banner6.peers[-1][0] == "::1"


# ------------------------------------------------------------------ failover


def test_failover_from_dead_higher_priority_proxy(proxies, banner):
    pool = ProxyPool.create()
    dead, good = dead_proxy(pri=5), spec(proxies["danted_none"], pri=1)
    with dial([good, dead], "127.0.0.1", banner.port, deadline=5, pool=pool) as result:
        assert_talks_to_banner(result, banner)
        assert result.proxy == good
        assert [(p, r) for p, r in result.attempts] == \
            [(dead, "connect to proxy failed: Connection refused")]
    assert pool.is_down(dead) and not pool.is_down(good)
    assert (row(pool, dead)["dials"], row(pool, dead)["failures"]) == (1, 1)
    assert row(pool, dead)["state"] == "down" and row(pool, dead)["down_until"] > time.time()


@pytest.mark.parametrize("which,status", [("danted", "0x01"), ("micro", "0x02")])
def test_wrong_password_fails_over(proxies, banner, which, status):
    pool = ProxyPool.create()
    wrong = (danted_auth if which == "danted" else micro_auth)(proxies, password="wrong", pri=2)
    good = spec(proxies["danted_none"])
    with dial([wrong, good], "127.0.0.1", banner.port, deadline=5, pool=pool) as result:
        assert_talks_to_banner(result, banner)
        assert result.proxy == good
        assert result.attempts == [(wrong, f"authentication refused by proxy (status {status})")]
    assert pool.is_down(wrong)


def test_no_acceptable_method_fails_over(proxies, banner):
    needs_auth = spec(proxies["danted_auth"], pri=2)  # we offer only 0x00
    good = micro_auth(proxies)
    with dial([needs_auth, good], "127.0.0.1", banner.port, deadline=5) as result:
        assert result.proxy == good
        assert result.attempts == [
            (needs_auth, "proxy accepts none of the offered authentication methods (0xFF)")]


def test_ruleset_deny_is_a_proxy_failure(proxies, banner):
    pool = ProxyPool.create()
    blocking = spec(proxies["danted_block"], pri=2)
    with pytest.raises(SocksDialError) as info:
        dial([blocking], "127.0.0.1", banner.port, deadline=5, pool=pool)
    assert not info.value.destination_fault
    assert info.value.attempts == [(blocking, "connection not allowed by ruleset (SOCKS reply 2)")]
    assert pool.is_down(blocking)
    good = spec(proxies["micro_none"])
    with dial([blocking, good], "127.0.0.1", banner.port, deadline=5) as result:
        assert_talks_to_banner(result, banner)
        assert result.attempts[0][1].endswith("(SOCKS reply 2)")


def test_destination_refused_stops_and_keeps_proxy_up(proxies):
    pool = ProxyPool.create()
    first, second = spec(proxies["danted_none"], pri=2), spec(proxies["micro_none"])
    port = closed_port()
    with pytest.raises(SocksDialError) as info:
        dial([first, second], "127.0.0.1", port, deadline=5, pool=pool)
    assert info.value.destination_fault
    assert info.value.attempts == [(first, "connection refused by destination (SOCKS reply 5)")]
    assert "via proxy 127.0.0.1" in info.value.reason
    assert not pool.is_down(first)
    assert row(pool, first) | {"down_until": 0} == {
        "ip": "127.0.0.1", "port": first.port, "dials": 1, "failures": 0, "in_use": 0,
        "state": "up", "fail_streak": 0, "down_until": 0}
    assert [r["port"] for r in pool.snapshot()] == [first.port]


def test_all_proxies_down(proxies, banner):
    pool = ProxyPool.create()
    dead = [dead_proxy(pri=p) for p in (1, 2, 3)]
    for _ in range(2):  # the second time all are known down: still probed, in priority order
        with pytest.raises(SocksDialError) as info:
            dial(dead, "127.0.0.1", banner.port, deadline=5, pool=pool)
        assert not info.value.destination_fault
        assert [p for p, _ in info.value.attempts] == dead[::-1]
        assert all(pool.is_down(p) for p in dead)
    assert "no SOCKS proxy could reach 127.0.0.1" in info.value.reason
    assert [r["failures"] for r in pool.snapshot()] == [2, 2, 2]


# ------------------------------------------------------------------ odd but legal servers
# No real server sends these byte patterns on demand, so a scripted one does.


def scripted_proxy(script: list[bytes], then: bytes = b""):
    """A SOCKS5 server that answers the greeting with 05 00, reads the CONNECT
    request, then sends `script` one chunk at a time (pausing between chunks)
    followed by `then`, and closes."""
    def handle(sock, _address):
        sock.recv(3)
        sock.sendall(b"\x05\x00")
        sock.recv(22)
        for chunk in script:
            sock.sendall(chunk)
            gevent.sleep(0.01)
        sock.sendall(then)

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return server


def test_reply_in_single_bytes_with_domain_address(banner):
    reply = bytes.fromhex("05 00 00 03") + b"\x0bproxy.local" + b"\x00\x19"
    server = scripted_proxy([bytes((b,)) for b in reply], then=BANNER)
    try:
        with dial([ProxySpec("127.0.0.1", server.server_port)], "127.0.0.1", banner.port,
                  deadline=5) as result:
            assert (result.bound_address, result.bound_port) == ("proxy.local", 25)
            assert read_banner(result.sock) == BANNER  # not a byte of it was swallowed
    finally:
        server.stop()


def test_truncated_refusal_still_blames_the_destination(banner):
    server = scripted_proxy([bytes.fromhex("05 05 00")])  # then EOF
    try:
        with pytest.raises(SocksDialError) as info:
            dial([ProxySpec("127.0.0.1", server.server_port)], "127.0.0.1", banner.port, deadline=5)
        assert info.value.destination_fault
        assert info.value.attempts[0][1] == "connection refused by destination (SOCKS reply 5)"
    finally:
        server.stop()


def test_success_reply_cut_short_is_a_proxy_failure(banner):
    server = scripted_proxy([bytes.fromhex("05 00 00 01 7f 00")])  # then EOF
    try:
        with pytest.raises(SocksDialError) as info:
            dial([ProxySpec("127.0.0.1", server.server_port)], "127.0.0.1", banner.port, deadline=5)
        assert not info.value.destination_fault
        assert info.value.attempts[0][1] == \
            "proxy closed the connection after 6 bytes of the CONNECT reply"
    finally:
        server.stop()


# ------------------------------------------------------------------ time limits


def test_silent_proxy_cannot_outlast_the_deadline(silent, banner):
    pool = ProxyPool.create()
    mute = spec(silent)  # tmo 5s, deadline 1s
    started = time.monotonic()
    with pytest.raises(SocksDialError) as info:
        dial([mute], "127.0.0.1", banner.port, deadline=1.0, pool=pool)
    elapsed = time.monotonic() - started
    assert 0.95 < elapsed < 1.2
    assert info.value.attempts == [(mute, "SOCKS handshake cut short by the overall deadline")]
    assert not pool.is_down(mute)  # it never had its full tmo
    assert row(pool, mute)["failures"] == 1


def test_silent_proxy_times_out_after_tmo_and_fails_over(silent, proxies, banner):
    pool = ProxyPool.create()
    mute, good = spec(silent, tmo=0.3, pri=2), spec(proxies["danted_none"])
    started = time.monotonic()
    with dial([mute, good], "127.0.0.1", banner.port, deadline=3, pool=pool) as result:
        elapsed = time.monotonic() - started
        assert_talks_to_banner(result, banner)
    assert 0.3 <= elapsed < 0.8
    assert result.attempts == [(mute, "SOCKS handshake timed out after 0.3s")]
    assert pool.is_down(mute)


def test_callers_own_timeout_passes_through_and_cleans_up(silent):
    pool = ProxyPool.create()
    mute = spec(silent)
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.2):
        dial([mute], "127.0.0.1", 25, deadline=5, pool=pool)
    assert {k: row(pool, mute)[k] for k in ("dials", "failures", "in_use", "state")} == \
        {"dials": 1, "failures": 0, "in_use": 0, "state": "up"}


def test_deadline_leaves_later_proxies_untried(silent, proxies, banner):
    mute, good = spec(silent, pri=2), spec(proxies["danted_none"])
    with pytest.raises(SocksDialError) as info:
        dial([mute, good], "127.0.0.1", banner.port, deadline=0.4)
    assert info.value.attempts == [
        (mute, "SOCKS handshake cut short by the overall deadline"),
        (good, "not tried: overall deadline of 0.4s expired")]


def test_unusable_source_address_is_not_the_proxys_fault(proxies, banner):
    pool = ProxyPool.create()
    proxy = spec(proxies["danted_none"])
    with pytest.raises(SocksDialError) as info:  # bind() fails locally; nothing is sent
        dial([proxy], "127.0.0.1", banner.port, deadline=2, pool=pool,
             source_address=("192.0.2.99", 0))
    assert info.value.attempts[0][1].startswith("binding source address 192.0.2.99 failed")
    assert not pool.is_down(proxy)


def test_source_address_is_used(proxies, banner):
    proxy = spec(proxies["micro_none"])
    with dial([proxy], "127.0.0.1", banner.port, deadline=2,
              source_address=("127.0.0.1", 0)) as result:
        assert result.sock.getsockname()[0] == "127.0.0.1"
        assert_talks_to_banner(result, banner)


# ------------------------------------------------------------------ the shared pool


def in_child(action) -> int:
    """Run action() in a forked process with slot 1; its return value is the exit status."""
    pid = os.fork()
    if pid == 0:
        status = 99
        try:
            status = action()
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_pool_health_is_shared_across_processes():
    pool = ProxyPool.create()
    proxy = ProxySpec("192.0.2.10", 1080)

    def child_marks_down():
        pool.bind_slot(1)
        pool.mark_down(proxy, backoff=60)
        return 0

    assert in_child(child_marks_down) == 0
    assert pool.is_down(proxy)
    pool.mark_up(proxy)

    def child_sees_up():
        pool.bind_slot(2)
        return 10 if pool.is_down(proxy) else 0

    assert in_child(child_sees_up) == 0


def test_pool_counters_sum_slots_and_retire_dead_ones():
    pool = ProxyPool.create()
    proxy = ProxySpec("192.0.2.11", 1081)

    def child_dials_and_dies():
        pool.bind_slot(3)
        pool.begin_dial(proxy, probe_window=5)
        pool.begin_dial(proxy, probe_window=5).fail()
        return 0

    with pool.begin_dial(proxy, probe_window=5):
        assert in_child(child_dials_and_dies) == 0
        assert {k: row(pool, proxy)[k] for k in ("dials", "failures", "in_use")} == \
            {"dials": 3, "failures": 1, "in_use": 2}
    pool.retire_slot(3)
    assert {k: row(pool, proxy)[k] for k in ("dials", "failures", "in_use")} == \
        {"dials": 3, "failures": 1, "in_use": 0}


def test_probe_claim_is_seen_by_other_processes():
    pool = ProxyPool.create()
    proxy = ProxySpec("192.0.2.12", 1080)
    now = time.monotonic()
    pool.mark_down(proxy, backoff=1, now=now - 2)  # back-off already over
    assert not pool.is_down(proxy, now)

    def child_probes():
        pool.bind_slot(1)
        pool.begin_dial(proxy, probe_window=30, now=now)
        return 0

    assert in_child(child_probes) == 0
    assert pool.is_down(proxy, now + 1)  # someone is probing it
    assert row(pool, proxy)["state"] == "probing"
    assert not pool.is_down(proxy, now + 31)  # the prober died: the claim expires


def test_backoff_grows_per_failed_probe_and_resets_on_success():
    pool = ProxyPool.create()
    proxy = ProxySpec("192.0.2.13", 1080)
    assert pool.mark_down(proxy, backoff=30, now=100) == 30
    assert pool.is_down(proxy, 129.9) and not pool.is_down(proxy, 130.1)
    assert pool.mark_down(proxy, backoff=30, now=110) == 30  # same outage: no change
    assert not pool.is_down(proxy, 130.1)
    pool.begin_dial(proxy, probe_window=5, now=131).fail()  # the probe
    assert pool.mark_down(proxy, backoff=30, now=131) == 60
    assert pool.mark_down(proxy, backoff=30, now=192) == 120  # back-off over: a failed probe
    for t in (400, 1000, 2000, 4000):
        pool.mark_down(proxy, backoff=30, now=t)
    assert pool.mark_down(proxy, backoff=30, now=10000) == MAX_BACKOFF
    pool.mark_up(proxy, now=10001)
    assert not pool.is_down(proxy, 10001)
    assert pool.mark_down(proxy, backoff=30, now=10002) == 30


def test_pool_keys_by_address_and_port():
    pool = ProxyPool.create(max_proxies=4)
    specs = [ProxySpec("192.0.2.1", 1080), ProxySpec("192.0.2.1", 1081), ProxySpec("::1", 1080)]
    pool.mark_down(specs[1])
    assert [pool.is_down(s) for s in specs] == [False, True, False]
    for s in specs:
        pool.begin_dial(s, probe_window=1).release()
    assert [(r["ip"], r["port"], r["dials"]) for r in pool.snapshot()] == \
        [("192.0.2.1", 1080, 1), ("192.0.2.1", 1081, 1), ("::1", 1080, 1)]


def test_pool_full_degrades_to_untracked():
    pool = ProxyPool.create(max_proxies=2)
    specs = [ProxySpec(f"192.0.2.{n}") for n in (1, 2, 3)]
    for s in specs:
        pool.mark_down(s)
    assert [pool.is_down(s) for s in specs] == [True, True, False]
    assert len(pool.snapshot()) == 2

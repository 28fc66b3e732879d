"""socks_proxy on the smtp transport, through real danted and microsocks, to the
recording SMTP server."""
import subprocess
import time

import pytest

from delivery_support import SmtpRecorder, log_lines, main_log, make_deliverer, smarthost_config, spool_message
from harness import wait_for_port
from mta.delivery import COMPLETED, DEFERRED_MESSAGE
from shared.proxypool import ProxyPool
from socks_servers import (
    MICROSOCKS, MICROSOCKS_PASSWORD, MICROSOCKS_USER, TEST_PASSWORD, TEST_USER, closed_port,
    start_danted, start_microsocks,
)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("socks")
    servers = {
        "danted": start_danted(tmp, auth=False),
        "danted_auth": start_danted(tmp, auth=True),
        "micro": start_microsocks(auth=False),
        "micro_auth": start_microsocks(auth=True),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def recorder():
    server = SmtpRecorder().start()
    yield server
    server.stop()


def config(hosts: str, socks_proxy: str, options: str = "") -> str:
    return smarthost_config(hosts, f"  socks_proxy = {socks_proxy}\n{options}", retry="* * F,1h,1m")


def deliver_once(tmp_path, recorder, socks_proxy, selector="+proxy", options="", pool=None):
    deliverer, spool, logs = make_deliverer(tmp_path, config(f"127.0.0.1::{recorder.port}", socks_proxy, options),
                                            selector, proxypool=pool)
    message_id = spool_message(spool, "a@example.org", ["x@example.net"])
    return deliverer.deliver(message_id), message_id, logs, deliverer


def test_danted_without_auth_and_the_prx_log_field(tmp_path, proxies, recorder):
    danted = proxies["danted"]
    result, message_id, logs, _ = deliver_once(tmp_path, recorder, f"127.0.0.1 port={danted.port}",
                                               "+proxy +outgoing_port")
    assert result == COMPLETED
    assert recorder.recipients() == ["x@example.net"]
    assert (f"{message_id} => x@example.net R=smarthost T=remote_smtp H=127.0.0.1 [127.0.0.1]:{recorder.port} "
            f'PRX=[127.0.0.1]:{danted.port} C="250 OK id=rec1"') in log_lines(logs, message_id)


def test_prx_without_outgoing_port_and_not_without_proxy_selector(tmp_path, proxies, recorder):
    spec = f"127.0.0.1 port={proxies['danted'].port}"
    _, message_id, logs, _ = deliver_once(tmp_path / "a", recorder, spec, "+proxy")
    assert " H=127.0.0.1 [127.0.0.1] PRX=[127.0.0.1] C=" in main_log(logs)
    _, message_id, logs, _ = deliver_once(tmp_path / "b", recorder, spec, "")
    assert " H=127.0.0.1 [127.0.0.1] C=" in main_log(logs) and "PRX=" not in main_log(logs)


def test_proxy_variables_during_delivery(tmp_path, proxies, recorder):
    danted = proxies["danted"]
    helo = "  helo_data = p$proxy_session-$proxy_local_address-$proxy_local_port-$proxy_external_address"
    result, _, _, _ = deliver_once(tmp_path, recorder, f"127.0.0.1 port={danted.port}", options=helo)
    assert result == COMPLETED
    assert recorder.messages[0].helo == f"pyes-127.0.0.1-{danted.port}-127.0.0.1"


def test_danted_username_auth(tmp_path, proxies, recorder):
    spec = f"127.0.0.1 port={proxies['danted_auth'].port} auth=name name={TEST_USER} pass={TEST_PASSWORD}"
    assert deliver_once(tmp_path, recorder, spec)[0] == COMPLETED
    assert recorder.recipients() == ["x@example.net"]


@pytest.mark.parametrize("which, auth", [("micro", ""),
                                         ("micro_auth", f" auth=name name={MICROSOCKS_USER} pass={MICROSOCKS_PASSWORD}")])
def test_microsocks(tmp_path, proxies, recorder, which, auth):
    result, message_id, logs, _ = deliver_once(tmp_path, recorder, f"127.0.0.1 port={proxies[which].port}{auth}")
    assert result == COMPLETED
    assert "PRX=[127.0.0.1] C=" in main_log(logs)


def test_failover_from_a_dead_higher_priority_proxy(tmp_path, proxies, recorder):
    dead = closed_port()
    good = proxies["micro"].port
    spec = f"127.0.0.1 port={dead} pri=10 : 127.0.0.1 port={good} pri=1"
    pool = ProxyPool.create(max_proxies=8, max_processes=2)
    result, message_id, logs, _ = deliver_once(tmp_path, recorder, spec, "+proxy +outgoing_port", pool=pool)
    assert result == COMPLETED
    assert f"PRX=[127.0.0.1]:{good} C=" in main_log(logs)
    states = {row["port"]: row["state"] for row in pool.snapshot()}
    assert states == {dead: "down", good: "up"}


def test_proxy_refusing_auth_defers_then_fails_over(tmp_path, proxies, recorder):
    refusing = f"127.0.0.1 port={proxies['danted_auth'].port} auth=name name={TEST_USER} pass=wrong"
    result, message_id, logs, _ = deliver_once(tmp_path / "one", recorder, refusing)
    assert result == DEFERRED_MESSAGE
    [line] = log_lines(logs, message_id)
    assert line.startswith(f"{message_id} == x@example.net R=smarthost T=remote_smtp defer (-47) "
                           "H=127.0.0.1 [127.0.0.1]: SOCKS proxy: all proxies failed: ")
    assert "authentication refused" in line
    spec = f"{refusing} pri=5 : 127.0.0.1 port={proxies['danted'].port}"
    assert deliver_once(tmp_path / "two", recorder, spec)[0] == COMPLETED
    assert recorder.recipients() == ["x@example.net"]


def test_destination_refused_by_the_proxy_is_a_host_failure(tmp_path, proxies, recorder):
    dead = closed_port()
    deliverer, spool, logs = make_deliverer(
        tmp_path, config(f"127.0.0.1::{dead}:127.0.0.1::{recorder.port}", f"127.0.0.1 port={proxies['danted'].port}"),
        "+outgoing_port")
    assert deliverer.deliver(spool_message(spool, "a@example.org", ["x@example.net"])) == COMPLETED
    assert f"H=127.0.0.1 [127.0.0.1]:{recorder.port} C=" in main_log(logs)
    assert deliverer.services.host_retry.waiting_until(f"127.0.0.1:{dead}", time.time()) is not None


def test_all_proxies_down_then_one_comes_back(tmp_path, recorder):
    first, second = closed_port(), closed_port()
    pool = ProxyPool.create(max_proxies=8, max_processes=2)
    deliverer, spool, logs = make_deliverer(
        tmp_path, config(f"127.0.0.1::{recorder.port}", f"127.0.0.1 port={first} : 127.0.0.1 port={second} tmo=2s"),
        "+proxy", proxypool=pool)
    message_id = spool_message(spool, "a@example.org", ["x@example.net"])
    assert deliverer.deliver(message_id) == DEFERRED_MESSAGE
    [line] = log_lines(logs, message_id)
    assert "defer (-47)" in line and "SOCKS proxy: all proxies failed" in line
    assert f"127.0.0.1:{first}" in line and f"127.0.0.1:{second}" in line
    assert spool.message_ids() == [message_id]
    revived = subprocess.Popen([MICROSOCKS, "-i", "127.0.0.1", "-p", str(second)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", second, 5)
        assert deliverer.deliver(message_id, forced=True) == COMPLETED
    finally:
        revived.terminate()
        revived.wait()
    assert recorder.recipients() == ["x@example.net"]
    assert "PRX=[127.0.0.1] C=" in main_log(logs)

"""Observability: the Prometheus exposition (pure parts, then scraped from
the real server with traffic, SOCKS deliveries and a reload) and `status`."""
import os
import re
import subprocess
import urllib.error
import urllib.request

import pytest

from delivery_support import smarthost_config
from harness import find_program, free_port, wait_for_port
from mta.histogram import Histogram, cumulative
from mta.proxy_failures import failure_kind
from mta.proxy_protocol import ProxyProtocolError, build_v2
from mta.proxy_protocol import parse as parse_header
from socks_servers import start_microsocks
from test_operations import reload_and_settle, wait_for
from test_smtp_server import Client, send_one
from workers.metrics import add_counters, render
from workers.metrics_http import http_response

SMTP_SINK = find_program("smtp-sink")


# -- pure parts -----------------------------------------------------------------


def test_counters_add_up_and_gauges_are_left_out():
    total = add_counters({}, {"received": 2, "connections": 5, "acl": {"rcpt:deny": 1}, "stopping": True,
                              "delivery_latency": {"buckets": [1, 0, 2], "sum": 1.5, "count": 3},
                              "socks_proxies": [{"ip": "x"}], "slot": 4})
    add_counters(total, {"received": 1, "acl": {"rcpt:deny": 2, "mail:accept": 1},
                         "delivery_latency": {"buckets": [0, 1], "sum": 0.5, "count": 1}})
    assert total == {"received": 3, "acl": {"rcpt:deny": 3, "mail:accept": 1},
                     "delivery_latency": {"buckets": [1, 1, 2], "sum": 2.0, "count": 4}}


def test_histogram_buckets_are_upper_bounds_and_cumulative():
    histogram = Histogram((1.0, 10.0))
    for value in (0.5, 1.0, 3.0, 60.0):
        histogram.observe(value)
    assert histogram.snapshot() == {"buckets": [2, 1, 1], "sum": 64.5, "count": 4}
    assert cumulative(histogram.buckets, histogram.bounds) == [("1", 2), ("10", 3), ("+Inf", 4)]


def parse(exposition: str) -> dict[str, float]:
    samples = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_render_sums_retired_and_live_workers():
    master = {"generation": 3, "retired": {"received": 10, "acl": {"rcpt:deny": 4}},
              "workers": [{"pid": 1, "kind": "smtp", "retiring": False}, {"pid": 2, "kind": "smtp", "retiring": True},
                          {"pid": 3, "kind": "delivery", "retiring": False}]}
    statuses = {
        1: {"stats": {"received": 1, "connections": 2, "acl": {"rcpt:deny": 1, 'data:"x"': 1},
                      "proxy_failure_reasons": {"timeout": 2}}},
        2: {"stats": {"received": 2, "connections": 1}},
        3: {"stats": {"delivered": 7, "deliveries_in_flight": 1,
                      "delivery_latency": {"buckets": [3] + [0] * 16, "sum": 0.01, "count": 3}}},
    }
    proxies = [{"ip": "127.0.0.1", "port": 1080, "dials": 5, "failures": 1, "in_use": 0, "down_until": 0},
               {"ip": "::1", "port": 1081, "dials": 2, "failures": 2, "in_use": 0, "down_until": 1e12}]
    text = render(master, statuses, queue_size=4, ratelimit_fill=(2, 64), socks_proxies=proxies)
    samples = parse(text)
    assert samples["mta_messages_received_total"] == 13
    assert samples['mta_acl_verdicts_total{stage="rcpt",verdict="deny"}'] == 5
    assert samples['mta_acl_verdicts_total{stage="data",verdict="\\"x\\""}'] == 1
    assert samples['mta_proxy_failure_reasons_total{reason="timeout"}'] == 2
    assert samples["mta_smtp_sessions"] == 3
    assert samples['mta_workers{kind="smtp",state="retiring"}'] == 1
    assert samples["mta_recipients_delivered_total"] == 7
    assert samples['mta_delivery_latency_seconds_bucket{le="0.01"}'] == 3
    assert samples['mta_delivery_latency_seconds_bucket{le="+Inf"}'] == 3
    assert samples["mta_delivery_latency_seconds_count"] == 3
    assert samples['mta_socks_dials_total{proxy="127.0.0.1:1080"}'] == 5
    assert samples['mta_socks_down{proxy="127.0.0.1:1080"}'] == 0
    assert samples['mta_socks_down{proxy="::1:1081"}'] == 1
    assert samples["mta_queue_messages"] == 4 and samples["mta_ratelimit_records"] == 2
    assert "# TYPE mta_messages_received_total counter" in text
    assert "# TYPE mta_delivery_latency_seconds histogram" in text


@pytest.mark.parametrize("request_head, status", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200 OK"),
    (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", b"200 OK"),
    (b"GET /nope HTTP/1.0\r\n\r\n", b"404 Not Found"),
    (b"POST /metrics HTTP/1.0\r\n\r\n", b"405 Method Not Allowed"),
    (b"garbage\r\n\r\n", b"400 Bad Request"),
    (b"", b"400 Bad Request"),
])
def test_http_responses(request_head, status):
    response = http_response(request_head, lambda: "m 1\n")
    assert response.startswith(b"HTTP/1.0 " + status + b"\r\n")
    if status == b"200 OK" and b"/metrics" in request_head:
        assert b"Content-Type: text/plain; version=0.0.4" in response and response.endswith(b"\r\n\r\nm 1\n")


def test_head_has_no_body():
    response = http_response(b"HEAD /metrics HTTP/1.0\r\n\r\n", lambda: "m 1\n")
    assert response.endswith(b"Content-Length: 4\r\nConnection: close\r\n\r\n")


# -- the real server ---------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(response.read().decode())


class SmtpSink:
    """Postfix's smtp-sink: accepts every message and keeps nothing."""

    def __init__(self):
        self.port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen([SMTP_SINK, *user, f"127.0.0.1:{self.port}", "100"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def sink_and_proxy():
    if SMTP_SINK is None:
        pytest.skip("smtp-sink is not installed (make test installs Postfix's tools)")
    sink = SmtpSink()
    proxy = start_microsocks()
    yield sink, proxy
    proxy.stop()
    sink.stop()


def socks_delivery_config(sink_port: int, socks_port: int) -> str:
    return """
hosts_proxy = 127.0.0.2
acl_smtp_connect = check_connect
acl_smtp_rcpt = check_rcpt
begin acl
check_connect:
  defer hosts = 127.0.0.5
        message = slow down
        ratelimit = 0 / 1h / per_conn / strict
  accept
check_rcpt:
  accept domains = example.net : localhost
  deny   message = relay not permitted
""" + smarthost_config(f"127.0.0.1::{sink_port}", f"  socks_proxy = 127.0.0.1 port={socks_port}", "* * F,1h,1m")


def make_traffic(server) -> None:
    assert send_one(server.port, rcpts=("u@example.net",)).startswith("250")
    client = Client(server.port)
    client.reply()
    client.command("EHLO client.example")
    client.command("MAIL FROM:<a@example.org>")
    assert client.command("RCPT TO:<u@elsewhere.example>").startswith("550")
    client.command("QUIT")
    assert Client(server.port, source="127.0.0.5").reply() == "451 slow down"
    failed = Client(server.port, source="127.0.0.2")
    failed.send(b"NOT A PROXY HEADER\r\n")
    assert failed.reply().startswith("220")
    assert failed.command("QUIT").startswith("221")


def test_metrics_follow_traffic_deliveries_and_reloads(mta, sink_and_proxy):
    sink, proxy = sink_and_proxy
    metrics_port = free_port()
    server = mta(f"metrics_listen = 127.0.0.1:{metrics_port}\n" + socks_delivery_config(sink.port, proxy.port),
                 workers=2, runners=1)
    wait_for_port("127.0.0.1", metrics_port)
    before = wait_for(lambda: scrape(metrics_port), what="a scrape")
    assert before["mta_messages_received_total"] == 0
    assert before['mta_workers{kind="smtp",state="serving"}'] == 2
    assert before['mta_workers{kind="metrics",state="serving"}'] == 1

    make_traffic(server)
    proxy_label = f'{{proxy="127.0.0.1:{proxy.port}"}}'
    after = wait_for(lambda: (lambda s: s if s.get("mta_recipients_delivered_total") == 1 and
                              s.get("mta_messages_received_total") == 1 else None)(scrape(metrics_port)),
                     what="the message received and delivered")
    assert after["mta_smtp_connections_total"] >= before["mta_smtp_connections_total"] + 4
    assert after['mta_acl_verdicts_total{stage="rcpt",verdict="deny"}'] == 1
    assert after['mta_acl_verdicts_total{stage="rcpt",verdict="accept"}'] == 1
    assert after['mta_acl_verdicts_total{stage="connect",verdict="defer"}'] == 1
    assert after["mta_ratelimit_defers_total"] == 1
    assert after["mta_proxy_failures_total"] == 1
    assert after["mta_socks_dials_total" + proxy_label] >= 1
    assert after["mta_socks_failures_total" + proxy_label] == 0
    assert after["mta_ratelimit_records"] >= 1
    assert after["mta_metrics_scrapes_total"] > before["mta_metrics_scrapes_total"]
    wait_for(lambda: scrape(metrics_port)["mta_queue_messages"] == 0, what="an empty queue")

    reload_and_settle(server, 2)
    reloaded = scrape(metrics_port)  # the new metrics worker sees the old workers' counters as retired
    assert reloaded["mta_master_generation"] == 2
    for name in ("mta_messages_received_total", "mta_recipients_delivered_total", "mta_ratelimit_defers_total",
                 'mta_acl_verdicts_total{stage="rcpt",verdict="deny"}', "mta_proxy_failures_total"):
        assert reloaded[name] == after[name], name
    assert reloaded["mta_socks_dials_total" + proxy_label] == after["mta_socks_dials_total" + proxy_label]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/other", timeout=10)
    assert missing.value.code == 404


def test_status_shows_workers_queue_and_socks_proxies(mta, sink_and_proxy):
    sink, proxy = sink_and_proxy
    server = mta(socks_delivery_config(sink.port, proxy.port), workers=2, runners=1)
    assert send_one(server.port, rcpts=("u@example.net",)).startswith("250")
    server.wait_for_log(" Completed")
    status = wait_for(lambda: (lambda out: out if "delivered 1," in out else None)(server.cli("status").stdout),
                      what="the delivery counted in status")
    assert re.search(r"^master pid \d+, generation 1, up \d+s$", status, re.M)
    assert re.search(r"^ +\d+ smtp +1 +1 +\d+s +0 +(\d+|-)  serving$", status, re.M)
    assert re.search(r"^ +\d+ delivery +1 +1 +\d+s +[01] +-  serving$", status, re.M)
    assert "queue: 0 message(s); since start: received 1, delivered 1, deferred 0, failed 0" in status
    assert re.search(r"^ratelimit table: 0 of \d+ records used$", status, re.M)
    assert f"socks proxy 127.0.0.1:{proxy.port}: dials 1 failures 0 in use " in status


@pytest.mark.parametrize("first_bytes, kind", [
    (b"GARBAGE\r\n", "not_proxy"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 25\r\n", "v1_malformed"),
    (build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, crc=True)[:-1] + b"\x00", "crc"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x51\x00\x00", "v2_malformed"),  # an unknown family
])
def test_proxy_failure_kinds_from_the_parser(first_bytes, kind):
    with pytest.raises(ProxyProtocolError) as failure:
        parse_header(first_bytes)  # raises before it would ask for more bytes
    assert failure_kind(failure.value.reason) == kind


def test_proxy_failure_kinds_of_the_reader():
    assert failure_kind("timeout: no complete PROXY header within 3.0 s") == "timeout"
    assert failure_kind("connection closed before the PROXY header was complete") == "closed"
    assert failure_kind("something new") == "other"

"""Inbound PROXY protocol end to end: real HAProxy in front of the real server."""
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest
import trustme

from harness import find_program, free_port, wait_for_port
from mta.proxy_protocol import build_v1, build_v2
from test_smtp_server import MESSAGE, Client

HAPROXY = find_program("haproxy")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make test installs it)")

BANNER = ("smtp_banner = $primary_hostname ESMTP s=$proxy_session h=$sender_host_address:$sender_host_port "
          "l=$proxy_local_address e=$proxy_external_address:$proxy_external_port "
          "u=$proxy_tlv_unique_id a=$proxy_tlv_authority")


class HAProxy:
    def __init__(self, directory: str, backends: dict[str, str]):
        """backends: frontend name -> `server` line options, e.g. "127.0.0.1:2525 send-proxy"."""
        self.ports = {name: free_port() for name in backends}
        lines = ["global", "  maxconn 2000", "defaults", "  mode tcp", "  timeout connect 5s",
                 "  timeout client 60s", "  timeout server 60s"]
        for name, server in backends.items():
            lines += [f"frontend fe_{name}", f"  bind 127.0.0.1:{self.ports[name]}",
                      "  unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt", f"  default_backend be_{name}",
                      f"backend be_{name}", f"  server s1 {server}"]
        self.config = os.path.join(directory, "haproxy.cfg")
        with open(self.config, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        check = subprocess.run([HAPROXY, "-c", "-f", self.config], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", self.config],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for port in self.ports.values():
            wait_for_port("127.0.0.1", port)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def haproxy(tmp_path):
    started = []

    def start(backends):
        proxy = HAProxy(str(tmp_path), backends)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def banner_fields(banner: str) -> dict[str, str]:
    return dict(re.findall(r"(\w)=(\S*)", banner))


def test_send_proxy_v1_gives_real_client(mta, haproxy):
    server = mta(f"hosts_proxy = 127.0.0.1\nlog_selector = +proxy +incoming_port\n{BANNER}")
    proxy = haproxy({"v1": f"127.0.0.1:{server.port} send-proxy"})
    client = Client(proxy.ports["v1"], source="127.0.0.2")
    fields = banner_fields(client.reply())
    local_port = client.sock.getsockname()[1]
    assert fields["s"] == "yes"
    assert fields["h"] == f"127.0.0.2:{local_port}"
    assert fields["l"] == "127.0.0.1"
    assert fields["e"] == f"127.0.0.1:{proxy.ports['v1']}"
    client.command("EHLO c.example")
    client.command("MAIL FROM:<a@example.org>")
    client.command("RCPT TO:<u@localhost>")
    client.command("DATA")
    assert client.command(MESSAGE + ".").startswith("250")
    log = server.wait_for_log(" <= a@example.org")
    assert re.search(rf"<= a@example.org H=\(c.example\) \[127.0.0.2\]:{local_port} P=esmtp PRX=127.0.0.1 S=", log)
    message_id = server.spooled_ids()[0]
    with open(os.path.join(server.input, message_id + "-D"), "rb") as handle:
        assert handle.read().startswith(b"Received: from [127.0.0.2] (helo=c.example)")


def test_send_proxy_v2_with_tlvs_and_crc(mta, haproxy):
    server = mta(f"hosts_proxy = 127.0.0.1\n{BANNER}")
    proxy = haproxy({"v2": f"127.0.0.1:{server.port} send-proxy-v2 proxy-v2-options unique-id,crc32c"})
    client = Client(proxy.ports["v2"], source="127.0.0.3")
    fields = banner_fields(client.reply())
    assert fields["h"].startswith("127.0.0.3:")
    assert fields["u"] and re.fullmatch(r"[0-9a-f]+", fields["u"])
    assert bytes.fromhex(fields["u"]).decode().startswith("7F000003:")
    assert client.command("EHLO c.example").startswith("250")
    assert "PROXY protocol failure" not in server.log()


def test_haproxy_health_checks_send_local_and_are_not_failures(mta, haproxy):
    server = mta("hosts_proxy = 127.0.0.1")
    haproxy({"checked": f"127.0.0.1:{server.port} send-proxy-v2 check inter 200ms"})
    time.sleep(1.5)
    log = server.log()
    assert "PROXY protocol failure" not in log
    assert log.count("SMTP connection from [127.0.0.1]") >= 3  # the checks arrived, as LOCAL


def test_tls_on_connect_through_haproxy(mta, haproxy, tmp_path):
    authority = trustme.CA()
    cert = authority.issue_cert("mta.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls_port = free_port()
    server = mta(f"hosts_proxy = 127.0.0.1\ntls_certificate = {tmp_path}/cert.pem\n"
                 f"tls_privatekey = {tmp_path}/key.pem\ntls_on_connect_ports = {tls_port}\n"
                 "log_selector = +proxy")
    proxy = haproxy({"tls": f"127.0.0.1:{tls_port} send-proxy-v2"})
    context = ssl.create_default_context()
    authority.configure_trust(context)
    raw = socket.create_connection(("127.0.0.1", proxy.ports["tls"]), source_address=("127.0.0.4", 0))
    with smtplib.SMTP_SSL(context=context, timeout=10) as smtp:
        smtp.sock = context.wrap_socket(raw, server_hostname="mta.test")
        smtp.file = None
        assert smtp.getreply()[0] == 220
        smtp.ehlo("c.example")
        smtp.sendmail("a@example.org", ["u@localhost"], MESSAGE)
    log = server.wait_for_log(" <= a@example.org")
    assert re.search(r"H=\(c.example\) \[127.0.0.4\] P=esmtps X=TLS\S+ PRX=127.0.0.1 S=", log)


def raw_session(port: int, first_bytes: bytes, source: str = "127.0.0.1") -> Client:
    client = Client(port, source=source)
    client.send(first_bytes)
    return client


@pytest.mark.parametrize("first_bytes, reason", [
    (b"GARBAGE that is no header\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 25\r\n", "leading zero"),
    (build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, crc=True)[:-1] + b"\x00", "CRC"),
])
def test_failed_negotiation_keeps_session_but_refuses_commands(mta, first_bytes, reason):
    server = mta(f"hosts_proxy = 127.0.0.1\n{BANNER}")
    client = raw_session(server.port, first_bytes)
    fields = banner_fields(client.reply())
    assert fields["s"] == "yes" and fields["e"] == ":"
    assert client.command("EHLO c.example") == "503 Command refused, required Proxy negotiation failed"
    assert client.command("MAIL FROM:<a@b.example>").startswith("503 Command refused")
    assert client.command("QUIT").startswith("221")
    log = server.wait_for_log("PROXY protocol failure")
    assert re.search(r"PROXY protocol failure from \[127.0.0.1\]:\d+: .*" + re.escape(reason), log, re.I), log


def test_truncated_header_and_silence_time_out(mta):
    server = mta(f"hosts_proxy = 127.0.0.1\nproxy_protocol_timeout = 1s\n{BANNER}")
    for first_bytes in (b"PROXY TCP4 1.2.3.4 ", b""):
        client = raw_session(server.port, first_bytes)
        started = time.time()
        fields = banner_fields(client.reply())
        assert 0.8 < time.time() - started < 4
        assert fields["e"] == ":"
        assert client.command("NOOP").startswith("503")
    server.wait_for_log("no complete PROXY header within 1")


def test_header_from_untrusted_host_is_an_unknown_command(mta):
    server = mta(f"hosts_proxy = 127.0.0.1\n{BANNER}")
    client = raw_session(server.port, b"", source="127.0.0.5")
    fields = banner_fields(client.reply())
    assert fields["s"] == "" and fields["h"].startswith("127.0.0.5:")
    assert client.command("PROXY TCP4 1.2.3.4 5.6.7.8 1234 25").startswith("500")
    assert client.command("EHLO c.example").startswith("250")
    assert "1.2.3.4" not in server.log()


def test_second_header_is_an_unknown_command_and_pipelined_bytes_survive(mta):
    server = mta(f"hosts_proxy = 127.0.0.1\n{BANNER}")
    header = build_v1("TCP4", "192.0.2.7", "192.0.2.1", 40000, 25)
    client = raw_session(server.port, header + b"EHLO c.example\r\n")
    assert banner_fields(client.reply())["h"] == "192.0.2.7:40000"
    assert client.reply().startswith("250")
    assert client.command(header.decode().strip()).startswith("500")


def test_ipv4_mapped_source_is_plain_ipv4(mta):
    server = mta(f"hosts_proxy = 127.0.0.1\n{BANNER}")
    header = build_v2("PROXY", "INET6", "::ffff:192.0.2.9", "::ffff:192.0.2.1", 4242, 25)
    client = raw_session(server.port, header)
    assert banner_fields(client.reply())["h"] == "192.0.2.9:4242"


def test_local_command_keeps_socket_endpoints(mta):
    server = mta(f"hosts_proxy = 127.0.0.1\n{BANNER}")
    client = raw_session(server.port, build_v2("LOCAL", "UNSPEC", None, None, None, None))
    fields = banner_fields(client.reply())
    assert fields["h"].startswith("127.0.0.1:") and fields["s"] == "yes"
    assert client.command("EHLO c.example").startswith("250")


def test_proxy_failure_log_can_be_turned_off(mta):
    server = mta("hosts_proxy = 127.0.0.1\nlog_selector = -proxy_failure")
    client = raw_session(server.port, b"junk\r\n")
    client.reply()
    client.command("QUIT")
    time.sleep(0.3)
    assert "PROXY protocol failure" not in server.log()


def test_smtp_source_through_haproxy(mta, haproxy):
    server = mta("hosts_proxy = 127.0.0.1")
    proxy = haproxy({"v2": f"127.0.0.1:{server.port} send-proxy-v2"})
    result = subprocess.run([find_program("smtp-source"), "-s", "10", "-m", "300", "-l", "1024",
                             "-f", "a@example.org", "-t", "u@localhost", f"127.0.0.1:{proxy.ports['v2']}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(server.spooled_ids()) == 300


def test_hosts_proxy_file_is_reread_on_hup(mta, tmp_path):
    listed = tmp_path / "proxies"
    listed.write_text("# trusted load balancers\n127.0.0.9\n")
    server = mta(f"hosts_proxy = {listed}\n{BANNER}")
    header = build_v1("TCP4", "192.0.2.7", "192.0.2.1", 40000, 25)
    client = raw_session(server.port, header)
    assert banner_fields(client.reply())["h"].startswith("127.0.0.1:")  # not trusted: no header parsed
    listed.write_text("127.0.0.9\n127.0.0.1\n")
    server.signal_master(signal.SIGHUP)
    server.wait_for_log("generation 2")
    deadline = time.time() + 10
    while True:
        client = raw_session(server.port, header)
        if banner_fields(client.reply())["h"] == "192.0.2.7:40000" or time.time() > deadline:
            break
        time.sleep(0.2)
    assert banner_fields(raw_session(server.port, header).reply())["h"] == "192.0.2.7:40000"


def test_starttls_keeps_the_proxy_values(mta, tmp_path):
    authority = trustme.CA()
    cert = authority.issue_cert("mta.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    server = mta(f"hosts_proxy = 127.0.0.1\ntls_certificate = {tmp_path}/cert.pem\n"
                 f"tls_privatekey = {tmp_path}/key.pem\nlog_selector = +proxy")
    context = ssl.create_default_context()
    authority.configure_trust(context)
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(build_v2("PROXY", "INET", "198.51.100.4", "198.51.100.1", 5555, 25))
    smtp = smtplib.SMTP(timeout=10)
    smtp.sock, smtp.file, smtp._host = raw, None, "mta.test"
    assert smtp.getreply()[0] == 220
    smtp.ehlo("c.example")
    smtp.starttls(context=context)
    smtp.ehlo("c.example")
    smtp.sendmail("a@example.org", ["u@localhost"], MESSAGE)
    smtp.quit()
    log = server.wait_for_log(" <= a@example.org")
    assert re.search(r"H=\(c.example\) \[198.51.100.4\] P=esmtps X=\S+ PRX=127.0.0.1 S=", log)

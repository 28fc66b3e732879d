"""The files in etc/, each read by the real program that would read it."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from harness import REPO, find_program, free_port, wait_for_port
from mta.lookups import LookupCache
from test_smtp_server import Client, MESSAGE

ETC = os.path.join(REPO, "etc")
HAPROXY = find_program("haproxy")
DANTED = find_program("danted")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def example(name: str) -> str:
    with open(os.path.join(ETC, name)) as handle:
        return handle.read()


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=60)


# -- HAProxy ----------------------------------------------------------------------


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make test installs it)")
def test_haproxy_example_is_valid_as_shipped():
    result = subprocess.run([HAPROXY, "-c", "-f", os.path.join(ETC, "haproxy.cfg.example")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make test installs it)")
def test_haproxy_example_checks_and_proxies_to_a_real_server(mta, tmp_path):
    server = mta("hosts_proxy = 127.0.0.1\nlog_selector = +smtp_connection +proxy")
    front = free_port()
    text = example("haproxy.cfg.example")
    text = text.replace("    bind :25\n", f"    bind 127.0.0.1:{front}\n").replace("    bind :::25 v6only\n", "")
    text = re.sub(r"    server mta2 .*\n    server mta3 .*\n", "", text)
    text = text.replace("server mta1 10.0.0.11:25", f"server mta1 127.0.0.1:{server.port}")
    text = text.replace("inter 5s", "inter 300ms").replace("log /dev/log local0", "log stderr format raw local0")
    text = text.replace("maxconn 20000", "maxconn 2000")  # within a test machine's open-files limit
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", front)
        # the smtpchk health check: a PROXY v2 LOCAL header, then EHLO
        server.wait_for_log("SMTP connection from (haproxy-check.localdomain) [127.0.0.1]")
        client = Client(front, source="127.0.0.9")
        assert client.reply().startswith("220")
        client.command("EHLO client.example")
        client.command("MAIL FROM:<a@example.org>")
        client.command("RCPT TO:<user@localhost>")
        client.command("DATA")
        assert client.command(MESSAGE + ".").startswith("250")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    log = server.wait_for_log(" <= a@example.org")
    assert re.search(r"<= a@example.org H=\(client.example\) \[127.0.0.9\] P=esmtp PRX=127.0.0.1 ", log)
    assert "PROXY protocol failure" not in log


# -- systemd ------------------------------------------------------------------------


def test_unit_is_type_notify_and_reloads_with_hup():
    unit = example("mta-server.service")
    assert "\nType=notify\n" in unit
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in unit
    assert "start --foreground" in unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """With the repository's own paths: verify checks that the commands exist."""
    unit = example("mta-server.service")
    unit = unit.replace("/opt/mta-server/.venv/bin/mta-server", os.path.join(os.path.dirname(sys.executable),
                                                                            "mta-server"))
    unit = unit.replace("/etc/mta-server/mta.conf", os.path.join(ETC, "mta.conf"))
    path = tmp_path / "mta-server.service"
    path.write_text(unit)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mta-server.service" not in result.stderr, result.stderr


# -- Dante ----------------------------------------------------------------------------


@pytest.mark.skipif(DANTED is None, reason="danted is not installed (make test installs dante-server)")
def test_danted_example_verifies(tmp_path):
    """danted -V also checks that the internal and external addresses exist
    here, so the example's addresses become loopback ones in a copy."""
    text = example("danted.conf.example").replace("10.0.0.5", "127.0.0.1").replace("203.0.113.5", "127.0.0.1")
    path = tmp_path / "danted.conf"
    path.write_text(text)
    result = subprocess.run([DANTED, "-V", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.conf"
    broken.write_text(text.replace("command: connect", "command: no-such-command", 1))
    assert subprocess.run([DANTED, "-V", "-f", str(broken)], capture_output=True, timeout=30).returncode != 0


# -- the proxy configuration and its limits file -----------------------------------------


def test_proxy_limits_through_iplsearch():
    path = os.path.join(ETC, "proxy_limits.example")
    lookups = LookupCache()
    assert lookups.lookup("iplsearch", "192.0.2.25", path) == "50"  # the first match wins
    assert lookups.lookup("iplsearch", "192.0.2.26", path) == "20"
    assert lookups.lookup("iplsearch", "2001:db8:25::25", path) == "50"
    assert lookups.lookup("iplsearch", "2001:db8:25::1", path) == "20"
    assert lookups.lookup("iplsearch", "198.51.100.200", path) == "2"
    assert lookups.lookup("iplsearch", "203.0.113.1", path) is None
    assert lookups.lookup("iplsearch", "::ffff:192.0.2.25", path) == "50"


def proxy_config(tmp_path, with_limits_file: bool) -> str:
    text = example("mta-proxy.conf.example").replace("/var/spool/mta-server", str(tmp_path / "spool"))
    if with_limits_file:
        text = text.replace("LIMIT = 5\n", "LIMIT = ${lookup{$sender_host_address}iplsearch{"
                            + os.path.join(ETC, "proxy_limits.example") + "}{$value}{5}}\n")
    path = tmp_path / "mta.conf"
    path.write_text(text)
    return str(path)


def test_proxy_example_passes_check_config_as_shipped():
    result = cli("check-config", "-C", os.path.join(ETC, "mta-proxy.conf.example"))
    assert result.returncode == 0, result.stderr
    chapter = example("mta-proxy.conf.example")
    for line in ("LIMIT = 5", "# LIMIT = ${lookup{$sender_host_address}iplsearch{/etc/exim/proxy_limits}}",
                 "  defer message = Too many connections from this IP right now",
                 "        ratelimit = LIMIT / 5s / per_conn / strict", "hosts_proxy = +load_balancers"):
        assert f"\n{line}\n" in chapter


def connects_until_deferred(config: str, client: str, attempts: int) -> int:
    """How many connections in a row (updating the ratelimit records) are accepted."""
    for accepted in range(attempts):
        result = cli("host-check", client, "--proxy", "10.0.0.2", "--update-ratelimits", "-C", config,
                     stdin="QUIT\r\n")
        assert result.returncode == 0, result.stderr
        if '>>> connect ACL "acl_check_connect": defer' in result.stdout:
            return accepted
    return attempts


def test_proxy_example_with_the_limits_file_in_host_check(tmp_path):
    config = proxy_config(tmp_path, with_limits_file=True)
    assert cli("check-config", "-C", config).returncode == 0
    # the smoothed rate depends on how quickly the sessions follow each other: 2 of them here
    assert 1 <= connects_until_deferred(config, "198.51.100.7", 4) <= 3   # listed: 2 per 5s
    assert connects_until_deferred(config, "203.0.113.9", 4) == 4         # not listed: 5 per 5s
    out = cli("host-check", "203.0.113.9", "--proxy", "10.0.0.2", "-C", config,
              stdin="EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<x@example.com>\r\nQUIT\r\n").stdout
    assert ">>> host 10.0.0.2 in hosts_proxy? yes" in out
    assert "550 relay not permitted" in out

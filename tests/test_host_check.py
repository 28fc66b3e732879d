"""`mta-server host-check` (Exim's -bh): real ACLs and ratelimit records, no server, nothing spooled."""
import os
import subprocess
import sys

import pytest

from harness import CHAPTER_CONNECT_ACL, REPO

MESSAGE = "Subject: test\r\n\r\nbody\r\n..stuffed\r\n.\r\n"


def write_config(tmp_path, extra: str = "") -> str:
    (tmp_path / "proxy_limits").write_text('192.0.2.0/24: 2\n"2001:db8::1": 3\n')
    path = tmp_path / "mta.conf"
    path.write_text(f"""
primary_hostname = mta.test
local_interfaces = 127.0.0.1
daemon_smtp_ports = 2525
spool_directory = {tmp_path}/spool
hosts_proxy = 127.0.0.1
domainlist local_domains = localhost
log_selector = +smtp_connection
smtp_banner = $primary_hostname ESMTP from=$sender_host_address proxy=$proxy_session via=$proxy_local_address
acl_smtp_connect = acl_check_connect
acl_smtp_rcpt = acl_check_rcpt
LIMIT = ${{lookup{{$sender_host_address}}iplsearch{{{tmp_path}/proxy_limits}}{{$value}}{{5}}}}
{extra}
begin acl

{CHAPTER_CONNECT_ACL}
acl_check_rcpt:
  drop    local_parts = dropme
          message = go away
  accept  domains = +local_domains
  deny    message = relay not permitted
""")
    return str(path)


def host_check(config: str, *args: str, commands: str = "QUIT\r\n") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", "host-check", *args, "-C", config],
                          cwd=REPO, input=commands.encode(), capture_output=True, timeout=60)


def lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


def ratelimit_dump(config: str) -> str:
    result = subprocess.run([sys.executable, "-m", "workers.cli", "ratelimit-dump", "-C", config],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    return result.stdout


def test_session_through_proxy_runs_the_acls_and_spools_nothing(tmp_path):
    config = write_config(tmp_path)
    session = ("EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\n"
               "RCPT TO:<u@elsewhere.example>\r\nDATA\r\n" + MESSAGE + "QUIT\r\n")
    out = lines(host_check(config, "192.0.2.5", "--proxy", "127.0.0.1", commands=session))
    text = "\n".join(out)
    assert ">>> host 127.0.0.1 in hosts_proxy? yes" in out
    assert f'>>> connect ACL "acl_check_connect": accept at {config}:' in text
    banner = next(line for line in out if line.startswith("220 "))
    assert "from=192.0.2.5 proxy=yes via=127.0.0.1" in banner
    assert f'>>> rcpt ACL "acl_check_rcpt": accept at {config}:' in text
    assert '>>> rcpt ACL "acl_check_rcpt": deny at' in text and "(relay not permitted)" in text
    assert "550 relay not permitted" in out
    assert "LOG: REJECT: H=(client.example) [192.0.2.5] F=<a@example.org> rejected RCPT " \
           "<u@elsewhere.example>: relay not permitted" in out
    data_reply = out.index("**** SMTP testing: that is not a real message id!") - 1
    assert out[data_reply].startswith("250 OK id=")
    assert out[-1].startswith("221 ")
    assert not os.path.exists(tmp_path / "spool" / "input") or not os.listdir(tmp_path / "spool" / "input")


def test_ratelimit_is_read_but_not_written_unless_asked(tmp_path):
    config = write_config(tmp_path)
    first = lines(host_check(config, "192.0.2.7", "--proxy", "127.0.0.1"))
    assert any(line.startswith(">>> ratelimit table not usable") for line in first)
    assert not os.path.exists(tmp_path / "spool" / "db" / "ratelimit")  # read-only never creates it

    verdicts = []
    while len(verdicts) < 6 and not any(": defer at" in verdict for verdict in verdicts):
        # LIMIT for 192.0.2.0/24 is 2 per 5s: the third in a row is deferred on any sane machine
        out = lines(host_check(config, "192.0.2.7", "--proxy", "127.0.0.1", "--update-ratelimits"))
        verdicts.append(next(line for line in out if line.startswith(">>> connect ACL")))
    assert ": accept at" in verdicts[0]
    assert ": defer at" in verdicts[-1] and "(Too many connections from this IP right now)" in verdicts[-1]
    recorded = ratelimit_dump(config)
    assert "key: 5s/per_conn/192.0.2.7" in recorded

    out = lines(host_check(config, "192.0.2.7", "--proxy", "127.0.0.1"))
    assert any(line.startswith('>>> connect ACL "acl_check_connect": defer') for line in out)
    assert "451 Too many connections from this IP right now" in out
    assert ratelimit_dump(config) == recorded  # computed from the table, not written back

    other = lines(host_check(config, "198.51.100.1", "--proxy", "127.0.0.1"))  # not in the file: LIMIT 5
    assert any(line.startswith('>>> connect ACL "acl_check_connect": accept') for line in other)
    assert ratelimit_dump(config) == recorded


def test_proxy_host_without_proxy_option_fails_negotiation(tmp_path):
    out = lines(host_check(write_config(tmp_path), "127.0.0.1", commands="EHLO x\r\nQUIT\r\n"))
    assert ">>> host 127.0.0.1 in hosts_proxy? yes" in out
    assert "503 Command refused, required Proxy negotiation failed" in out


def test_proxy_not_in_hosts_proxy_is_the_client(tmp_path):
    out = lines(host_check(write_config(tmp_path), "192.0.2.9", "--proxy", "10.9.9.9"))
    assert any(line.startswith(">>> host 10.9.9.9 in hosts_proxy? no") for line in out)
    assert any("from=10.9.9.9 proxy= via=" in line for line in out if line.startswith("220 "))


def test_drop_ends_the_session_and_unset_acls_are_named(tmp_path):
    session = "HELO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<dropme@localhost>\r\nNOOP\r\n"
    out = lines(host_check(write_config(tmp_path), "192.0.2.10", "--proxy", "127.0.0.1", commands=session))
    assert ">>> helo: no ACL set (nothing to check): accept" in out
    assert any(line.startswith('>>> rcpt ACL "acl_check_rcpt": drop at') for line in out)
    assert out[-1] == "550 go away"  # NOOP was never read


def test_data_acl_refusal_and_delay_are_reported(tmp_path):
    config = write_config(tmp_path, "acl_smtp_data = acl_check_data\nacl_smtp_predata = acl_check_predata")
    with open(config, "a") as handle:
        handle.write("\nacl_check_predata:\n  accept delay = 30s\n"
                     "\nacl_check_data:\n  deny message = no thanks\n")
    session = "EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\n" + MESSAGE + "QUIT\r\n"
    result = host_check(config, "192.0.2.11", "--proxy", "127.0.0.1", commands=session)
    out = lines(result)
    assert ">>> delay of 30s skipped in host-check mode" in out
    assert any(line.startswith('>>> data ACL "acl_check_data": deny at') for line in out)
    assert "550 no thanks" in out
    assert any(line.startswith("LOG: REJECT: H=(x) [192.0.2.11] F=<a@example.org> rejected after DATA")
               for line in out)


@pytest.mark.parametrize("arguments", [["not-an-ip"], ["192.0.2.1", "--proxy", "nope"]])
def test_bad_addresses_are_refused(tmp_path, arguments):
    result = host_check(write_config(tmp_path), *arguments)
    assert result.returncode == 2
    assert b"is not an IP address" in result.stderr

"""ACLs in the real server: real connections, several workers, HAProxy."""
import os
import re
import signal
import time

import pytest

from harness import CHAPTER_CONNECT_ACL
from test_proxy_integration import HAPROXY, HAProxy
from test_smtp_server import Client

CHAPTER = """
{limit}
acl_smtp_connect = acl_check_connect
begin acl
""" + CHAPTER_CONNECT_ACL
DEFERRED = "451 Too many connections from this IP right now"


def banner(port: int, source: str) -> tuple[str, bool]:
    """The first reply and whether the server then closed the connection."""
    client = Client(port, source=source)
    reply = client.reply()
    closed = client.closed() if reply.startswith("4") else False
    client.close()
    return reply, closed


def pids_of(log: str, text: str) -> set[int]:
    return {int(pid) for pid in re.findall(rf"^\S+ \S+ \[(\d+)\] .*{re.escape(text)}", log, re.M)}


def test_chapter_example_limits_per_ip_across_workers(mta):
    server = mta("log_selector = +smtp_connection +pid\n" + CHAPTER.format(limit="LIMIT = 5"), workers=2)
    workers = server.worker_pids("smtp")
    replies = []
    for alone, other in (workers, workers[::-1]):  # each worker in turn takes 10, the other one stopped
        os.kill(other, signal.SIGSTOP)
        try:
            replies += [banner(server.port, "127.0.0.2") for _ in range(10)]
        finally:
            os.kill(other, signal.SIGCONT)
    assert [reply[:3] for reply, _ in replies] == ["220"] * 5 + ["451"] * 15
    assert all(reply == DEFERRED and closed for reply, closed in replies[5:])
    assert banner(server.port, "127.0.0.3")[0].startswith("220")
    log = server.wait_for_log("Too many connections from this IP right now", kind="reject")
    connected = pids_of(server.log(), "SMTP connection from [127.0.0.2]")
    refused = pids_of(log, 'rejected connection in "connect" ACL: Too many connections from this IP right now')
    assert len(workers) == 2 and connected == set(workers)
    assert refused == set(workers), "the second worker refuses on the first one's count"
    assert len(re.findall("rejected connection in .connect. ACL", log)) == 15


def test_iplsearch_limits_per_ip_and_unlisted_ip(mta, tmp_path):
    limits = tmp_path / "proxy_limits"
    limits.write_text("127.0.0.2: 2\n127.0.0.3: 4\n127.0.0.254: 1000\n")
    lookup = f"LIMIT = ${{lookup{{$sender_host_address}}iplsearch{{{limits}}}}}"
    server = mta(CHAPTER.format(limit=lookup), workers=2)
    assert [banner(server.port, "127.0.0.2")[0][:3] for _ in range(4)] == ["220", "220", "451", "451"]
    assert [banner(server.port, "127.0.0.3")[0][:3] for _ in range(5)] == ["220"] * 4 + ["451"]
    assert banner(server.port, "127.0.0.4") == (DEFERRED, True)


RCPT_ACL = """
acl_smtp_rcpt = rcpt
begin acl
rcpt:
  warn    log_message = warned about $local_part
          local_parts = warnme
  deny    local_parts = deny
          message = denied $local_part
  defer   local_parts = defer
          message = deferred $local_part
  deny    local_parts = broken
          condition = ${if eq{$nosuch}{x}}
  drop    local_parts = drop
  discard local_parts = discard
  require message = required a local domain
          domains = +local_domains
  accept
"""


def test_verbs_at_rcpt_give_exims_replies(mta):
    server = mta(RCPT_ACL)
    client = Client(server.port, source="127.0.0.2")
    assert client.reply().startswith("220")
    client.command("EHLO c.example")
    assert client.command("MAIL FROM:<a@example.org>").startswith("250")
    assert client.command("RCPT TO:<deny@localhost>") == "550 denied deny"
    assert client.command("RCPT TO:<defer@localhost>") == "451 deferred defer"
    assert client.command("RCPT TO:<broken@localhost>") == "451 Temporary local problem - please try later"
    assert client.command("RCPT TO:<warnme@localhost>").startswith("250")
    assert client.command("RCPT TO:<discard@localhost>").startswith("250")
    assert client.command("RCPT TO:<user@elsewhere.example>") == "550 required a local domain"
    assert client.command("RCPT TO:<drop@localhost>") == "550 Administrative prohibition"
    assert client.closed()
    log = server.wait_for_log("rejected RCPT <drop@localhost>", kind="reject")
    assert "H=(c.example) [127.0.0.2] F=<a@example.org> rejected RCPT <deny@localhost>: denied deny" in log
    assert "F=<a@example.org> temporarily rejected RCPT <defer@localhost>: deferred defer" in log
    assert ('F=<a@example.org> temporarily rejected RCPT <broken@localhost>: failed to expand ACL string '
            '"${if eq{$nosuch}{x}}": unknown variable name "nosuch"') in log
    assert "H=(c.example) [127.0.0.2] Warning: warned about warnme" in server.log()


def test_delay_in_one_session_does_not_stall_another(mta):
    server = mta("acl_smtp_connect = connect\nbegin acl\nconnect:\n"
                 "  warn   hosts = 127.0.0.2\n         delay = 2s\n  accept\n", workers=1)
    started = time.monotonic()
    slow = Client(server.port, source="127.0.0.2")
    time.sleep(0.2)
    fast = Client(server.port, source="127.0.0.3")
    assert fast.reply().startswith("220")
    assert time.monotonic() - started < 1.5
    assert slow.reply().startswith("220")
    assert time.monotonic() - started >= 2.0


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_ratelimit_behind_haproxy_counts_the_real_client(mta, tmp_path):
    server = mta("hosts_proxy = 127.0.0.1\n" + CHAPTER.format(limit="LIMIT = 5"), workers=2)
    proxy = HAProxy(str(tmp_path), {"v2": f"127.0.0.1:{server.port} send-proxy-v2"})
    try:
        port = proxy.ports["v2"]
        replies = [banner(port, "127.0.0.2")[0] for _ in range(7)]
        assert [reply[:3] for reply in replies] == ["220"] * 5 + ["451"] * 2
        assert replies[5] == DEFERRED
        assert banner(port, "127.0.0.3")[0].startswith("220")
    finally:
        proxy.stop()
    log = server.log("reject")
    assert "[127.0.0.2] temporarily rejected connection" in log and "[127.0.0.1] " not in log

"""Remote delivery with the smtp transport against real peers: a recording
gevent SMTP server, Postfix's smtp-sink, and a loopback DNS server."""
import email
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import gevent
import pytest

from delivery_support import SmtpRecorder, log_lines, main_log, make_deliverer, smarthost_config, spool_message
from dns_server import DnsServer
from harness import wait_for_port
from mta.delivery import COMPLETED, DEFERRED_MESSAGE, NOT_DUE
from mta.retry import unpack_retry_state
from socks_servers import closed_port, free_port


@pytest.fixture
def recorder():
    server = SmtpRecorder().start()
    yield server
    server.stop()


def deliverer_for(tmp_path, recorder, options="", selector="+outgoing_port", retry="* * F,1h,10m"):
    return make_deliverer(tmp_path, smarthost_config(f"127.0.0.1::{recorder.port}", options, retry), selector)


def test_pipelined_transaction_with_dot_stuffing(tmp_path, recorder):
    deliverer, spool, logs = deliverer_for(tmp_path, recorder)
    body = b".starts with a dot\r\n..two dots\r\nnormal\r\n.\r\nlast"
    message_id = spool_message(spool, "alice@example.org", ["x@example.net", "y@example.net"], body=body)
    assert deliverer.deliver(message_id) == COMPLETED
    [received] = recorder.messages
    assert received.sender == "alice@example.org"
    assert received.recipients == ["x@example.net", "y@example.net"]
    assert received.data.endswith(body + b"\r\n")
    assert b"\r\n..starts with a dot\r\n...two dots\r\nnormal\r\n..\r\nlast\r\n" in received.wire
    assert ["MAIL FROM:<alice@example.org> SIZE=" in recorder.batches[1][0], recorder.batches[1][1:]] == [
        True, ["RCPT TO:<x@example.net>", "RCPT TO:<y@example.net>"]]
    assert received.helo == "mta.test"
    host = f"H=127.0.0.1 [127.0.0.1]:{recorder.port}"
    assert log_lines(logs, message_id) == [
        f'{message_id} => x@example.net R=smarthost T=remote_smtp {host} C="250 OK id=rec1"',
        f'{message_id} -> y@example.net R=smarthost T=remote_smtp {host} C="250 OK id=rec1"',
        f"{message_id} Completed",
    ]


def test_without_pipelining_and_ehlo_falls_back_to_helo(tmp_path, recorder):
    recorder.capabilities = ()
    recorder.reject_ehlo = True
    deliverer, spool, logs = deliverer_for(tmp_path, recorder, "  helo_data = client.$primary_hostname",
                                           selector="")
    message_id = spool_message(spool, "a@example.org", ["x@example.net", "y@example.net"],
                               body_type="8BITMIME")
    assert deliverer.deliver(message_id) == COMPLETED
    assert recorder.commands[:6] == ["EHLO client.mta.test", "HELO client.mta.test",
                                     "MAIL FROM:<a@example.org>", "RCPT TO:<x@example.net>",
                                     "RCPT TO:<y@example.net>", "DATA"]
    assert all(len(batch) == 1 for batch in recorder.batches)
    assert "H=127.0.0.1 [127.0.0.1] C=" in main_log(logs)


def test_size_and_8bitmime_when_offered(tmp_path, recorder):
    deliverer, spool, _ = deliverer_for(tmp_path, recorder)
    message_id = spool_message(spool, "a@example.org", ["x@example.net"], body=b"caf\xc3\xa9\r\n",
                               body_type="8BITMIME")
    size = os.path.getsize(spool.path(message_id, "D"))
    deliverer.deliver(message_id)
    assert f"MAIL FROM:<a@example.org> SIZE={size} BODY=8BITMIME" in recorder.commands


def test_connection_is_reused_for_the_next_message_then_closed(tmp_path, recorder):
    deliverer, spool, _ = deliverer_for(tmp_path, recorder)
    first = spool_message(spool, "a@example.org", ["x@example.net"])
    second = spool_message(spool, "b@example.org", ["y@example.net"])
    assert deliverer.deliver(first) == deliverer.deliver(second) == COMPLETED
    assert recorder.connections == 1
    assert [m.connection for m in recorder.messages] == [1, 1]
    assert recorder.commands.count("EHLO mta.test") == 1
    deliverer.services.connections.idle_seconds = 0
    assert deliverer.close_idle_connections() == 1
    assert recorder.commands[-1] == "QUIT"


def test_parked_connection_closed_by_the_peer_is_replaced(tmp_path, recorder):
    deliverer, spool, _ = deliverer_for(tmp_path, recorder)
    deliverer.deliver(spool_message(spool, "a@example.org", ["x@example.net"]))
    recorder.stop()
    gevent.sleep(0.1)
    recorder.start()
    assert deliverer.deliver(spool_message(spool, "a@example.org", ["y@example.net"])) == COMPLETED
    assert recorder.recipients() == ["x@example.net", "y@example.net"]


def test_max_rcpt_splits_into_transactions_on_one_connection(tmp_path, recorder):
    deliverer, spool, _ = deliverer_for(tmp_path, recorder, "  max_rcpt = 2")
    recipients = [f"r{n}@example.net" for n in range(5)]
    assert deliverer.deliver(spool_message(spool, "a@example.org", recipients)) == COMPLETED
    assert [m.recipients for m in recorder.messages] == [recipients[:2], recipients[2:4], recipients[4:]]
    assert recorder.connections == 1


def test_temporary_rcpt_failure_defers_with_retry_state(tmp_path, recorder):
    recorder.rcpt_reply = lambda rcpt: "451 4.7.1 greylisted" if rcpt.startswith("grey") else None
    deliverer, spool, logs = deliverer_for(tmp_path, recorder, selector="")
    message_id = spool_message(spool, "a@example.org", ["ok@example.net", "grey@example.net"])
    assert deliverer.deliver(message_id) == DEFERRED_MESSAGE
    lines = log_lines(logs, message_id)
    assert lines[0].startswith(f"{message_id} => ok@example.net")
    assert lines[1] == (f"{message_id} == grey@example.net R=smarthost T=remote_smtp defer (-44) "
                        "H=127.0.0.1 [127.0.0.1]: SMTP error from remote mail server after "
                        "RCPT TO:<grey@example.net>: 451 4.7.1 greylisted")
    with open(spool.path(message_id, "R"), "rb") as handle:
        state = unpack_retry_state(handle.read())
    assert list(state) == ["grey@example.net"]
    assert 590 < state["grey@example.net"].next_try - time.time() <= 600
    assert spool.read_journal(message_id) == {"ok@example.net": "delivered"}
    assert deliverer.deliver(message_id) == NOT_DUE
    recorder.rcpt_reply = lambda rcpt: None
    assert deliverer.deliver(message_id, forced=True) == COMPLETED
    assert recorder.recipients() == ["ok@example.net", "grey@example.net"]
    assert not os.path.exists(spool.path(message_id, "R"))


def test_permanent_failure_sends_a_dsn_to_the_sender(tmp_path, recorder):
    recorder.rcpt_reply = lambda rcpt: "550 5.1.1 <bad@example.net>: no such user" if "bad" in rcpt else None
    deliverer, spool, logs = deliverer_for(tmp_path, recorder, selector="")
    queued = []
    deliverer.on_new_message = queued.append
    message_id = spool_message(spool, "alice@example.org", ["good@example.net", "bad@example.net"])
    assert deliverer.deliver(message_id) == COMPLETED
    [bounce_id] = queued
    lines = log_lines(logs, message_id)
    assert lines[1] == (f"{message_id} ** bad@example.net R=smarthost T=remote_smtp H=127.0.0.1 [127.0.0.1]: "
                        "SMTP error from remote mail server after RCPT TO:<bad@example.net>: "
                        "550 5.1.1 <bad@example.net>: no such user")
    assert lines[2].startswith(f"{bounce_id} <= <> R={message_id} U=root P=local S=")
    assert lines[3] == f"{message_id} Completed"
    envelope = spool.read_envelope(bounce_id)
    assert (envelope.sender, envelope.recipients) == ("", ["alice@example.org"])
    assert deliverer.deliver(bounce_id) == COMPLETED
    dsn = recorder.messages[-1]
    assert (dsn.sender, dsn.recipients) == ("", ["alice@example.org"])
    report = email.message_from_bytes(dsn.data).get_payload()[1].get_payload()[1]
    assert report["Status"] == "5.1.1"
    assert report["Remote-MTA"] == "dns; 127.0.0.1"
    assert report["Diagnostic-Code"] == "smtp; 550 5.1.1 <bad@example.net>: no such user"


def test_retry_time_out_fails_and_bounces(tmp_path):
    port = closed_port()
    deliverer, spool, logs = make_deliverer(tmp_path, smarthost_config(f"127.0.0.1::{port}",
                                                                      retry="* * F,1h,10m"))
    queued = []
    deliverer.on_new_message = queued.append
    message_id = spool_message(spool, "alice@example.org", ["x@example.net"])
    start = time.time()
    assert deliverer.deliver(message_id) == DEFERRED_MESSAGE
    assert (f"{message_id} == x@example.net R=smarthost T=remote_smtp defer (111) H=127.0.0.1 [127.0.0.1]: "
            "Connection refused") in log_lines(logs, message_id)
    deliverer.clock = lambda: start + 3601
    deliverer.services.host_retry.succeeded(f"127.0.0.1:{port}")
    assert deliverer.deliver(message_id) == COMPLETED
    lines = log_lines(logs, message_id)
    assert (f"{message_id} ** x@example.net R=smarthost T=remote_smtp H=127.0.0.1 [127.0.0.1]: "
            "retry timeout exceeded") in lines
    [bounce_id] = queued
    with open(spool.path(bounce_id, "D"), "rb") as handle:
        dsn = handle.read()
    assert b"Status: 4.4.7" in dsn and b"retry timeout exceeded" in dsn


def test_refused_host_is_skipped_and_remembered(tmp_path, recorder):
    dead = closed_port()
    deliverer, spool, logs = make_deliverer(
        tmp_path, smarthost_config(f"127.0.0.1::{dead}:127.0.0.1::{recorder.port}"), "+outgoing_port")
    message_id = spool_message(spool, "a@example.org", ["x@example.net"])
    assert deliverer.deliver(message_id) == COMPLETED
    assert f"H=127.0.0.1 [127.0.0.1]:{recorder.port} C=" in main_log(logs)
    assert deliverer.services.host_retry.waiting_until(f"127.0.0.1:{dead}", time.time()) is not None


def test_all_hosts_waiting_defers_without_connecting(tmp_path):
    dead = closed_port()
    deliverer, spool, logs = make_deliverer(tmp_path, smarthost_config(f"127.0.0.1::{dead}"))
    first = spool_message(spool, "a@example.org", ["x@example.net"])
    second = spool_message(spool, "a@example.org", ["y@example.net"])
    assert deliverer.deliver(first) == deliverer.deliver(second) == DEFERRED_MESSAGE
    assert (f"{second} == y@example.net R=smarthost T=remote_smtp defer (-61): "
            "retry time not reached for any host") in log_lines(logs, second)
    with open(spool.path(second, "R"), "rb") as handle:
        state = unpack_retry_state(handle.read())["y@example.net"]
    assert state.next_try >= time.time() + 590


@pytest.mark.parametrize("setup, outcome, text", [
    ({"banner": "554 5.7.1 go away"}, "**", "after initial connection: 554 5.7.1 go away"),
    ({"mail_reply": lambda s: "452 4.3.1 busy"}, "== x@example.net R=smarthost T=remote_smtp defer (-45)",
     "after MAIL FROM:<a@example.org> SIZE="),
    ({"mail_reply": lambda s: "550 5.7.1 sender refused"}, "**", "550 5.7.1 sender refused"),
    ({"data_reply": lambda d: "452 4.3.1 full"}, "== x@example.net R=smarthost T=remote_smtp defer (-46)",
     "after end of data: 452 4.3.1 full"),
    ({"data_reply": lambda d: "554 5.6.0 bad content"}, "**", "after end of data: 554 5.6.0 bad content"),
])
def test_reply_handling(tmp_path, recorder, setup, outcome, text):
    for name, value in setup.items():
        setattr(recorder, name, value)
    deliverer, spool, logs = deliverer_for(tmp_path, recorder, selector="")
    message_id = spool_message(spool, "a@example.org", ["x@example.net"])
    deliverer.deliver(message_id)
    [line] = [line for line in log_lines(logs, message_id) if " ** " in line or " == " in line]
    assert f"{message_id} {outcome}" in line and text in line


def test_dnslookup_delivers_to_the_mx(tmp_path, recorder):
    dns = DnsServer({"example.net": {"MX": ["10 mx1.example.net.", "20 mx2.example.net."]},
                     "mx1.example.net": {"A": ["127.0.0.1"]},
                     "mx2.example.net": {"A": ["127.0.0.2"]}}).start()
    try:
        deliverer, spool, logs = make_deliverer(tmp_path, f"""
begin routers
dnslookup:
  driver = dnslookup
  dns_servers = 127.0.0.1::{dns.port}
  transport = remote_smtp
  no_more
begin transports
remote_smtp:
  driver = smtp
  port = {recorder.port}
""")
        message_id = spool_message(spool, "a@example.org", ["x@example.net", "y@Example.NET"])
        assert deliverer.deliver(message_id) == COMPLETED
    finally:
        dns.stop()
    assert recorder.recipients() == ["x@example.net", "y@Example.NET"]
    assert f"{message_id} => x@example.net R=dnslookup T=remote_smtp H=mx1.example.net [127.0.0.1] C=" \
        in main_log(logs)
    assert ("example.net", "MX") in dns.queries


def test_interface_and_transport_hosts_override(tmp_path, recorder):
    options = f"  interface = 127.0.0.2\n  hosts = 127.0.0.1::{recorder.port}\n  hosts_override"
    routed = closed_port()  # what the router says; the transport's hosts override it
    deliverer, spool, logs = make_deliverer(tmp_path, smarthost_config(f"127.0.0.1::{routed}", options),
                                            "+outgoing_port")
    assert deliverer.deliver(spool_message(spool, "a@example.org", ["x@example.net"])) == COMPLETED
    assert recorder.peers == ["127.0.0.2"]
    assert f"H=127.0.0.1 [127.0.0.1]:{recorder.port} C=" in main_log(logs)


def test_journal_skips_recipients_already_delivered(tmp_path, recorder):
    deliverer, spool, _ = deliverer_for(tmp_path, recorder)
    message_id = spool_message(spool, "a@example.org", ["one@example.net", "two@example.net", "three@example.net"])
    spool.journal(message_id, [("two@example.net", "delivered")])
    assert deliverer.deliver(message_id) == COMPLETED
    assert recorder.recipients() == ["one@example.net", "three@example.net"]


SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def test_delivery_to_postfix_smtp_sink(tmp_path):
    dumps = Path(tempfile.mkdtemp(prefix="sink-"))  # smtp-sink runs as nobody: not under tmp_path
    os.chmod(dumps, 0o777)
    port = free_port()
    sink = subprocess.Popen([SMTP_SINK, "-u", "nobody", "-d", f"{dumps}/%Y", f"127.0.0.1:{port}", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 5)
        deliverer, spool, logs = make_deliverer(tmp_path, smarthost_config(f"127.0.0.1::{port}"))
        ids = [spool_message(spool, "a@example.org", [f"u{n}@example.net", "v@example.net"],
                             body=b".x\r\n" * 100) for n in range(3)]
        assert [deliverer.deliver(message_id) for message_id in ids] == [COMPLETED] * 3, main_log(logs)
        deliverer.close()
    finally:
        sink.terminate()
        sink.wait()
    dumped = [path.read_bytes() for path in dumps.iterdir()]
    shutil.rmtree(dumps)
    assert len(dumped) == 3
    assert all(b"\n.x\n" in data or b"\r\n.x\r\n" in data for data in dumped)
    assert main_log(logs).count(' C="250 2.0.0 Ok"') == 6

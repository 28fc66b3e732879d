"""Delivery status notifications: the RFC 3464 format and their spooling."""
import email
import email.policy

from delivery_support import make_deliverer, spool_message
from mta.bounce import FailedRecipient, build_dsn, header_block, inject_bounce
from mta.spool import Envelope, Spool
from harness import LOCAL_DELIVERY

ORIGINAL = Envelope(id="1xWA00-000000000001-0000", sender="alice@example.org",
                    recipients=["bad@example.net", "worse@example.net"], received_time=1_700_000_000.0)
HEADERS = b"Received: from x by y\r\nSubject: hello\r\nMessage-ID: <m1@example.org>\r\n"


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_dsn_structure():
    failures = [
        FailedRecipient("bad@example.net", "host mx.example.net [192.0.2.1]\nSMTP error from remote mail "
                        "server after RCPT TO:<bad@example.net>: 550 5.1.1 no such user", "5.1.1",
                        "smtp; 550 5.1.1 no such user", "mx.example.net"),
        FailedRecipient("worse@example.net", "Unrouteable address"),
    ]
    data = build_dsn(ORIGINAL, failures, HEADERS, "mta.test", "1xWA01-000000000002-0000",
                     1_700_000_100.0, "B0UNDARY")
    assert data.startswith(b"Received: from mailnull by mta.test")
    assert b"\n" not in data.replace(b"\r\n", b"")
    message = parse(data)
    assert message["To"] == "alice@example.org"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-Id"] == "<E1xWA01-000000000002-0000@mta.test>"
    assert message["X-Failed-Recipients"] == "bad@example.net, worse@example.net"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, headers = message.get_payload()
    assert text.get_content_type() == "text/plain"
    assert "550 5.1.1 no such user" in text.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.test"
    assert first["Final-Recipient"] == "rfc822;bad@example.net"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx.example.net"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert second["Status"] == "5.0.0"
    assert second["Diagnostic-Code"] == "X-mta-server; Unrouteable address"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: hello\r\nMessage-ID: <m1@example.org>\r\n" in data


def test_header_block():
    assert header_block(HEADERS + b"\r\nbody\r\n") == HEADERS
    assert header_block(b"\r\nbody only\r\n") == b""
    assert header_block(b"Subject: cut") == b"Subject: cut\r\n"


def test_inject_bounce_spools_a_null_sender_message(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.create_directories()
    original_id = spool_message(spool, "alice@example.org", ["bad@example.net"])
    original = spool.read_envelope(original_id)
    size = inject_bounce(spool, "1xWA01-000000000002-0000", original,
                         [FailedRecipient("bad@example.net", "no")], "mta.test")
    bounce = spool.read_envelope("1xWA01-000000000002-0000")
    assert (bounce.sender, bounce.recipients, bounce.bounce_of, bounce.protocol, bounce.size) == (
        "", ["alice@example.org"], original_id, "local", size)
    with open(spool.path(bounce.id, "D"), "rb") as handle:
        assert b"Subject: test message\r\n" in handle.read()


def test_no_bounce_for_a_bounce(tmp_path):
    deliverer, spool, logs = make_deliverer(tmp_path, LOCAL_DELIVERY)
    queued = []
    deliverer.on_new_message = queued.append
    message_id = spool_message(spool, "", ["ghost@nowhere.example"])
    assert deliverer.deliver(message_id) == "completed"
    assert queued == [] and spool.message_ids() == []
    with open(logs.template.replace("%s", "main")) as handle:
        log = handle.read()
    assert f"{message_id} ** ghost@nowhere.example: Unrouteable address" in log
    assert f"{message_id} failed address(es) not reported: the message is a bounce" in log
    assert "<= <>" not in log

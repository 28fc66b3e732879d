"""Local delivery to maildirs through the accept router and appendfile transport."""
import os

from delivery_support import log_lines, main_log, make_deliverer, spool_message
from mta.delivery import COMPLETED, DEFERRED_MESSAGE
from harness import LOCAL_DELIVERY

CONFIG = LOCAL_DELIVERY + """  return_path_add
  envelope_to_add
  delivery_date_add
"""


def maildir_files(tmp_path, user):
    new = tmp_path / "mail" / user / "new"
    return sorted(new.iterdir()) if new.exists() else []


def test_maildir_delivery_with_exim_headers(tmp_path):
    deliverer, spool, logs = make_deliverer(tmp_path, CONFIG)
    message_id = spool_message(spool, "alice@example.org", ["bob@localhost", "carol@mta.test"],
                               body=b"line one\r\n.dotted\r\nend\r")
    assert deliverer.deliver(message_id) == COMPLETED
    [bob] = maildir_files(tmp_path, "bob")
    [carol] = maildir_files(tmp_path, "carol")
    stored = bob.read_bytes()
    assert b"\r" not in stored.replace(b"end\r", b"")
    lines = stored.split(b"\n")
    assert lines[0] == b"Return-path: <alice@example.org>"
    assert lines[1] == b"Envelope-to: bob@localhost"
    assert lines[2].startswith(b"Delivery-date: ")
    assert lines[3].startswith(b"Received: from test by mta.test")
    assert stored.endswith(b"\n\nline one\n.dotted\nend\r")
    assert b"Envelope-to: carol@mta.test\n" in carol.read_bytes()
    assert os.listdir(tmp_path / "mail" / "bob" / "tmp") == []
    assert sorted(os.listdir(tmp_path / "mail" / "bob")) == ["cur", "new", "tmp"]
    assert log_lines(logs, message_id) == [
        f"{message_id} => bob <bob@localhost> R=local_user T=local_delivery",
        f"{message_id} => carol <carol@mta.test> R=local_user T=local_delivery",
        f"{message_id} Completed",
    ]
    assert spool.message_ids() == []


def test_headers_are_optional(tmp_path):
    config = CONFIG.replace("  return_path_add\n  envelope_to_add\n  delivery_date_add\n", "")
    deliverer, spool, _ = make_deliverer(tmp_path, config)
    deliverer.deliver(spool_message(spool, "a@example.org", ["bob@localhost"]))
    [bob] = maildir_files(tmp_path, "bob")
    assert bob.read_bytes().startswith(b"Received: ")


def test_unrouteable_recipient_bounces_to_a_local_sender(tmp_path):
    deliverer, spool, logs = make_deliverer(tmp_path, CONFIG)
    queued = []
    deliverer.on_new_message = queued.append
    message_id = spool_message(spool, "alice@localhost", ["bob@localhost", "nobody@nowhere.example"])
    assert deliverer.deliver(message_id) == COMPLETED
    [bounce_id] = queued
    lines = log_lines(logs, message_id)
    assert lines[0] == f"{message_id} => bob <bob@localhost> R=local_user T=local_delivery"
    assert lines[1] == f"{message_id} ** nobody@nowhere.example: Unrouteable address"
    size = os.path.getsize(spool.path(bounce_id, "D"))
    assert lines[2] == f"{bounce_id} <= <> R={message_id} U=root P=local S={size}"
    assert lines[3] == f"{message_id} Completed"
    assert spool.message_ids() == [bounce_id]
    assert deliverer.deliver(bounce_id) == COMPLETED
    [dsn] = maildir_files(tmp_path, "alice")
    text = dsn.read_bytes()
    assert text.startswith(b"Return-path: <>\nEnvelope-to: alice@localhost\n")
    assert b"Final-Recipient: rfc822;nobody@nowhere.example" in text
    assert b"Subject: test message" in text


def test_failing_maildir_is_deferred_and_retried(tmp_path):
    config = CONFIG.replace("  maildir_format\n", "  maildir_format\n  no_create_directory\n")
    deliverer, spool, logs = make_deliverer(tmp_path, config + "\nbegin retry\n* * F,1h,10m\n")
    message_id = spool_message(spool, "a@example.org", ["bob@localhost"])
    assert deliverer.deliver(message_id) == DEFERRED_MESSAGE
    [line] = log_lines(logs, message_id)
    assert line.startswith(f"{message_id} == bob@localhost R=local_user T=local_delivery defer (2): "
                           "No such file or directory")
    assert os.path.exists(spool.path(message_id, "R"))
    assert deliverer.deliver(message_id) == "not_due"
    for folder in ("tmp", "new", "cur"):
        os.makedirs(tmp_path / "mail" / "bob" / folder)
    assert deliverer.deliver(message_id, forced=True) == COMPLETED
    assert len(maildir_files(tmp_path, "bob")) == 1
    assert "Completed" in main_log(logs)


def test_journalled_recipients_are_not_delivered_again(tmp_path):
    deliverer, spool, logs = make_deliverer(tmp_path, CONFIG)
    message_id = spool_message(spool, "a@example.org", ["one@localhost", "two@localhost", "three@localhost"])
    spool.journal(message_id, [("two@localhost", "delivered")])
    assert deliverer.deliver(message_id) == COMPLETED
    assert maildir_files(tmp_path, "two") == []
    assert len(maildir_files(tmp_path, "one")) == len(maildir_files(tmp_path, "three")) == 1
    assert [line.split()[1:3] for line in log_lines(logs, message_id)] == [
        ["=>", "one"], ["=>", "three"], ["Completed"]]

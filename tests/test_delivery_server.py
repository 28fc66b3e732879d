"""End to end: the real server (master, SMTP workers, queue runners) receives
mail over SMTP and delivers it to a recording SMTP server and to maildirs."""
import smtplib

from delivery_support import SmtpRecorder, wait_until


def routing(port: int, directory: str) -> str:
    return f"""
acl_smtp_rcpt = accept
begin routers
local_user:
  driver = accept
  domains = +local_domains
  transport = local_delivery
smarthost:
  driver = manualroute
  route_list = * 127.0.0.1::{port}
  transport = remote_smtp
begin transports
local_delivery:
  driver = appendfile
  directory = {directory}/mail/$local_part
  maildir_format
  envelope_to_add
remote_smtp:
  driver = smtp
begin retry
* * F,1h,1m
"""


def test_received_mail_is_delivered_by_the_queue_runners(mta, tmp_path):
    recorder = SmtpRecorder().start()
    try:
        server = mta(routing(recorder.port, str(tmp_path)), workers=1, runners=2)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("alice@example.org", ["bob@example.net", "carol@localhost"],
                            b"Subject: hi\r\n\r\n.leading dot\r\nbye\r\n")
        wait_until(lambda: " Completed" in server.log())
        log = server.log()
    finally:
        recorder.stop()
    [received] = recorder.messages
    assert received.recipients == ["bob@example.net"]
    assert b"\r\n.leading dot\r\nbye\r\n" in received.data
    assert " => bob@example.net R=smarthost T=remote_smtp H=127.0.0.1 [127.0.0.1] C=\"250 OK id=rec1\"" in log
    assert " => carol <carol@localhost> R=local_user T=local_delivery" in log
    [stored] = list((tmp_path / "mail" / "carol" / "new").iterdir())
    assert stored.read_bytes().startswith(b"Envelope-to: carol@localhost\nReceived: ")
    assert server.spooled_ids() == []
    wait_until(lambda: sum(r["stats"].get("delivered", 0) for r in server.worker_statuses("delivery")) == 2)
    assert len(server.worker_statuses("delivery")) == 2

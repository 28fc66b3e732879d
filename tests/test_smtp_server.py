"""The SMTP server end to end: real server process, real clients."""
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

from harness import find_program
from mta.spool import Spool


class Client:
    """A raw line-level SMTP client, for exact replies and pipelining."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, source: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed; got " + repr(lines))
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def command(self, line: str) -> str:
        self.send(line + "\r\n")
        return self.reply()

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


MESSAGE = "From: a@example.org\r\nTo: user@localhost\r\nMessage-ID: <test-1@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"


def in_data(port: int) -> Client:
    """A client that has been answered 354 for one local recipient."""
    client = Client(port)
    client.reply()
    client.command("EHLO c.example")
    client.command("MAIL FROM:<a@b.example>")
    client.command("RCPT TO:<u@localhost>")
    assert client.command("DATA").startswith("354")
    return client


def send_one(port: int, message: str = MESSAGE, rcpts=("user@localhost",)) -> str:
    client = Client(port)
    assert client.reply().startswith("220 ")
    client.command("EHLO client.example")
    assert client.command("MAIL FROM:<a@example.org>").startswith("250")
    for rcpt in rcpts:
        assert client.command(f"RCPT TO:<{rcpt}>").startswith("250")
    assert client.command("DATA").startswith("354")
    reply = client.command(message + ".")
    client.command("QUIT")
    client.close()
    return reply


def test_swaks_session_is_spooled_and_logged(mta):
    server = mta()
    swaks = find_program("swaks")
    result = subprocess.run([swaks, "--server", f"127.0.0.1:{server.port}", "--to", "user@localhost",
                             "--from", "sender@example.org", "--helo", "client.example"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    message_id = re.search(r"250 OK id=(\S+)", result.stdout).group(1)
    assert server.spooled_ids() == [message_id]
    envelope = Spool(server.spool).read_envelope(message_id)
    assert envelope.sender == "sender@example.org"
    assert envelope.recipients == ["user@localhost"]
    with open(os.path.join(server.input, message_id + "-D"), "rb") as handle:
        data = handle.read()
    assert data.startswith(b"Received: from [127.0.0.1] (helo=client.example)\r\n\tby mta.test with esmtp")
    assert envelope.size == len(data)
    log = server.wait_for_log(f"{message_id} <= sender@example.org")
    assert re.search(rf"{message_id} <= sender@example.org H=\(client.example\) \[127.0.0.1\] P=esmtp S={len(data)} id=<\S+>", log)


def test_pipelined_group_gets_all_replies_in_order(mta):
    server = mta()
    client = Client(server.port)
    client.reply()
    ehlo = client.command("EHLO c.example")
    assert "PIPELINING" in ehlo and "SIZE" in ehlo and "8BITMIME" in ehlo and "ENHANCEDSTATUSCODES" in ehlo
    client.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@localhost>\r\nRCPT TO:<y@elsewhere.example>\r\n"
                "RCPT TO:<z@localhost>\r\nDATA\r\n")
    replies = [client.reply() for _ in range(5)]
    assert [r[:3] for r in replies] == ["250", "250", "550", "250", "354"]
    client.send("Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    assert client.reply().startswith("250 OK id=")
    assert client.reply().startswith("221")
    message_id = server.spooled_ids()[0]
    assert Spool(server.spool).read_envelope(message_id).recipients == ["x@localhost", "z@localhost"]
    with open(os.path.join(server.input, message_id + "-D"), "rb") as handle:
        assert handle.read().endswith(b"\r\n\r\n.dot\r\n")


def test_sequence_errors_and_too_many_errors(mta):
    server = mta("smtp_max_synprot_errors = 3")
    client = Client(server.port)
    client.reply()
    assert client.command("MAIL FROM:<a@b.example>").startswith("503")
    client.command("EHLO c.example")
    assert client.command("RCPT TO:<x@localhost>").startswith("503")
    assert client.command("DATA").startswith("503")
    assert client.command("NOOP").startswith("250")
    assert client.command("VRFY x").startswith("252")
    assert client.command("BOGUS").startswith("500")
    final = client.reply()
    assert final.startswith("421") and "Too many syntax or protocol errors" in final
    assert client.closed()


def test_no_relaying_for_foreign_domains(mta):
    server = mta()
    client = Client(server.port)
    client.reply()
    client.command("EHLO c.example")
    client.command("MAIL FROM:<a@b.example>")
    assert client.command("RCPT TO:<victim@elsewhere.example>").startswith("550")
    assert client.command("RCPT TO:<u@LOCALHOST>").startswith("250")


def test_oversize_message_is_refused_and_not_spooled(mta):
    server = mta("message_size_limit = 10K")
    client = Client(server.port)
    client.reply()
    client.command("EHLO c.example")
    assert client.command("MAIL FROM:<a@b.example> SIZE=20000").startswith("552")
    assert client.command("MAIL FROM:<a@b.example> SIZE=2000").startswith("250")
    client.command("RCPT TO:<u@localhost>")
    client.command("DATA")
    client.send(("x" * 998 + "\r\n") * 30 + ".\r\n")
    assert client.reply().startswith("552")
    assert client.command("NOOP").startswith("250")
    assert server.spooled_ids() == []
    assert os.listdir(server.input) == []


def test_long_command_line_is_refused(mta):
    server = mta()
    client = Client(server.port)
    client.reply()
    client.send("EHLO " + "x" * 100000 + "\r\n")
    assert client.reply().startswith("500")
    assert client.command("EHLO c.example").startswith("250")


def test_idle_client_times_out(mta):
    server = mta("smtp_receive_timeout = 1s", workers=1)
    client = Client(server.port)
    client.reply()
    started = time.time()
    assert client.reply().startswith("421")
    assert 0.8 < time.time() - started < 5
    assert client.closed()


def test_the_timeout_is_per_line_a_busy_client_outlives_it_a_trickling_one_does_not(mta):
    server = mta("smtp_receive_timeout = 1s", workers=1)
    busy, trickling = Client(server.port), Client(server.port)
    busy.reply()
    trickling.reply()
    started = time.time()
    with pytest.raises(OSError):  # the server closes; a later byte meets a reset
        for byte in b"NOOP NOOP NOOP NOOP\r\n":  # 0.3 s a byte: no line within 1 s
            trickling.send(bytes([byte]))
            time.sleep(0.3)
            assert busy.command("NOOP").startswith("250")  # a line every 0.3 s keeps it alive
    assert time.time() - started < 3
    server.wait_for_log("SMTP command timeout")
    assert busy.command("QUIT").startswith("221")


def test_disconnect_mid_data_leaves_nothing(mta):
    server = mta()
    client = in_data(server.port)
    client.send("Subject: half\r\n\r\nsome data")
    time.sleep(0.3)
    client.close()
    time.sleep(0.5)
    assert os.listdir(server.input) == []


@pytest.fixture
def certificates(tmp_path):
    authority = trustme.CA()
    cert = authority.issue_cert("mta.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return cert_path, key_path, context


def test_starttls(mta, certificates):
    cert, key, client_context = certificates
    server = mta(f"tls_certificate = {cert}\ntls_privatekey = {key}")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.ehlo("c.example")
        assert smtp.has_extn("starttls")
        smtp.starttls(context=client_context)
        smtp.ehlo("c.example")
        assert not smtp.has_extn("starttls")
        smtp.sendmail("a@example.org", ["u@localhost"], MESSAGE)
    log = server.wait_for_log(" <= a@example.org")
    assert re.search(r"P=esmtps X=TLSv1\.[23]:\S+:\d+", log)


def test_tls_on_connect(mta, certificates):
    cert, key, client_context = certificates
    from harness import free_port
    tls_port = free_port()
    server = mta(f"tls_certificate = {cert}\ntls_privatekey = {key}\ntls_on_connect_ports = {tls_port}")
    with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10, context=client_context) as smtp:
        smtp.ehlo("c.example")
        smtp.sendmail("a@example.org", ["u@localhost"], MESSAGE)
    assert len(server.spooled_ids()) == 1


def test_a_silent_tls_on_connect_client_times_out_without_stalling_others(mta, certificates):
    cert, key, _ = certificates
    from harness import free_port
    tls_port = free_port()
    server = mta(f"smtp_receive_timeout = 2s\ntls_certificate = {cert}\ntls_privatekey = {key}\n"
                 f"tls_on_connect_ports = {tls_port}", workers=1)
    silent = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    started = time.time()
    time.sleep(0.2)
    other = Client(server.port)  # the same worker serves it while the handshake waits
    assert other.reply().startswith("220")
    assert other.command("QUIT").startswith("221")
    assert time.time() - started < 1.5
    assert silent.recv(100) == b""  # no ClientHello: the handshake is bounded like a line
    assert 1.5 < time.time() - started < 6
    server.wait_for_log("TLS negotiation timeout on connection from [127.0.0.1]")


def test_killed_worker_mid_data_leaves_nothing_visible_and_others_serve(mta):
    server = mta(workers=2)
    client = in_data(server.port)
    client.send("Subject: half\r\n\r\n" + "x" * 1000)
    time.sleep(0.3)
    busy = [s["pid"] for s in server.worker_statuses("smtp") if s["stats"].get("connections")]
    time.sleep(1.2)  # let the heartbeat publish the connection count
    busy = [s["pid"] for s in server.worker_statuses("smtp") if s["stats"].get("connections")]
    assert len(busy) == 1
    os.kill(busy[0], signal.SIGKILL)
    assert client.closed()
    assert server.spooled_ids() == []
    for _ in range(3):
        assert send_one(server.port).startswith("250 OK id=")
    assert len(server.spooled_ids()) == 3
    server.wait_for_log("killed by signal 9", kind="panic")


def test_master_killed_after_250_message_survives_restart(mta):
    server = mta()
    reply = send_one(server.port)
    message_id = reply.split("id=")[1]
    server.kill_all()
    server.start()
    assert message_id in server.spooled_ids()
    queue = server.cli("queue")
    assert message_id in queue.stdout and "user@localhost" in queue.stdout


def test_second_master_on_same_spool_is_refused(mta):
    server = mta()
    result = server.cli("start", "--foreground")
    assert result.returncode != 0
    assert "another mta-server master" in result.stderr


def test_status_lists_workers(mta):
    server = mta(workers=2)
    time.sleep(1.2)
    result = server.cli("status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" smtp ") == 2
    assert "queue: 0 message(s)" in result.stdout


def test_reload_replaces_workers_and_bad_config_keeps_old(mta):
    server = mta(workers=2)
    before = set(server.worker_pids("smtp"))
    server.signal_master(signal.SIGHUP)
    server.wait_for_log("generation 2")
    deadline = time.time() + 10
    while time.time() < deadline and set(server.worker_pids("smtp")) & before:
        time.sleep(0.1)
    assert not set(server.worker_pids("smtp")) & before
    with open(server.config_path, "a") as handle:
        handle.write("\nno_such_option = 1\n")
    server.signal_master(signal.SIGHUP)
    server.wait_for_log("reload failed", kind="panic")
    assert send_one(server.port).startswith("250")


def test_hup_under_smtp_source_load_loses_no_session(mta):
    smtp_source = find_program("smtp-source")
    server = mta(workers=2)
    load = subprocess.Popen([smtp_source, "-s", "20", "-m", "1500", "-l", "1024", "-f", "a@example.org",
                             "-t", "user@localhost", f"127.0.0.1:{server.port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(5):
        time.sleep(0.3)
        server.signal_master(signal.SIGHUP)
    output, _ = load.communicate(timeout=120)
    assert load.returncode == 0, output
    assert len(server.spooled_ids()) == 1500

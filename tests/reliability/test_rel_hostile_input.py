"""Endless lines and headers, oversize DATA, thousands of RCPTs, NUL and
8-bit garbage: the right reply, the session goes on or ends cleanly, and the
worker's memory stays bounded (its peak RSS, VmHWM, hardly moves although
hundreds of megabytes go through it)."""
from __future__ import annotations

import threading

from reliability_helpers import peak_rss_kib
from test_smtp_server import MESSAGE, Client, send_one

MIB = 1024 * 1024
SIZE_LIMIT_MIB = 5
RECIPIENTS_MAX = 100
RSS_GROWTH_BOUND_MIB = 24   # far below what is sent: nothing of that size is ever held


def session(port: int) -> Client:
    client = Client(port, timeout=60)
    assert client.reply().startswith("220")
    assert client.command("EHLO hostile.example").startswith("250")
    return client


def in_data(port: int, recipients: int = 1) -> Client:
    client = session(port)
    assert client.command("MAIL FROM:<a@example.org>").startswith("250")
    for index in range(recipients):
        assert client.command(f"RCPT TO:<u{index}@localhost>").startswith("250")
    assert client.command("DATA").startswith("354")
    return client


def send_in_chunks(client: Client, pattern: bytes, total: int) -> None:
    chunk = pattern * (MIB // len(pattern))
    for _ in range(total // len(chunk)):
        client.send(chunk)


def endless_command_line(port: int) -> str:
    client = session(port)
    send_in_chunks(client, b"A" * 1024, 32 * MIB)
    reply = client.command("")
    assert reply.startswith("500 5.5.2 Line too long"), reply
    assert client.command("NOOP").startswith("250")
    return "32 MiB command line without LF -> 500, session goes on"


def long_data_line_within_limit(port: int) -> str:
    client = in_data(port)
    client.send("Subject: one long line\r\n\r\n")
    send_in_chunks(client, b"y" * 1024, 4 * MIB)
    reply = client.command("\r\n.")
    assert reply.startswith("250 OK id="), reply
    return "4 MiB DATA line without CRLF -> 250 (spooled)"


def endless_data_line(port: int) -> str:
    client = in_data(port)
    send_in_chunks(client, b"z" * 1024, 64 * MIB)
    reply = client.command("\r\n.")
    assert reply.startswith("552"), reply
    assert client.command("NOOP").startswith("250")
    return "64 MiB DATA line without CRLF -> 552, session goes on"


def endless_headers(port: int) -> str:
    client = in_data(port)
    send_in_chunks(client, b"X-Endless: " + b"h" * 100 + b"\r\n", 64 * MIB)
    reply = client.command(".")
    assert reply.startswith("552"), reply
    assert client.command("RSET").startswith("250")
    return "64 MiB of header lines, no body -> 552"


def oversize_data(port: int) -> str:
    client = in_data(port)
    send_in_chunks(client, b"x" * 998 + b"\r\n", 64 * MIB)
    reply = client.command(".")
    assert reply.startswith("552"), reply
    assert client.command("MAIL FROM:<a@example.org>").startswith("250")
    return f"64 MiB DATA, limit {SIZE_LIMIT_MIB} MiB -> 552, next MAIL 250"


def thousands_of_recipients(port: int) -> str:
    client = session(port)
    assert client.command("MAIL FROM:<a@example.org>").startswith("250")
    count = 5000
    commands = "".join(f"RCPT TO:<r{index}@localhost>\r\n" for index in range(count))
    sender = threading.Thread(target=client.send, args=(commands,))
    sender.start()
    replies = [client.reply()[:3] for _ in range(count)]
    sender.join()
    assert replies[:RECIPIENTS_MAX] == ["250"] * RECIPIENTS_MAX
    assert set(replies[RECIPIENTS_MAX:]) == {"452"}
    assert client.command("DATA").startswith("354")
    assert client.command(MESSAGE + ".").startswith("250 OK id=")
    return f"{count} pipelined RCPTs -> {RECIPIENTS_MAX} x 250, rest 452, message accepted"


def garbage_commands(port: int) -> str:
    client = session(port)
    replies = [client.command(line) for line in (
        "\x00\x00EHLO\x00x",
        "MAIL FROM:<a\x00b@example.org>",
        "\xff\xfe\x80 garbage \xc3\x28",
    )]
    assert [reply[:3] for reply in replies] == ["500", "501", "500"], replies
    client.send(b"\x00" * 100 + b"\r\n")
    assert client.reply().startswith("500")
    assert client.reply().startswith("421 4.7.0 mta.test Too many syntax or protocol errors")
    assert client.closed()
    return "NUL / 8-bit commands -> 500, 501, 500, then 421 and close"


ATTACKS = [endless_command_line, long_data_line_within_limit, endless_data_line, endless_headers,
           oversize_data, thousands_of_recipients, garbage_commands]


def test_hostile_input_is_answered_with_bounded_memory(mta, report):
    server = mta(f"message_size_limit = {SIZE_LIMIT_MIB}M\nrecipients_max = {RECIPIENTS_MAX}", workers=1)
    [worker] = server.worker_pids("smtp")
    assert send_one(server.port).startswith("250")  # warm up: what every session allocates
    before = peak_rss_kib(worker)
    outcomes = []
    for attack in ATTACKS:
        outcomes.append(attack(server.port))
        growth_mib = (peak_rss_kib(worker) - before) / 1024
        print(f"\n{attack.__name__}: peak RSS +{growth_mib:.1f} MiB")
        assert growth_mib < RSS_GROWTH_BOUND_MIB, f"{attack.__name__}: peak RSS grew by {growth_mib:.0f} MiB"
    assert server.worker_pids("smtp") == [worker], "the worker was replaced"
    assert server.log("panic") == ""
    assert send_one(server.port).startswith("250")
    growth_mib = (peak_rss_kib(worker) - before) / 1024
    for outcome in outcomes:
        report("hostile input", outcome, 1, 0, "")
    report("hostile input (memory)", "all of the above on one worker", len(ATTACKS), 0,
           f"peak RSS +{growth_mib:.1f} MiB for ~230 MiB sent")

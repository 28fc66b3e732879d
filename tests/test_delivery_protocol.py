"""Pure pieces of the delivery side: SMTP reply parsing, dot-stuffing across
chunk boundaries, line-ending conversion, log line formats."""
import pytest
from hypothesis import given, strategies as st

from mta.delivery import LogInfo, deferred_line, delivered_line, failed_line, format_duration, host_fields
from mta.routers import Address
from mta.smtp_client import (
    SmtpProtocolError, SmtpReply, data_terminator, dot_stuff, mail_from_command, parse_capabilities,
    parse_reply,
)
from mta.transports import DEFERRED, DELIVERED, FAILED, HostUsed, Result
from mta.transports.appendfile import crlf_to_lf


def test_single_and_multi_line_replies():
    assert parse_reply(b"250 OK\r\n354") == (SmtpReply(250, ("OK",)), 8)
    reply, used = parse_reply(b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\nextra")
    assert reply == SmtpReply(250, ("mx.example", "PIPELINING", "SIZE 100")) and used == 46
    assert parse_reply(b"250-partial\r\n") == (None, 0)
    assert parse_reply(b"220\r\n") == (SmtpReply(220, ("",)), 5)
    assert parse_capabilities(reply) == {"PIPELINING": "", "SIZE": "100"}


@pytest.mark.parametrize("data", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"25O x\r\n", b"250x\r\n"])
def test_malformed_replies(data):
    with pytest.raises(SmtpProtocolError):
        parse_reply(data)


def test_reply_texts():
    reply = SmtpReply(550, ("5.1.1 no such user", "see https://example"))
    assert reply.one_line == "550 5.1.1 no such user see https://example"
    assert reply.text == "550 5.1.1 no such user\n550 see https://example"
    assert reply.enhanced_status == "5.1.1"
    assert SmtpReply(451, ("greylisted",)).enhanced_status == ""


def test_mail_from_parameters():
    assert mail_from_command("a@b", 10, {}, "8BITMIME") == "MAIL FROM:<a@b>"
    assert mail_from_command("", 10, {"SIZE": "", "8BITMIME": ""}, "8BITMIME") == "MAIL FROM:<> SIZE=10 BODY=8BITMIME"


def stuff_whole(data: bytes) -> bytes:
    return dot_stuff(data, b"\r\n")


lines = st.lists(st.sampled_from([b"", b".", b"..x", b"a.b", b".\r", b"x"]), max_size=12)


@given(lines, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20))
def test_chunked_stuffing_equals_whole_stuffing(parts, cuts):
    data = b"\r\n".join(parts) + b"\r\n"
    chunks, position = [], 0
    for cut in cuts:
        chunks.append(data[position:position + cut])
        position += cut
    chunks.append(data[position:])
    tail, out = b"\r\n", b""
    for chunk in chunks:
        out += dot_stuff(chunk, tail)
        tail = (tail + chunk)[-2:]
    assert out == stuff_whole(data)
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in out.split(b"\r\n"))
    assert unstuffed == data


def test_terminator():
    assert data_terminator(b"\r\n") == b".\r\n"
    assert data_terminator(b"ab") == b"\r\n.\r\n"


@given(st.binary(max_size=60), st.lists(st.integers(min_value=1, max_value=9), max_size=10))
def test_crlf_conversion_across_chunks(data, cuts):
    carry, out, position = b"", b"", 0
    for cut in cuts + [len(data)]:
        chunk, position = data[position:position + cut], position + cut
        converted, carry = crlf_to_lf(chunk, carry)
        out += converted
    assert out + carry == data.replace(b"\r\n", b"\n")


INFO = LogInfo("1xWA00-000000000001-0000", "a@b.example", 1234, 1000.0)


def test_log_lines():
    host = HostUsed("mx.example", "192.0.2.1", 25, "127.0.0.1", 1080, "TLSv1.3:TLS_AES_256_GCM_SHA384:256")
    result = Result(Address.parse("x@y.example"), DELIVERED, 'OK "queued"', 0, host)
    everything = frozenset({"outgoing_port", "proxy", "tls_cipher", "sender_on_delivery", "delivery_size",
                            "queue_time"})
    assert delivered_line(INFO, result, "=>", "r", "t", False, everything, 1065.0) == (
        '1xWA00-000000000001-0000 => x@y.example F=<a@b.example> R=r T=t S=1234 H=mx.example [192.0.2.1]:25 '
        'PRX=[127.0.0.1]:1080 X=TLS1.3:TLS_AES_256_GCM_SHA384:256 C="OK \\"queued\\"" QT=1m5s')
    assert host_fields(host, frozenset()) == " H=mx.example [192.0.2.1]"
    deferred = Result(Address.parse("x@y.example"), DEFERRED, "Connection refused", 111)
    assert deferred_line(INFO, deferred, "r", "t", frozenset()) == (
        "1xWA00-000000000001-0000 == x@y.example R=r T=t defer (111): Connection refused")
    failed = Result(Address.parse("x@y.example"), FAILED, "Unrouteable address")
    assert failed_line(INFO, failed, "", "", frozenset()) == "1xWA00-000000000001-0000 ** x@y.example: Unrouteable address"
    assert [format_duration(s) for s in (0, 59, 61, 3600, 90061)] == ["0s", "59s", "1m1s", "1h0m0s", "1d1h1m1s"]

"""Tests for mta.proxy_protocol: grammar, TLVs, CRC32C, the gevent reader, and real HAProxy."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import gevent.server
import gevent.socket
import gevent.ssl
import gevent.subprocess
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import free_port
from mta import proxy_protocol as pp
from mta.proxy_protocol import (
    ProxyHeader,
    ProxyProtocolError,
    build_ssl_tlv,
    build_v1,
    build_v2,
    crc32c,
    parse,
    read_header,
)

SIG = pp.V2_SIGNATURE


def reason_of(data: bytes) -> str:
    with pytest.raises(ProxyProtocolError) as caught:
        parse(data)
    return caught.value.reason


def parsed(data: bytes) -> ProxyHeader:
    result = parse(data)
    assert result is not None
    header, consumed = result
    assert consumed == len(data)
    return header


def ssl_value(client: int = 0x07, verify: int = 0, subs=()) -> bytes:
    return build_ssl_tlv(client, verify, subs)


# ------------------------------------------------------------------ detection


def test_empty_input_needs_more() -> None:
    assert parse(b"") is None


@pytest.mark.parametrize("data", [b"G", b"GET / HTTP/1.0\r\n", b"\x16\x03\x01", b"EHLO x\r\n", b"proxy "])
def test_other_protocols_fail_on_the_first_byte(data: bytes) -> None:
    assert "not a PROXY protocol header" in reason_of(data[:1])
    assert "not a PROXY protocol header" in reason_of(data)


@pytest.mark.parametrize("length", range(2, 7))
def test_v1_prefix_fails_as_soon_as_it_diverges(length: int) -> None:
    assert parse(b"PROXY "[:length]) is None
    assert "does not start with 'PROXY '" in reason_of(b"PROXY "[: length - 1] + b"!")


def test_proxy_without_space_fails_at_the_sixth_byte() -> None:
    assert "does not start with 'PROXY '" in reason_of(b"PROXYTCP4")


@pytest.mark.parametrize("position", range(1, 12))
def test_v2_signature_fails_as_soon_as_it_diverges(position: int) -> None:
    assert parse(SIG[:position]) is None
    wrong = bytes([SIG[position] ^ 0x40])
    assert reason_of(SIG[:position] + wrong) == "v2: bad signature"


def test_memoryview_and_bytearray_inputs() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    header = build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2)
    for data in (line, header):
        expected = parse(data)
        assert parse(bytearray(data)) == expected
        assert parse(memoryview(data)) == expected


# ------------------------------------------------------------------------ v1


def test_v1_tcp4() -> None:
    header = parsed(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    assert (header.version, header.command, header.family, header.transport) == (1, "PROXY", "TCP4", "")
    assert (header.source_address, header.source_port) == ("192.168.0.1", 56324)
    assert (header.destination_address, header.destination_port) == ("192.168.0.11", 443)
    assert header.tlvs == () and header.ssl_verified is None and header.carries_addresses


def test_v1_tcp6_is_canonicalised() -> None:
    header = parsed(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 2001:db8::0:2 0 65535\r\n")
    assert header.family == "TCP6"
    assert (header.source_address, header.destination_address) == ("2001:db8::1", "2001:db8::2")
    assert (header.source_port, header.destination_port) == (0, 65535)


@pytest.mark.parametrize(
    "text, expected",
    [("::ffff:192.0.2.1", "192.0.2.1"), ("::ffff:c000:202", "192.0.2.2"), ("::2:3", "::2:3"), ("::", "::")],
)
def test_v1_tcp6_mapped_and_zero_prefixed_addresses(text: str, expected: str) -> None:
    header = parsed(f"PROXY TCP6 {text} ::1 1 2\r\n".encode())
    assert header.source_address == expected and header.family == "TCP6"


def test_v1_largest_tcp6_line() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert parsed(line).source_address == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", b"PROXY UNKNOWN anything \x00\xff goes  \r\n"],
)
def test_v1_unknown_ignores_the_rest_of_the_line(line: bytes) -> None:
    header = parsed(line)
    assert (header.command, header.family) == ("PROXY", "UNKNOWN")
    assert (header.source_address, header.source_port, header.destination_address) == (None, None, None)
    assert not header.carries_addresses


def test_v1_unknown_line_of_exactly_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107
    assert parsed(line).family == "UNKNOWN"


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "source address has a leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.00 1 2\r\n", "destination address has a leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "source port has a leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "destination port has a leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port 65536 is above 65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n", "is not a decimal number"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "is not a decimal number"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "octet above 255"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "TCP4 needs an IPv4 source address"),
        (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "TCP4 needs an IPv4 source address"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "TCP4 needs an IPv4 destination address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "TCP6 needs an IPv6 source address"),
        (b"PROXY TCP6 ::1 fe80::1%eth0 1 2\r\n", "TCP6 needs an IPv6 destination address"),
        (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "TCP6 needs an IPv6 destination address"),
        (b"PROXY TCP6 ::ffff:1.2.3.04 ::1 1 2\r\n", "TCP6 needs an IPv6 source address"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "exactly one space"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "exactly one space"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "missing protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "TCP4 needs 4 fields after the protocol, got 3"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "TCP4 needs 4 fields after the protocol, got 5"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY UNKNOWNX\r\n", "unknown protocol"),
        (b"PROXY \r\n", "missing protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR not followed by LF"),
        (b"PROXY UNKNOWN a\nb\r\n", "bare LF"),
        (b"PROXY TCP4 \xd9\xa1.2.3.4 5.6.7.8 1 2\r\n", "TCP4 needs an IPv4 source address"),
    ],
)
def test_v1_grammar_violations(line: bytes, reason: str) -> None:
    assert reason in reason_of(line)


def test_v1_fails_once_107_bytes_hold_no_crlf() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 93
    assert len(line) == 107
    assert parse(line[:106]) is None
    assert "no CRLF within the first 107 bytes" in reason_of(line)
    assert "no CRLF within the first 107 bytes" in reason_of(line[:106] + b"\r")
    assert "no CRLF within the first 107 bytes" in reason_of(line + b"\r\n")


@pytest.mark.parametrize(
    "partial",
    [
        b"PROXY TCP4 1.2.3.04 ",  # a completed field is judged at once
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
        b"PROXY TCP4 1.2.3.4  ",
        b"PROXY TCP4 1.2.3.a",  # no IPv4 address has an 'a'
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1x",
        b"PROXY TCQ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r",  # complete but for the LF: judged now
    ],
)
def test_v1_fails_before_the_line_is_complete(partial: bytes) -> None:
    reason_of(partial)


def test_v1_line_complete_but_for_its_lf_needs_more() -> None:
    assert parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None


def test_v1_leading_zero_is_reported_before_crlf() -> None:
    assert "source address has a leading zero" in reason_of(b"PROXY TCP4 1.2.3.04 ")


def test_v1_regex_fast_path_agrees_with_field_parser() -> None:
    """The fast path accepts a subset; where it answers, the full parser must agree."""
    lines = [
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::1 1 2\r\n",
        b"PROXY TCP6 0:0:0:0:0:0:0:2 ::2:3 1 2\r\n",
    ]
    for line in lines:
        fast = pp._v1_fast(line)
        assert fast is not None
        assert fast == (pp._v1_header(line[6:-2].split(b" ")), len(line))


# ------------------------------------------------------------------------ v2


def test_v2_inet_minimal() -> None:
    data = build_v2("PROXY", "INET", "192.0.2.1", "198.51.100.7", 40000, 25)
    assert len(data) == 28
    header = parsed(data)
    assert (header.version, header.command, header.family, header.transport) == (2, "PROXY", "INET", "STREAM")
    assert (header.source_address, header.source_port) == ("192.0.2.1", 40000)
    assert (header.destination_address, header.destination_port) == ("198.51.100.7", 25)
    assert header.tlvs == () and header.carries_addresses


def test_v2_inet6_with_mapped_addresses() -> None:
    header = parsed(build_v2("PROXY", "INET6", "::ffff:192.0.2.1", "2001:db8::25", 1, 2))
    assert header.family == "INET6"
    assert (header.source_address, header.destination_address) == ("192.0.2.1", "2001:db8::25")


def test_v2_local_with_address_block_and_junk_is_consumed_whole() -> None:
    block = build_v2("LOCAL", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=[(0x02, b"x")])
    junk = block[:15] + bytes([block[15] + 2]) + block[16:] + b"\xff\xff"  # TLV area now malformed
    for data in (block, junk):
        result = parse(data + b"EHLO")
        assert result is not None
        header, consumed = result
        assert consumed == len(data)
        assert (header.command, header.source_address, header.tlvs) == ("LOCAL", None, ())
        assert not header.carries_addresses


def test_v2_local_needs_no_address_block() -> None:
    header = parsed(SIG + b"\x20\x11\x00\x00")
    assert (header.command, header.family) == ("LOCAL", "INET")


def test_v2_dgram_is_parsed_and_marked() -> None:
    header = parsed(build_v2("PROXY", "INET6", "2001:db8::1", "2001:db8::2", 53, 53, transport="DGRAM"))
    assert header.transport == "DGRAM" and header.source_port == 53


def test_v2_unix_stream_and_abstract() -> None:
    header = parsed(build_v2("PROXY", "UNIX", "/run/haproxy.sock", "@abstract-name", None, None))
    assert (header.family, header.transport) == ("UNIX", "STREAM")
    assert (header.source_address, header.destination_address) == ("/run/haproxy.sock", "@abstract-name")
    assert header.source_port is None and not header.carries_addresses


def test_v2_unspec_proxy_parses_tlvs_after_the_fixed_part() -> None:
    header = parsed(build_v2("PROXY", "UNSPEC", None, None, None, None, tlvs=[(0x02, b"mx")], crc=True))
    assert (header.family, header.transport, header.authority) == ("UNSPEC", "UNSPEC", "mx")
    assert not header.carries_addresses


@pytest.mark.parametrize(
    "ver_cmd, family, reason",
    [
        (0x11, 0x11, "unsupported version 1"),
        (0x31, 0x11, "unsupported version 3"),
        (0x22, 0x11, "unsupported command 0x2"),
        (0x2F, 0x11, "unsupported command 0xf"),
        (0x21, 0x41, "unknown address family 0x4"),
        (0x21, 0x13, "unknown transport protocol 0x3"),
        (0x21, 0x10, "invalid family/transport combination 0x10"),
        (0x21, 0x01, "invalid family/transport combination 0x01"),
        (0x20, 0x30, "invalid family/transport combination 0x30"),
    ],
)
def test_v2_fixed_part_violations_fail_at_that_byte(ver_cmd: int, family: int, reason: str) -> None:
    if "version" in reason or "command" in reason:
        assert reason in reason_of(SIG + bytes([ver_cmd]))
    else:
        assert parse(SIG + bytes([ver_cmd])) is None
        assert reason in reason_of(SIG + bytes([ver_cmd, family]))


@pytest.mark.parametrize("family_byte, needed", [(0x11, 12), (0x12, 12), (0x21, 36), (0x31, 216)])
def test_v2_len_shorter_than_the_address_block(family_byte: int, needed: int) -> None:
    data = SIG + bytes([0x21, family_byte]) + (needed - 1).to_bytes(2, "big")
    assert f"needs a {needed}-byte address block, len is {needed - 1}" in reason_of(data)


def test_v2_largest_header() -> None:
    address_block = 12
    noop = (pp.PP2_TYPE_NOOP, b"\x00" * (0xFFFF - address_block - 3))
    data = build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=[noop])
    assert len(data) == 16 + 0xFFFF
    assert parse(data[:-1]) is None
    result = parse(data + b"after")
    assert result is not None and result[1] == len(data)
    with pytest.raises(ValueError):
        build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=[(0x04, noop[1] + b"\x00")])


def test_v2_each_top_level_tlv() -> None:
    tlvs = [
        (pp.PP2_TYPE_ALPN, b"smtp"),
        (pp.PP2_TYPE_AUTHORITY, "mx.exämple.org".encode()),
        (pp.PP2_TYPE_NOOP, b""),
        (pp.PP2_TYPE_UNIQUE_ID, b"\x00\x01" * 64),
        (pp.PP2_TYPE_NETNS, b"blue"),
        (0xE0, b"custom"),
        (0xF8, b""),
        (pp.PP2_TYPE_NOOP, b"pad"),
    ]
    header = parsed(build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=tlvs))
    assert header.tlvs == tuple(tlvs)
    assert (header.alpn, header.authority) == ("smtp", "mx.exämple.org")
    assert header.unique_id == b"\x00\x01" * 64
    assert header.ssl_verified is None


def test_v2_ssl_tlv_and_every_sub_tlv() -> None:
    subs = [
        (pp.PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"),
        (pp.PP2_SUBTYPE_SSL_CN, "Jürgen".encode()),
        (pp.PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_256_GCM_SHA384"),
        (pp.PP2_SUBTYPE_SSL_SIG_ALG, b"RSA-SHA256"),
        (pp.PP2_SUBTYPE_SSL_KEY_ALG, b"RSA2048"),
        (pp.PP2_SUBTYPE_SSL_GROUP, b"secp256r1"),
        (pp.PP2_SUBTYPE_SSL_SIG_SCHEME, b"rsa_pss_rsae_sha256"),
        (pp.PP2_SUBTYPE_SSL_CLIENT_CERT, b"\x30\x82\x01\x00der"),
        (0x2F, b"future"),
    ]
    value = ssl_value(pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS, 0, subs)
    header = parsed(build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=[(pp.PP2_TYPE_SSL, value)]))
    assert (header.ssl_version, header.ssl_cn, header.ssl_cipher) == ("TLSv1.3", "Jürgen", "TLS_AES_256_GCM_SHA384")
    assert header.ssl_verified is True
    assert header.tlvs == ((pp.PP2_TYPE_SSL, value),)


@pytest.mark.parametrize(
    "client, verify, verified",
    [
        (pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN, 0, True),
        (pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_SESS, 0, True),
        (pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN, 20, False),
        (pp.PP2_CLIENT_SSL, 0, False),  # HAProxy: no certificate, verify left at 0
        (0, 0, False),
    ],
)
def test_v2_ssl_verified(client: int, verify: int, verified: bool) -> None:
    data = build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=[(0x20, ssl_value(client, verify))])
    assert parsed(data).ssl_verified is verified


def inet_with(*tlvs: tuple[int, bytes]) -> bytes:
    return build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=tlvs)


def with_len_delta(data: bytes, delta: int, extra: bytes) -> bytes:
    """Grow a header's len by `delta` and append `extra` (a hand-made malformed tail)."""
    length = int.from_bytes(data[14:16], "big") + delta
    return data[:14] + length.to_bytes(2, "big") + data[16:] + extra


@pytest.mark.parametrize(
    "data, reason",
    [
        (with_len_delta(inet_with(), 1, b"\x02"), "truncated TLV"),
        (with_len_delta(inet_with(), 2, b"\x02\x00"), "truncated TLV"),
        (with_len_delta(inet_with(), 3, b"\x02\x00\x01"), "TLV 0x02 overruns the header"),
        (with_len_delta(inet_with(), 5, b"\xe0\x00\x05ab"), "TLV 0xe0 overruns the header"),
        (inet_with((0x05, b"u" * 129)), "UNIQUE_ID is 129 bytes, more than 128"),
        (inet_with((0x02, b"a"), (0x02, b"b")), "duplicate TLV 0x02"),
        (inet_with((0x20, ssl_value()), (0x20, ssl_value())), "duplicate TLV 0x20"),
        (inet_with((0x02, b"\xff\xfe")), "AUTHORITY is not valid utf-8"),
        (inet_with((0x01, b"\xc3")), "ALPN is not valid utf-8"),
        (inet_with((0x03, b"\x00\x00\x00")), "CRC32C TLV has 3 bytes instead of 4"),
        (inet_with((0x20, b"\x01\x00\x00\x00")), "SSL TLV has 4 bytes, fewer than 5"),
        (inet_with((0x20, b"\x01\x00\x00\x00\x00\x21\x00\x09TLS")), "SSL sub-TLV 0x21 overruns"),
        (inet_with((0x20, b"\x01\x00\x00\x00\x00\x21\x00")), "truncated SSL sub-TLV"),
        (inet_with((0x20, ssl_value(subs=[(0x22, b"a"), (0x22, b"b")]))), "duplicate SSL sub-TLV 0x22"),
        (inet_with((0x20, ssl_value(subs=[(0x21, "é".encode())]))), "SSL version is not valid ascii"),
        (inet_with((0x20, ssl_value(subs=[(0x23, b"\x80")]))), "SSL cipher is not valid ascii"),
        (inet_with((0x20, ssl_value(subs=[(0x22, b"\xff")]))), "SSL CN is not valid utf-8"),
    ],
)
def test_v2_tlv_violations(data: bytes, reason: str) -> None:
    assert reason in reason_of(data)


def test_v2_repeated_noop_and_unknown_tlvs_are_fine() -> None:
    header = parsed(inet_with((0x04, b""), (0x04, b"x"), (0xE1, b"1"), (0xE1, b"2")))
    assert [kind for kind, _ in header.tlvs] == [0x04, 0x04, 0xE1, 0xE1]


def test_crc32c_known_values() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 / iSCSI check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


def test_v2_crc32c_good_and_every_flipped_bit_detected() -> None:
    authority, custom = b"mx.example", b"x" * 20
    tlvs = [(0x02, authority), (0xE0, custom)]
    data = build_v2("PROXY", "INET6", "2001:db8::1", "2001:db8::2", 1, 2, tlvs=tlvs, crc=True)
    header = parsed(data)
    assert header.tlvs[-1] == (pp.PP2_TYPE_CRC32C, crc32c(data[:-4] + b"\x00" * 4).to_bytes(4, "big"))
    addresses_and_ports = range(16, 52)
    authority_value = range(55, 55 + len(authority))
    custom_value = range(68, 68 + len(custom))
    checksum = range(len(data) - 4, len(data))
    for position in [*addresses_and_ports, *authority_value, *custom_value, *checksum]:
        for bit in range(8):
            tampered = bytearray(data)
            tampered[position] ^= 1 << bit
            assert reason_of(bytes(tampered)) == "v2: CRC32C mismatch", (position, bit)


def test_v2_crc32c_over_a_header_with_ssl() -> None:
    value = ssl_value(subs=[(0x21, b"TLSv1.2"), (0x22, b"cn")])
    data = build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=[(0x20, value), (0x05, b"id")], crc=True)
    assert parsed(data).ssl_cn == "cn"
    assert reason_of(data[:-1] + bytes([data[-1] ^ 0xFF])) == "v2: CRC32C mismatch"


# --------------------------------------------------------- prefixes and leftovers

VALID_HEADERS = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::1 1 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN whatever follows\r\n",
    build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2),
    build_v2("LOCAL", "UNSPEC", None, None, None, None),
    build_v2("LOCAL", "INET6", "::1", "::2", 1, 2, tlvs=[(0x04, b"x")]),
    build_v2("PROXY", "UNIX", "/a", "/b", None, None, transport="DGRAM"),
    build_v2(
        "PROXY",
        "INET6",
        "2001:db8::1",
        "::ffff:1.2.3.4",
        1,
        2,
        tlvs=[(0x01, b"h2"), (0x02, b"mx"), (0x05, b"u"), (0x20, ssl_value(subs=[(0x21, b"TLSv1.3")])), (0x30, b"n")],
        crc=True,
    ),
]


VALID_HEADER_IDS = [
    "v1-tcp4",
    "v1-tcp6",
    "v1-unknown",
    "v1-unknown-long",
    "v2-inet",
    "v2-local",
    "v2-local-inet6",
    "v2-unix-dgram",
    "v2-tlvs-crc",
]


@pytest.mark.parametrize("data", VALID_HEADERS, ids=VALID_HEADER_IDS)
def test_every_truncation_of_a_valid_header_needs_more(data: bytes) -> None:
    for length in range(len(data)):
        assert parse(data[:length]) is None, length


@pytest.mark.parametrize("data", VALID_HEADERS, ids=VALID_HEADER_IDS)
def test_bytes_after_the_header_belong_to_the_caller(data: bytes) -> None:
    alone = parse(data)
    for tail in (b"", b"\r\n", b"EHLO client.example\r\n", SIG, b"PROXY TCP4 ", b"\x16\x03\x01\x02\x00"):
        assert parse(data + tail) == alone
        assert alone is not None and alone[1] == len(data)


# ---------------------------------------------------------------- carries_addresses


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", True),
        (b"PROXY TCP6 ::1 ::2 1 2\r\n", True),
        (b"PROXY UNKNOWN\r\n", False),
        (build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2), True),
        (build_v2("PROXY", "INET6", "::1", "::2", 1, 2), True),
        (build_v2("LOCAL", "INET", "1.2.3.4", "5.6.7.8", 1, 2), False),
        (build_v2("PROXY", "UNIX", "/a", "/b", None, None), False),
        (build_v2("PROXY", "UNSPEC", None, None, None, None), False),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-inet", "v2-inet6", "v2-local", "v2-unix", "v2-unspec"],
)
def test_carries_addresses(data: bytes, expected: bool) -> None:
    assert parsed(data).carries_addresses is expected


# ---------------------------------------------------------------- hypothesis

ports = st.integers(0, 0xFFFF)


def expected_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


@st.composite
def v1_headers(draw) -> tuple[bytes, dict]:
    family = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if family == "UNKNOWN":
        tail = draw(st.binary(max_size=92).filter(lambda b: b"\r" not in b and b"\n" not in b))
        return b"PROXY UNKNOWN" + (b" " + tail if tail else b"") + b"\r\n", {"family": "UNKNOWN"}
    version = 4 if family == "TCP4" else 6
    source, destination = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
    sport, dport = draw(ports), draw(ports)
    expected = {
        "family": family,
        "source_address": expected_text(source),
        "destination_address": expected_text(destination),
        "source_port": sport,
        "destination_port": dport,
    }
    if version == 6 and draw(st.booleans()):  # the exploded, upper-case spelling is valid too
        source_text = source.exploded.upper()
    else:
        source_text = str(source)
    return build_v1(family, source_text, str(destination), sport, dport), expected


tlv_values = st.binary(max_size=40)
free_tlvs = st.tuples(st.sampled_from([0x04, 0x30, 0x24, 0xE0, 0xEF, 0xF0, 0xFF, 0x10]), tlv_values)


@st.composite
def v2_headers(draw) -> tuple[bytes, dict]:
    command = draw(st.sampled_from(["PROXY", "LOCAL"]))
    family = draw(st.sampled_from(["INET", "INET6", "UNIX", "UNSPEC"]))
    transport = draw(st.sampled_from(["STREAM", "DGRAM"]))
    source = destination = sport = dport = None
    if family in ("INET", "INET6"):
        version = 4 if family == "INET" else 6
        source, destination = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
        sport, dport = draw(ports), draw(ports)
    elif family == "UNIX":
        path = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100)
        source, destination = "/" + draw(path), "/" + draw(path)
    tlvs = draw(st.lists(free_tlvs, max_size=4))
    expected: dict = {"command": command, "family": family, "transport": "UNSPEC" if family == "UNSPEC" else transport}
    if draw(st.booleans()):
        authority = draw(st.text(max_size=30))
        tlvs.append((0x02, authority.encode()))
        expected["authority"] = authority
    if draw(st.booleans()):
        unique_id = draw(st.binary(max_size=128))
        tlvs.append((0x05, unique_id))
        expected["unique_id"] = unique_id
    if draw(st.booleans()):
        cn = draw(st.text(max_size=20))
        tlvs.append((0x20, ssl_value(0x07, 0, [(0x21, b"TLSv1.3"), (0x22, cn.encode())])))
        expected.update(ssl_cn=cn, ssl_version="TLSv1.3", ssl_verified=True)
    crc = draw(st.booleans())
    source_text = source and str(source)
    destination_text = destination and str(destination)
    data = build_v2(command, family, source_text, destination_text, sport, dport, tlvs, crc, transport)
    if command == "PROXY":
        expected.update(
            source_address=source and expected_text(source) if family != "UNIX" else source,
            destination_address=destination and expected_text(destination) if family != "UNIX" else destination,
            source_port=sport,
            destination_port=dport,
        )
        expected["tlv_types"] = [kind for kind, _ in tlvs] + ([0x03] if crc else [])
    else:
        expected = {"command": "LOCAL", "family": family, "tlv_types": [], "source_address": None}
    return data, expected


def check_outcomes_are_monotonic(data: bytes) -> None:
    """Over growing prefixes: "need more" first, then always the same result or always an error."""
    settled: object = None
    for length in range(len(data) + 1):
        try:
            outcome: object = parse(data[:length])
        except ProxyProtocolError as error:
            assert isinstance(error.reason, str) and error.reason
            outcome = "error"
        if settled is not None:
            assert outcome == settled, (length, outcome, settled)
        elif outcome is not None:
            settled = outcome
            if outcome != "error":
                assert outcome[1] == length


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(v1_headers(), v2_headers()), st.binary(max_size=20))
def test_built_headers_round_trip(built: tuple[bytes, dict], tail: bytes) -> None:
    data, expected = built
    result = parse(data + tail)
    assert result is not None
    header, consumed = result
    assert consumed == len(data)
    tlv_types = expected.pop("tlv_types", None)
    if tlv_types is not None:
        assert [kind for kind, _ in header.tlvs] == tlv_types
    for name, value in expected.items():
        assert getattr(header, name) == value, name
    check_outcomes_are_monotonic(data)


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=120),
        st.binary(max_size=40).map(lambda b: SIG + b),
        st.binary(max_size=110).map(lambda b: b"PROXY " + b),
    )
)
def test_random_bytes_only_raise_proxy_protocol_error(data: bytes) -> None:
    check_outcomes_are_monotonic(data)


@st.composite
def mutated_headers(draw) -> bytes:
    data = bytearray(draw(st.one_of(v1_headers(), v2_headers()))[0])
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "byte"]))
        if action == "insert" or position == len(data):
            data[position:position] = draw(st.binary(min_size=1, max_size=3))
        elif action == "delete":
            del data[position]
        elif action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        else:
            data[position] = draw(st.sampled_from([0x00, 0x0D, 0x0A, 0x20, 0x30, 0xFF, 0x3A, 0x2E]))
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_headers())
def test_mutated_headers_only_raise_proxy_protocol_error(data: bytes) -> None:
    check_outcomes_are_monotonic(data)


# ---------------------------------------------------------------- read_header

PAYLOAD = b"EHLO client.example\r\n"
V2_WITH_TLVS = VALID_HEADERS[-1]


def recv_soon(sock: gevent.socket.socket) -> bytes:
    """What is waiting in the socket; a test must not hang if read_header took it."""
    with gevent.Timeout(5):
        return sock.recv(100)


def send_slowly(sock: gevent.socket.socket, data: bytes, chunk: int = 1) -> None:
    for start in range(0, len(data), chunk):
        sock.sendall(data[start : start + chunk])
        gevent.sleep(0.0005 if chunk == 1 else 0)


@pytest.fixture
def pair():
    a, b = gevent.socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize(
    "data",
    [VALID_HEADERS[0], VALID_HEADERS[1], VALID_HEADERS[3], V2_WITH_TLVS],
    ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-tlvs"],
)
def test_read_header_one_byte_at_a_time_takes_exactly_the_header(pair, data: bytes) -> None:
    reader, writer = pair
    sender = gevent.spawn(send_slowly, writer, data + PAYLOAD)
    header, leftover = read_header(reader, timeout=10)
    assert (header, len(data)) == parse(data)
    assert leftover == b""
    sender.join()
    assert recv_soon(reader) == PAYLOAD  # nothing past the header was taken


def test_read_header_whole_header_and_payload_in_one_send(pair) -> None:
    reader, writer = pair
    writer.sendall(V2_WITH_TLVS + PAYLOAD)
    header, leftover = read_header(reader, timeout=5)
    assert header.authority == "mx" and leftover == b""
    assert recv_soon(reader) == PAYLOAD


def test_read_header_largest_v2_in_chunks(pair) -> None:
    reader, writer = pair
    data = build_v2("PROXY", "INET", "1.2.3.4", "5.6.7.8", 1, 2, tlvs=[(0x04, bytes(0xFFFF - 12 - 3 - 7))], crc=True)
    sender = gevent.spawn(send_slowly, writer, data + PAYLOAD, 997)
    header, leftover = read_header(reader, timeout=10)
    assert header.source_address == "1.2.3.4" and leftover == b""
    sender.join()
    assert recv_soon(reader) == PAYLOAD


def test_read_header_initial_bytes_hold_everything(pair) -> None:
    reader, _ = pair
    header, leftover = read_header(reader, timeout=5, initial=VALID_HEADERS[0] + PAYLOAD)
    assert header.source_address == "192.168.0.1" and leftover == PAYLOAD


def test_read_header_initial_bytes_hold_a_part(pair) -> None:
    reader, writer = pair
    writer.sendall(V2_WITH_TLVS[20:] + PAYLOAD)
    header, leftover = read_header(reader, timeout=5, initial=V2_WITH_TLVS[:20])
    assert header.authority == "mx" and leftover == b""
    assert recv_soon(reader) == PAYLOAD


def test_read_header_times_out_without_blocking_the_hub(pair) -> None:
    reader, writer = pair
    writer.sendall(VALID_HEADERS[0][:10])
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
    started = time.monotonic()
    with pytest.raises(ProxyProtocolError, match="^timeout"):
        read_header(reader, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    ticker.join()
    assert len(ticks) == 10


def test_read_header_eof_before_the_end(pair) -> None:
    reader, writer = pair
    writer.sendall(V2_WITH_TLVS[:-1])
    writer.close()
    with pytest.raises(ProxyProtocolError, match="connection closed"):
        read_header(reader, timeout=5)


def test_read_header_connection_reset() -> None:
    listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = gevent.socket.create_connection(listener.getsockname())
    connection, _ = listener.accept()
    with connection, listener:
        client.sendall(b"PROXY TCP4 ")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # linger 0: RST instead of FIN
        with pytest.raises(ProxyProtocolError, match="connection error"):
            read_header(connection, timeout=5)


def test_read_header_fails_at_once_on_bad_bytes(pair) -> None:
    reader, writer = pair
    writer.sendall(b"EHLO")
    started = time.monotonic()
    with pytest.raises(ProxyProtocolError, match="not a PROXY protocol header"):
        read_header(reader, timeout=10)
    assert time.monotonic() - started < 1


def test_read_header_over_loopback_tcp_in_fragments() -> None:
    listener = gevent.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.bind(("::1", 0))
    listener.listen(1)
    line = b"PROXY TCP6 2001:db8::5 2001:db8::25 40000 25\r\n"

    def client() -> None:
        with gevent.socket.create_connection(("::1", listener.getsockname()[1])) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_slowly(sock, line + PAYLOAD, 7)
            gevent.sleep(0.2)

    sender = gevent.spawn(client)
    connection, _ = listener.accept()
    with connection, listener:
        header, leftover = read_header(connection, timeout=5)
        assert (header.source_address, header.source_port) == ("2001:db8::5", 40000)
        assert leftover + recv_soon(connection) == PAYLOAD
    sender.join()


# ---------------------------------------------------------------- real HAProxy

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def ipv6_loopback_works() -> bool:
    try:
        free_port("::1")
    except OSError:
        return False
    return True


# Every TLV HAProxy 2.6 can add, bar NETNS (needs a namespace); ALPN is sent whenever negotiated.
V2_OPTIONS = "ssl,cert-cn,ssl-cipher,cert-sig,cert-key,authority,crc32c,unique-id"


class Capture:
    """A listener standing in for the MTA: records the raw header, the parsed one and the payload."""

    def __init__(self) -> None:
        self.socket = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]

    def serve_one(self) -> tuple[bytes, ProxyHeader, bytes]:
        connection, _ = self.socket.accept()
        with connection:
            raw = b""
            with gevent.Timeout(5):
                while parse(raw) is None:  # peek until the whole header is there
                    raw = connection.recv(4096, socket.MSG_PEEK)
                    gevent.sleep(0.005)
            header, leftover = read_header(connection, timeout=5)
            payload = leftover
            with gevent.Timeout(5):
                while not payload.endswith(b"\r\n"):
                    payload += connection.recv(100)
        consumed = parse(raw)[1]
        return raw[:consumed], header, payload


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory):
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (Debian package 'haproxy')")
    workdir: Path = tmp_path_factory.mktemp("haproxy")
    ca = trustme.CA()
    ca.issue_cert("mx.example.test").private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    v2_capture, v1_capture = Capture(), Capture()
    tls_port, plain_port = free_port(), free_port()
    ipv6 = ipv6_loopback_works()
    tls_options = f"ssl crt {workdir / 'server.pem'} ca-file {workdir / 'ca.pem'} verify optional alpn x-mta-test"
    config = f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend fe_tls
    bind 127.0.0.1:{tls_port} {tls_options}
    unique-id-format uid-%ci-%cp
    default_backend be_v2
backend be_v2
    server mta 127.0.0.1:{v2_capture.port} send-proxy-v2 proxy-v2-options {V2_OPTIONS}
frontend fe_plain
    bind 127.0.0.1:{plain_port}
    {f'bind [::1]:{plain_port}' if ipv6 else ''}
    default_backend be_v1
backend be_v1
    server mta 127.0.0.1:{v1_capture.port} send-proxy
"""
    (workdir / "haproxy.cfg").write_text(config)
    process = gevent.subprocess.Popen(
        [HAPROXY, "-db", "-f", str(workdir / "haproxy.cfg")],
        stdout=gevent.subprocess.DEVNULL,
        stderr=gevent.subprocess.PIPE,
    )
    try:
        # HAProxy binds every listener before serving any.  Probe only the TLS one:
        # a bare connect there never reaches a backend (no handshake), while one
        # to the plain frontend would queue a connection at the v1 capture.
        wait_for_port(process, tls_port)
        yield {
            "ca": ca,
            "tls_port": tls_port,
            "plain_port": plain_port,
            "ipv6": ipv6,
            "v2": v2_capture,
            "v1": v1_capture,
        }
    finally:
        process.terminate()
        process.wait(timeout=10)
        v2_capture.socket.close()
        v1_capture.socket.close()


def wait_for_port(process, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"haproxy exited: {process.stderr.read().decode(errors='replace')}")
        try:
            gevent.socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            gevent.sleep(0.05)
    pytest.fail(f"haproxy did not listen on {port}")


def through_haproxy(
    capture: Capture, connect: Callable[[], tuple[object, dict]]
) -> tuple[bytes, ProxyHeader, bytes, dict]:
    server = gevent.spawn(capture.serve_one)
    try:
        client_sock, client_facts = connect()
        with client_sock:
            raw, header, payload = server.get(timeout=10)
    finally:
        server.kill()  # a failed client must not leave a stale acceptor for the next test
    return raw, header, payload, client_facts


def sub_tlv_types(ssl_tlv: bytes) -> list[int]:
    """The types of the sub-TLVs in an SSL TLV value, framed independently of the parser."""
    types, position = [], 5
    while position < len(ssl_tlv):
        types.append(ssl_tlv[position])
        position += 3 + int.from_bytes(ssl_tlv[position + 1 : position + 3], "big")
    assert position == len(ssl_tlv)
    return types


def tls_client(setup, with_client_cert: bool):
    def connect():
        context = gevent.ssl.create_default_context()
        setup["ca"].configure_trust(context)
        if with_client_cert:
            setup["ca"].issue_cert("client.example.test", common_name="client.example.test").configure_cert(context)
        context.set_alpn_protocols(["x-mta-test"])
        plain = gevent.socket.create_connection(("127.0.0.1", setup["tls_port"]), timeout=5)
        tls = context.wrap_socket(plain, server_hostname="mx.example.test")
        tls.sendall(PAYLOAD)
        facts = {"port": tls.getsockname()[1], "version": tls.version(), "cipher": tls.cipher()[0]}
        return tls, facts

    return connect


def test_haproxy_send_proxy_v2_with_tls_tlvs_and_crc32c(haproxy) -> None:
    raw, header, payload, client = through_haproxy(haproxy["v2"], tls_client(haproxy, with_client_cert=True))
    assert payload == PAYLOAD  # the header was consumed exactly
    assert (header.version, header.command, header.family, header.transport) == (2, "PROXY", "INET", "STREAM")
    assert (header.source_address, header.source_port) == ("127.0.0.1", client["port"])
    assert (header.destination_address, header.destination_port) == ("127.0.0.1", haproxy["tls_port"])
    assert header.authority == "mx.example.test"
    assert header.alpn == "x-mta-test"
    assert header.unique_id == f"uid-127.0.0.1-{client['port']}".encode()
    assert (header.ssl_version, header.ssl_cipher) == (client["version"], client["cipher"])
    assert header.ssl_cn == "client.example.test" and header.ssl_verified is True
    ssl_tlv = dict(header.tlvs)[pp.PP2_TYPE_SSL]
    assert {pp.PP2_SUBTYPE_SSL_SIG_ALG, pp.PP2_SUBTYPE_SSL_KEY_ALG} <= set(sub_tlv_types(ssl_tlv))
    # HAProxy's CRC32C: present, recomputed here independently, and a tampered copy is refused.
    crc = dict(header.tlvs)[pp.PP2_TYPE_CRC32C]
    at = raw.rfind(b"\x03\x00\x04" + crc) + 3
    assert crc32c(raw[:at] + b"\x00" * 4 + raw[at + 4 :]).to_bytes(4, "big") == crc
    tampered = raw[:20] + bytes([raw[20] ^ 0x01]) + raw[21:]
    assert reason_of(tampered) == "v2: CRC32C mismatch"


def test_haproxy_send_proxy_v2_without_client_certificate(haproxy) -> None:
    _, header, payload, _ = through_haproxy(haproxy["v2"], tls_client(haproxy, with_client_cert=False))
    assert payload == PAYLOAD
    assert header.ssl_cn == "" and header.ssl_verified is False and header.ssl_version.startswith("TLS")


@pytest.mark.parametrize("client_host", ["127.0.0.1", "::1"])
def test_haproxy_send_proxy_v1(haproxy, client_host: str) -> None:
    if client_host == "::1" and not haproxy["ipv6"]:
        pytest.skip("no IPv6 loopback on this machine")

    def connect():
        sock = gevent.socket.create_connection((client_host, haproxy["plain_port"]), timeout=5)
        sock.sendall(PAYLOAD)
        return sock, {"port": sock.getsockname()[1]}

    raw, header, payload, client = through_haproxy(haproxy["v1"], connect)
    assert raw.startswith(b"PROXY TCP4 " if client_host == "127.0.0.1" else b"PROXY TCP6 ")
    assert payload == PAYLOAD
    assert (header.version, header.family) == (1, "TCP4" if client_host == "127.0.0.1" else "TCP6")
    assert (header.source_address, header.source_port) == (client_host, client["port"])
    assert (header.destination_address, header.destination_port) == (client_host, haproxy["plain_port"])

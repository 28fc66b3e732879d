"""Pure SOCKS5 parts: socks_proxy spec parsing, selection order, byte formats."""

import ipaddress
import math
import random
import struct
from collections import Counter

import pytest
from hypothesis import given, strategies as st

from shared.socks5 import (
    ProxySpec, SocksConfigError, SocksProtocolError, SocksReplyError, build_connect,
    build_greeting, build_userpass, parse_auth_reply, parse_connect_reply, parse_exim_time,
    parse_method_reply, parse_proxy_list, reply_length, reply_reason, selection_order,
    split_exim_list, truncated_reply_error,
)

# ------------------------------------------------------------------ spec parser


def test_defaults_match_exim():
    [spec] = parse_proxy_list("192.0.2.1")
    assert (spec.address, spec.port, spec.auth, spec.name, spec.password) == \
        ("192.0.2.1", 1080, "none", "", "")
    assert (spec.tmo, spec.pri, spec.weight, spec.method) == (5.0, 1, 1, 0x00)


def test_all_options_and_two_proxies():
    specs = parse_proxy_list(
        "192.0.2.1 auth=name name=alice pass=pw port=1081 tmo=2m pri=3 weight=7 : 192.0.2.2 port=9050")
    assert specs[0] == ProxySpec("192.0.2.1", 1081, "name", "alice", "pw", 120.0, 3, 7)
    assert specs[0].method == 0x02
    assert specs[1] == ProxySpec("192.0.2.2", port=9050)


def test_password_not_in_repr():
    [spec] = parse_proxy_list("192.0.2.1 auth=name name=alice pass=topsecret")
    assert "topsecret" not in repr(spec)


def test_changed_separator_and_ipv6():
    specs = parse_proxy_list("<; 2001:db8::1 port=1081 ; 192.0.2.1 pri=2")
    assert [(s.address, s.port, s.pri) for s in specs] == [("2001:db8::1", 1081, 1), ("192.0.2.1", 1080, 2)]
    assert str(specs[0]) == "[2001:db8::1]:1081"


def test_doubled_colon_is_a_literal_colon():
    specs = parse_proxy_list("2001::db8::::5 port=1 : ::::1")
    assert [(s.address, s.port) for s in specs] == [("2001:db8::5", 1), ("::1", 1080)]


def test_empty_value_means_no_proxy():
    assert parse_proxy_list("") == []
    assert parse_proxy_list("  ") == []


@pytest.mark.parametrize("text,seconds", [
    ("5", 5.0), ("5s", 5.0), ("2m", 120.0), ("1h30m", 5400.0), ("0.5s", 0.5), ("1d", 86400.0),
    ("1w", 604800.0)])
def test_tmo_accepts_exim_time_syntax(text, seconds):
    assert parse_exim_time(text) == seconds
    assert parse_proxy_list(f"192.0.2.1 tmo={text}")[0].tmo == seconds


@pytest.mark.parametrize("text,words", [
    ("192.0.2.1 colour=blue", "unknown option"),
    ("192.0.2.1 port", "unknown option"),
    ("192.0.2.1 port=0", "out of range"),
    ("192.0.2.1 port=65536", "out of range"),
    ("192.0.2.1 port=http", "bad number"),
    ("192.0.2.1 tmo=soon", "bad time"),
    ("192.0.2.1 tmo=0", "positive"),
    ("192.0.2.1 tmo=5x", "bad time"),
    ("192.0.2.1 pri=high", "bad number"),
    ("192.0.2.1 weight=-1", "bad number"),
    ("192.0.2.1 auth=gssapi", "expected none or name"),
    ("192.0.2.1 auth=name pass=x", "name= of 1 to 255 bytes"),
    ("192.0.2.1 auth=name name=x", "pass= of 1 to 255 bytes"),
    ("192.0.2.1 auth=name name=x pass=" + "p" * 256, "pass= of 1 to 255 bytes"),
    ("192.0.2.1 port=1 port=2", "given twice"),
    ("proxy.example.org", "not an IP address"),
    ("port=1080", "not an IP address"),
])
def test_bad_specs_raise(text, words):
    with pytest.raises(SocksConfigError) as info:
        parse_proxy_list(text)
    assert words in info.value.reason


def test_negative_priority_allowed():
    assert parse_proxy_list("192.0.2.1 pri=-2")[0].pri == -2


@given(st.lists(st.text(alphabet="ab:; x", min_size=1).filter(lambda t: t.strip() == t and t),
                max_size=5))
def test_split_exim_list_round_trip(items):
    joined = " : ".join(item.replace(":", "::") for item in items)
    assert split_exim_list(joined) == items


# ------------------------------------------------------------------ selection


def _spec(n, pri=1, weight=1):
    return ProxySpec(f"192.0.2.{n}", pri=pri, weight=weight)


def test_priority_first_then_down_ones_last():
    a, b, c, d = _spec(1, pri=1), _spec(2, pri=5), _spec(3, pri=3), _spec(4, pri=9)
    order = selection_order([a, b, c, d], lambda s: s is d, random.Random(1))
    assert order == [b, c, a, d]


def test_all_down_still_tried_in_priority_order():
    a, b, c = _spec(1, pri=1), _spec(2, pri=5), _spec(3, pri=3)
    assert selection_order([a, b, c], lambda s: True, random.Random(1)) == [b, c, a]


def test_zero_weight_comes_after_positive_weights():
    zero, one = _spec(1, weight=0), _spec(2, weight=1)
    for seed in range(50):
        assert selection_order([zero, one], lambda s: False, random.Random(seed)) == [one, zero]


def _chi_square(observed: Counter, expected: dict) -> float:
    return sum((observed[k] - e) ** 2 / e for k, e in expected.items())


def test_weighted_first_choice_follows_weights():
    specs = [_spec(1, weight=1), _spec(2, weight=2), _spec(3, weight=3)]
    rng = random.Random(20240601)
    draws = 6000
    first = Counter(selection_order(specs, lambda s: False, rng)[0].address for _ in range(draws))
    expected = {s.address: draws * s.weight / 6 for s in specs}
    # 2 degrees of freedom: P(chi2 > 13.8) = 0.001
    assert _chi_square(first, expected) < 13.8
    assert abs(first["192.0.2.3"] / draws - 0.5) < 0.03


def test_second_choice_is_weighted_among_the_rest():
    heavy, light, other = _spec(1, weight=8), _spec(2, weight=1), _spec(3, weight=3)
    rng = random.Random(7)
    seconds = Counter()
    for _ in range(4000):
        order = selection_order([heavy, light, other], lambda s: False, rng)
        if order[0] is heavy:
            seconds[order[1].address] += 1
    share = seconds["192.0.2.3"] / sum(seconds.values())
    sigma = math.sqrt(0.75 * 0.25 / sum(seconds.values()))
    assert abs(share - 0.75) < 5 * sigma


def test_every_proxy_appears_once():
    specs = [_spec(n, pri=n % 3, weight=n % 4) for n in range(1, 20)]
    order = selection_order(specs, lambda s: s.weight == 2, random.Random(3))
    assert sorted(order, key=lambda s: s.address) == sorted(specs, key=lambda s: s.address)


# ------------------------------------------------------------------ byte formats
# Traces from socks5-facts.md section 5 (danted 1.4.2 / microsocks 1.0.3 on loopback).

TARGET = bytes.fromhex("7f 00 00 01 46 a0")  # 127.0.0.1:18080


def test_greeting_offers_exactly_one_method():
    assert build_greeting(0x02) == bytes.fromhex("05 01 02")
    assert build_greeting(0x00) == bytes.fromhex("05 01 00")


def test_method_reply_trace():
    assert parse_method_reply(bytes.fromhex("05 02")) == 0x02
    assert parse_method_reply(bytes.fromhex("05 00")) == 0x00


def test_method_reply_ff_means_nothing_acceptable():
    # danted (username required) when the client offers only 0x00: <05 ff
    with pytest.raises(SocksProtocolError, match="none of the offered"):
        parse_method_reply(bytes.fromhex("05 ff"))


@pytest.mark.parametrize("reply", [bytes.fromhex("04 00"), b"\x05", b""])
def test_method_reply_malformed(reply):
    with pytest.raises(SocksProtocolError):
        parse_method_reply(reply)


def test_userpass_trace():
    assert build_userpass("sockstest", "s3cret-pw") == b"\x01\x09sockstest\x09s3cret-pw"


def test_userpass_limits():
    assert len(build_userpass("u" * 255, "p")) == 1 + 1 + 255 + 1 + 1
    for name, password in (("", "p"), ("u", ""), ("u" * 256, "p"), ("u", "é" * 128)):
        with pytest.raises(SocksConfigError):
            build_userpass(name, password)


def test_auth_reply():
    parse_auth_reply(bytes.fromhex("01 00"))
    for status in ("01 01", "01 02", "01 ff"):  # danted sends 1, microsocks 2
        with pytest.raises(SocksProtocolError, match="authentication refused"):
            parse_auth_reply(bytes.fromhex(status))
    with pytest.raises(SocksProtocolError, match="version"):
        parse_auth_reply(bytes.fromhex("05 00"))


def test_connect_request_trace():
    assert build_connect("127.0.0.1", 18080) == bytes.fromhex("05 01 00 01") + TARGET


def test_connect_request_ipv6():
    request = build_connect("2001:db8::5", 25)
    assert len(request) == 22
    assert request[:4] == bytes.fromhex("05 01 00 04")
    assert request[4:20] == ipaddress.ip_address("2001:db8::5").packed
    assert request[20:] == b"\x00\x19"


@pytest.mark.parametrize("ip,port", [("mx.example.org", 25), ("127.0.0.1", 0), ("127.0.0.1", 70000)])
def test_connect_request_rejects_non_ip_and_bad_port(ip, port):
    with pytest.raises(ValueError):
        build_connect(ip, port)


def test_connect_reply_trace_danted():
    reply = bytes.fromhex("05 00 00 01 7f 00 00 01 cd db")
    assert reply_length(reply[:4]) == 6
    assert reply_length(reply) == 0
    assert parse_connect_reply(reply) == ("127.0.0.1", 52699)


def test_connect_reply_microsocks_zero_bound():
    assert parse_connect_reply(bytes.fromhex("05 00 00 01 00 00 00 00 00 00")) == ("0.0.0.0", 0)


def test_connect_reply_ipv6():
    reply = bytes.fromhex("05 00 00 04") + ipaddress.ip_address("::1").packed + b"\x04\x00"
    assert reply_length(reply[:4]) == 18
    assert parse_connect_reply(reply) == ("::1", 1024)


def test_connect_reply_atyp3_needs_length_byte_first():
    reply = bytes.fromhex("05 00 00 03") + b"\x0bproxy.local" + b"\x00\x19"
    assert reply_length(reply[:4]) == 1
    assert reply_length(reply[:5]) == 11 + 2
    assert parse_connect_reply(reply) == ("proxy.local", 25)


def test_refused_reply_trace():
    # danted, target port closed: <05 05 00 01 ..
    reply = bytes.fromhex("05 05 00 01 7f 00 00 01 00 00")
    for data in (reply[:4], reply):
        with pytest.raises(SocksReplyError) as info:
            reply_length(data) if len(data) == 4 else parse_connect_reply(data)
        assert info.value.code == 5
        assert info.value.destination_fault
        assert info.value.reason == "connection refused by destination (SOCKS reply 5)"


def test_ruleset_reply_is_not_the_destinations_fault():
    with pytest.raises(SocksReplyError) as info:
        parse_connect_reply(bytes.fromhex("05 02 00 01") + TARGET)
    assert info.value.code == 2 and not info.value.destination_fault
    assert "not allowed by ruleset" in info.value.reason


def test_every_reply_code_has_a_reason():
    meanings = {reply_reason(code).split(" (")[0] for code in range(1, 9)}
    assert len(meanings) == 8
    for code in range(1, 256):
        assert reply_reason(code).endswith(f"(SOCKS reply {code})")
    assert reply_reason(9) == "unassigned reply code 0x09 (SOCKS reply 9)"
    assert [SocksReplyError(c).destination_fault for c in range(1, 10)] == \
        [False, False, True, True, True, True, False, False, False]


@pytest.mark.parametrize("reply,message", [
    (bytes.fromhex("04 00 00 01") + TARGET, "version"),
    (bytes.fromhex("05 00 00 02") + TARGET, "address type"),
    (bytes.fromhex("05 00 00 01") + TARGET[:-1], "expected 10"),
    (bytes.fromhex("05 00 00 01") + TARGET + b"\x00", "expected 10"),
    (bytes.fromhex("05 00 00"), "too short"),
])
def test_malformed_connect_replies(reply, message):
    with pytest.raises(SocksProtocolError, match=message):
        parse_connect_reply(reply)


def test_truncated_reply_keeps_the_reply_code():
    # servers that send only VER REP RSV on failure, then EOF
    error = truncated_reply_error(bytes.fromhex("05 05 00"))
    assert isinstance(error, SocksReplyError) and error.code == 5 and error.destination_fault
    for partial in (b"", b"\x05", bytes.fromhex("05 00 00")):
        error = truncated_reply_error(partial)
        assert isinstance(error, SocksProtocolError)
        assert f"after {len(partial)} bytes" in error.reason


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535),
       st.lists(st.integers(1, 8), max_size=30))
def test_reply_read_incrementally(ip, port, chunk_sizes):
    """Reading in arbitrary chunks, asking reply_length each time, yields the whole reply."""
    atyp = 1 if ip.version == 4 else 4
    reply = bytes((5, 0, 0, atyp)) + ip.packed + struct.pack("!H", port)
    received, sizes = reply[:4], iter(chunk_sizes)
    while need := reply_length(received):
        received += reply[len(received):len(received) + min(need, next(sizes, need))]
    assert received == reply
    assert parse_connect_reply(received) == (str(ip), port)

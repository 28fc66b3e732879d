"""lsearch / iplsearch file lookups and the shared IP/escape helpers."""

import os

import pytest

from mta.lookups import (
    LookupCache,
    LookupFailed,
    interpret_escape,
    parse_ip,
    parse_lsearch_text,
    parse_network,
)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def write(path, text):
    path.write_text(text)
    return str(path)


# -- parsing ------------------------------------------------------------------

def test_lsearch_format():
    text = ('# comment\n'
            'alice: data one\n'
            'bob   data two  \n'
            'carol:\n'
            '\n'
            'dave :   spaced\n'
            '  continued here\n'
            '# comment inside entry\n'
            '\tand here\n'
            '"quoted key: with colon": q\n'
            '"esc\\x41\\"pe" e\n'
            'baduser: :fail:\n')
    assert parse_lsearch_text(text) == [
        ("alice", "data one"),
        ("bob", "data two"),
        ("carol", ""),
        ("dave", "spaced continued here and here"),
        ("quoted key: with colon", "q"),
        ('escA"pe', "e"),
        ("baduser", ":fail:"),
    ]


def test_lsearch_first_match_wins_and_is_caseless(tmp_path):
    path = write(tmp_path / "f", "Key: first\nkey: second\n")
    cache = LookupCache()
    assert cache.lookup("lsearch", "KEY", path) == "first"
    assert cache.lookup("lsearch", "other", path) is None


def test_lsearch_empty_data_is_found_not_missing(tmp_path):
    path = write(tmp_path / "f", "carol:\n")
    assert LookupCache().lookup("lsearch", "carol", path) == ""


# -- iplsearch ------------------------------------------------------------------

def test_iplsearch_cidr_ipv6_quoted_and_file_order(tmp_path):
    path = write(tmp_path / "limits",
                 "192.0.2.7: 50\n"
                 "192.0.2.0/24: 10\n"
                 "10.0.0.0/8 20\n"
                 '"2001:db8::1": 7\n'
                 '"2001:db8::/32": 3\n'
                 "notanip: 99\n"
                 "0.0.0.0/0: 1\n")
    cache = LookupCache()
    assert cache.lookup("iplsearch", "192.0.2.7", path) == "50"
    assert cache.lookup("iplsearch", "192.0.2.8", path) == "10"
    assert cache.lookup("iplsearch", "10.9.8.7", path) == "20"
    assert cache.lookup("iplsearch", "2001:db8::1", path) == "7"
    assert cache.lookup("iplsearch", "2001:db8:0:0::2", path) == "3"
    assert cache.lookup("iplsearch", "::ffff:10.1.1.1", path) == "20"
    assert cache.lookup("iplsearch", "203.0.113.1", path) == "1"
    assert cache.lookup("iplsearch", "2001:db9::1", path) is None


def test_iplsearch_first_line_wins_even_if_less_specific(tmp_path):
    path = write(tmp_path / "f", "10.0.0.0/8: wide\n10.1.0.0/16: narrow\n")
    assert LookupCache().lookup("iplsearch", "10.1.2.3", path) == "wide"


def test_iplsearch_key_must_be_an_ip(tmp_path):
    path = write(tmp_path / "f", "10.0.0.0/8: x\n")
    with pytest.raises(LookupFailed, match="not a valid iplsearch key"):
        LookupCache().lookup("iplsearch", "mail.example", path)
    with pytest.raises(LookupFailed):
        LookupCache().lookup("iplsearch", "10.0.0.0/8", path)


def test_iplsearch_star_key(tmp_path):
    path = write(tmp_path / "f", "10.0.0.0/8: x\n*: default\n")
    assert LookupCache().lookup("iplsearch", "*", path) == "default"


# -- caching ---------------------------------------------------------------------

def test_changed_file_is_reread(tmp_path):
    clock = FakeClock()
    cache = LookupCache(recheck_interval=1.0, clock=clock)
    path = write(tmp_path / "f", "k: old\n")
    assert cache.lookup("lsearch", "k", path) == "old"
    write(tmp_path / "f", "k: newer\n")
    assert cache.lookup("lsearch", "k", path) == "old"      # within the recheck interval
    clock.now += 1.5
    assert cache.lookup("lsearch", "k", path) == "newer"


def test_same_size_rewrite_detected_by_mtime(tmp_path):
    clock = FakeClock()
    cache = LookupCache(recheck_interval=0.0, clock=clock)
    path = write(tmp_path / "f", "k: aaa\n")
    assert cache.lookup("lsearch", "k", path) == "aaa"
    write(tmp_path / "f", "k: bbb\n")
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.lookup("lsearch", "k", path) == "bbb"


def test_unchanged_file_is_not_reparsed(tmp_path, monkeypatch):
    cache = LookupCache(recheck_interval=0.0)
    path = write(tmp_path / "f", "k: v\n")
    cache.lookup("lsearch", "k", path)
    reads = []
    monkeypatch.setattr("mta.lookups._read_text", lambda p: reads.append(p) or "")
    assert cache.lookup("lsearch", "k", path) == "v"
    assert reads == []


def test_clear_forgets_everything(tmp_path):
    clock = FakeClock()
    cache = LookupCache(recheck_interval=100.0, clock=clock)
    path = write(tmp_path / "f", "k: old\n")
    cache.lookup("lsearch", "k", path)
    write(tmp_path / "f", "k: new\n")
    cache.clear()
    assert cache.lookup("lsearch", "k", path) == "new"


def test_missing_file_is_lookup_failed(tmp_path):
    with pytest.raises(LookupFailed, match="failed to open"):
        LookupCache().lookup("lsearch", "k", str(tmp_path / "absent"))


def test_deleted_file_fails_after_recheck(tmp_path):
    clock = FakeClock()
    cache = LookupCache(recheck_interval=1.0, clock=clock)
    path = write(tmp_path / "f", "k: v\n")
    cache.lookup("lsearch", "k", path)
    os.unlink(path)
    clock.now += 2
    with pytest.raises(LookupFailed):
        cache.lookup("lsearch", "k", path)


def test_relative_path_and_unknown_type_fail():
    with pytest.raises(LookupFailed):
        LookupCache().lookup("lsearch", "k", "relative/file")
    with pytest.raises(LookupFailed):
        LookupCache().lookup("dbm", "k", "/etc/passwd")


# -- helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", (32, 0xC0000201)),
    ("::1", (128, 1)),
    ("::ffff:192.0.2.1", (32, 0xC0000201)),
    ("fe80::1%eth0", (128, 0xFE80 << 112 | 1)),
    ("192.0.2", None),
    ("", None),
    ("host.example", None),
])
def test_parse_ip(text, expected):
    assert parse_ip(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.0/8", (32, 8, 10)),
    ("10.1.2.3", (32, 32, 0x0A010203)),
    ("10.0.0.0/33", None),
    ("10.0.0.0/", None),
    ("::ffff:10.0.0.0/104", (32, 8, 10)),
    ("2001:db8::/32", (128, 32, 0x20010DB8)),
])
def test_parse_network(text, expected):
    assert parse_network(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("\\n", ("\n", 2)),
    ("\\t", ("\t", 2)),
    ("\\101x", ("A", 4)),
    ("\\7", ("\x07", 2)),
    ("\\x41", ("A", 4)),
    ("\\x4", ("\x04", 3)),
    ("\\q", ("q", 2)),
    ("\\", ("\\", 1)),
])
def test_interpret_escape(text, expected):
    assert interpret_escape(text, 0) == expected

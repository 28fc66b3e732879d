"""Exim list semantics: splitting, host/domain/address/local part matching."""

import time

import pytest

from mta.lists import (
    AddressList,
    DomainList,
    HostList,
    ListError,
    LocalPartList,
    NamedLists,
    split_list,
)


# -- split_list -------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("a : b : c", ["a", "b", "c"]),
    ("  a  :b  ", ["a", "b"]),
    ("a :: b", ["a : b"]),
    ("::1", [":1"]),
    ("a : : b", ["a", "", "b"]),
    (":", [""]),
    ("a :", ["a"]),
    ("a : :", ["a", ""]),
    ("", []),
    ("   ", []),
    ("<; 127.0.0.1 ; ::1", ["127.0.0.1", "::1"]),
    ("<, a, b,, c", ["a", "b, c"]),
    ("<;a;b", ["a", "b"]),
    ("  <; a ; b", ["a", "b"]),
    ("< ; a", ["< ; a"]),
    ("<a:b", ["<a", "b"]),
    ("<\n a\n\n b", ["a", "", "b"]),
])
def test_split_list(text, expected):
    assert split_list(text) == expected


def test_split_list_default_separator_argument():
    assert split_list("a;b:c", sep=";") == ["a", "b:c"]


# -- host lists: addresses ----------------------------------------------------

def test_ipv4_exact_and_cidr():
    hosts = HostList("192.0.2.1 : 10.0.0.0/8 : 172.16.0.0/12")
    assert hosts.match("192.0.2.1")
    assert not hosts.match("192.0.2.2")
    assert hosts.match("10.255.1.1")
    assert hosts.match("172.31.255.255")
    assert not hosts.match("172.32.0.0")


def test_cidr_with_host_bits_set_and_slash_31():
    hosts = HostList("192.168.23.236/31 : 10.11.42.99/24")
    assert hosts.match("192.168.23.237")
    assert not hosts.match("192.168.23.238")
    assert hosts.match("10.11.42.1")


def test_ipv6_with_doubled_colons_and_changed_separator():
    doubled = HostList("::::1 : 2001::db8::::/32")
    assert doubled.match("::1")
    assert doubled.match("2001:db8:ffff::7")
    assert not doubled.match("2001:db9::1")
    semicolons = HostList("<; ::1 ; 2001:db8::/32")
    assert semicolons.match("::1") and semicolons.match("2001:DB8::abcd")


def test_ipv4_mapped_client_compared_as_ipv4():
    hosts = HostList("192.0.2.0/24")
    assert hosts.match("::ffff:192.0.2.9")
    assert not hosts.match("::ffff:198.51.100.1")


def test_zero_length_mask_matches_whole_family_only():
    hosts = HostList("<; 0.0.0.0/0")
    assert hosts.match("203.0.113.5")
    assert not hosts.match("2001:db8::1")


def test_star_matches_any_host_and_no_host():
    hosts = HostList("*")
    assert hosts.match("198.51.100.7")
    assert hosts.match(None)


def test_empty_item_matches_only_no_host():
    hosts = HostList(": 192.0.2.1")
    assert hosts.match("")
    assert hosts.match(None)
    assert not hosts.match("192.0.2.2")


def test_empty_list_matches_nothing():
    hosts = HostList("")
    assert not hosts.match("192.0.2.1")
    assert not hosts.match(None)


def test_invalid_client_address_is_an_error():
    with pytest.raises(ValueError):
        HostList("*").match("not-an-ip")


# -- negation and order ---------------------------------------------------

def test_first_match_wins_and_negation():
    hosts = HostList("!192.168.1.1 : 192.168.0.0/16")
    assert not hosts.match("192.168.1.1")
    assert hosts.match("192.168.1.2")
    assert not hosts.match("10.0.0.1")


def test_list_ending_in_negative_item_matches_the_rest():
    hosts = HostList("!192.168.1.1")
    assert not hosts.match("192.168.1.1")
    assert hosts.match("10.0.0.1")


def test_negation_with_white_space():
    assert not HostList("! 10.0.0.1 : *").match("10.0.0.1")


def test_merged_runs_keep_order_between_signs():
    hosts = HostList("10.0.0.0/8 : !10.1.0.0/16 : 10.2.0.0/16 : !10.0.0.0/8 : *")
    assert hosts.match("10.1.2.3")           # first item wins over the later negative
    assert not HostList("!10.1.0.0/16 : 10.0.0.0/8").match("10.1.2.3")


# -- host lists: names --------------------------------------------------------

def test_name_patterns_use_supplied_host_name():
    hosts = HostList("*.example.com : ^mail[0-9]+\\.example\\.net$ : exact.example.org")
    assert hosts.needs_host_name
    assert hosts.match("192.0.2.1", host_name="a.example.com")
    assert hosts.match("192.0.2.1", host_name="MAIL42.example.net")
    assert hosts.match("192.0.2.1", host_name="Exact.Example.Org")
    assert not hosts.match("192.0.2.1", host_name="other.example")


def test_regex_case_sensitive_with_minus_i():
    hosts = HostList("^(?-i)mx\\.")
    assert hosts.match("192.0.2.1", host_name="mx.a")
    assert not hosts.match("192.0.2.1", host_name="MX.a")


def test_unknown_name_stops_the_list_unless_told_otherwise():
    assert not HostList("*.example.com : 192.0.2.1").match("192.0.2.1")
    assert HostList("+ignore_unknown : *.example.com : 192.0.2.1").match("192.0.2.1")
    assert HostList("+include_unknown : *.example.com").match("198.51.100.1")
    assert HostList("192.0.2.1 : *.example.com").match("192.0.2.1")


def test_pure_address_list_does_not_need_name():
    assert not HostList("10.0.0.0/8 : ::::1").needs_host_name


def test_at_is_primary_hostname():
    hosts = HostList("@", primary_hostname="mx.example.com")
    assert hosts.match("192.0.2.1", host_name="MX.example.com")
    assert not hosts.match("192.0.2.1", host_name="other.example.com")


def test_at_brackets_matches_local_addresses():
    hosts = HostList("@[]", local_addresses=["192.0.2.10", "2001:db8::10"])
    assert hosts.match("192.0.2.10")
    assert hosts.match("2001:db8::10")
    assert not hosts.match("192.0.2.11")


# -- named lists ----------------------------------------------------------------

def test_named_host_list_and_negated_reference():
    named = NamedLists(host={"relay": "192.0.2.0/24 : 198.51.100.1"})
    assert HostList("+relay", named).match("192.0.2.5")
    negated = HostList("!+relay : *", named)
    assert not negated.match("198.51.100.1")
    assert negated.match("203.0.113.1")


def test_negation_inside_named_list_does_not_propagate():
    named = NamedLists(domain={"dom1": "!a.b"})
    domains = DomainList("+dom1 : *.b", named)
    assert domains.match("x.y")       # x.y is in dom1 ("not a.b")
    assert domains.match("c.b")
    assert domains.match("a.b")       # not in dom1, but *.b still matches


def test_unknown_named_list_is_compile_error():
    with pytest.raises(ListError, match="relay"):
        HostList("+relay", NamedLists())


def test_self_referencing_named_list_is_compile_error():
    named = NamedLists(host={"loop": "+loop"})
    with pytest.raises(ListError):
        HostList("+loop", named)


# -- compile errors -------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "192.168.0.0/33",
    "10.0.0/8",
    "2001:db8::/129",
    "1.2.3.4/abc",
    "^(unclosed",
    "@mx_any",
    "dbm;/etc/hosts.db",
    "partial-lsearch;/etc/x",
])
def test_bad_host_items_are_list_errors(text):
    with pytest.raises(ListError):
        HostList(text)


# -- files -----------------------------------------------------------------------

def test_host_list_file_items_comments_and_negation(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# trusted relays\n\n!10.1.2.3   # not this one\n10.0.0.0/8\n"
                    "2001:db8::/32\n*.example.com\n")
    hosts = HostList(f"192.0.2.1 : {path}")
    assert hosts.files == [str(path)]
    assert not hosts.match("10.1.2.3")
    assert hosts.match("10.9.9.9")
    assert hosts.match("2001:db8::1")
    assert hosts.match("192.0.2.1")
    assert hosts.match("198.51.100.1", host_name="mx.example.com")
    assert not hosts.match("198.51.100.1", host_name="mx.example.net")
    assert hosts.needs_host_name


def test_negated_file_inverts_its_lines(tmp_path):
    path = tmp_path / "nohold"
    path.write_text("!a.b.c\n*.b.c\n")
    domains = DomainList(f"!{path}")
    assert domains.match("a.b.c")
    assert not domains.match("x.b.c")
    assert domains.match("other.example")    # last item negative


def test_missing_file_is_list_error(tmp_path):
    with pytest.raises(ListError, match="failed to open"):
        HostList(str(tmp_path / "absent"))


def test_file_inside_file_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.write_text("10.0.0.1\n")
    outer = tmp_path / "outer"
    outer.write_text(f"{inner}\n")
    with pytest.raises(ListError):
        HostList(str(outer))


def test_reload_rereads_files_and_keeps_old_on_error(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("10.0.0.1\n")
    hosts = HostList(str(path))
    path.write_text("10.0.0.2\n")
    assert hosts.match("10.0.0.1")
    hosts.reload()
    assert hosts.match("10.0.0.2") and not hosts.match("10.0.0.1")
    path.write_text("10.0.0.300\n")
    with pytest.raises(ListError):
        hosts.reload()
    assert hosts.match("10.0.0.2")


def test_files_include_named_sublists(tmp_path):
    path = tmp_path / "relays"
    path.write_text("10.0.0.1\n")
    hosts = HostList("+relays", NamedLists(host={"relays": str(path)}))
    assert hosts.files == [str(path)]
    assert hosts.match("10.0.0.1")


# -- lookups in host lists -------------------------------------------------------

def test_net_iplsearch_and_masked_lsearch(tmp_path):
    ipfile = tmp_path / "ips"
    ipfile.write_text('10.0.0.0/8: yes\n"2001:db8::/32": yes\n')
    netfile = tmp_path / "nets"
    netfile.write_text("192.168.34.0/24: yes\n")
    hosts = HostList(f"net-iplsearch;{ipfile} : net24-lsearch;{netfile}")
    assert hosts.match("10.2.3.4")
    assert hosts.match("2001:db8::9")
    assert hosts.match("192.168.34.6")
    assert not hosts.match("192.168.35.6")
    assert not hosts.needs_host_name


def test_name_lsearch_in_host_list(tmp_path):
    names = tmp_path / "names"
    names.write_text("friend.example: ok\n")
    hosts = HostList(f"lsearch;{names}")
    assert hosts.match("192.0.2.1", host_name="Friend.Example")
    assert not hosts.match("192.0.2.1", host_name="enemy.example")


# -- domain lists ----------------------------------------------------------------

def test_domain_list_patterns():
    domains = DomainList("@ : lib.unseen.edu : *.foundation.example : *key.ex : "
                         "^[1-2]\\d{3}\\.fict\\.example$", primary_hostname="Mail.Example")
    assert domains.match("mail.example")
    assert domains.match("LIB.unseen.edu")
    assert domains.match("a.b.foundation.example")
    assert not domains.match("foundation.example")
    assert domains.match("donkey.ex")
    assert domains.match("1999.fict.example")
    assert not domains.match("3999.fict.example")


def test_domain_at_without_primary_hostname_matches_nothing():
    assert not DomainList("@").match("")


def test_domain_literal_at_brackets():
    domains = DomainList("@[]", local_addresses=["192.0.2.10"])
    assert domains.match("[192.0.2.10]")
    assert not domains.match("[192.0.2.11]")
    assert not domains.match("192.0.2.10")


def test_domain_lsearch(tmp_path):
    path = tmp_path / "domains"
    path.write_text("Example.COM: local\n")
    domains = DomainList(f"lsearch;{path}")
    assert domains.match("example.com")
    assert not domains.match("example.net")


def test_domain_file_hash_anywhere_is_comment(tmp_path):
    path = tmp_path / "domains"
    path.write_text("a.example#comment\n")
    assert DomainList(str(path)).match("a.example")


# -- address lists -------------------------------------------------------------

def test_empty_item_matches_bounce_sender():
    senders = AddressList(":")
    assert senders.match("")
    assert not senders.match("a@b.example")


def test_address_patterns():
    addresses = AddressList("jbc@askone.example : *@*.spamming.site : *-request@lists.example : "
                            "enemy.domain : *.enemy.domain : postmaster@*")
    assert addresses.match("JBC@AskOne.Example")
    assert addresses.match("x@mail.spamming.site")
    assert addresses.match("foo-request@lists.example")
    assert not addresses.match("foo@lists.example")
    assert addresses.match("anyone@enemy.domain")
    assert addresses.match("anyone@sub.enemy.domain")
    assert addresses.match("postmaster@anything.example")
    assert not addresses.match("")


def test_address_regex_matches_whole_address_including_empty():
    assert AddressList("^$").match("")
    assert AddressList("^\\d{8}.+@spam\\.example$").match("12345678x@spam.example")


def test_address_named_domain_list():
    named = NamedLists(domain={"hostile": "*.bad.example"},
                       address={"bad": "*@+hostile"})
    assert AddressList("*@+hostile", named).match("a@x.bad.example")
    assert AddressList("+bad", named).match("a@x.bad.example")
    assert not AddressList("+bad", named).match("a@good.example")


def test_caseful_switch():
    addresses = AddressList("+caseful : Fred@Example.com")
    assert addresses.match("Fred@example.com")
    assert not addresses.match("fred@example.com")
    assert AddressList("Fred@Example.com").match("FRED@example.COM")


def test_address_file_comment_needs_preceding_space(tmp_path):
    path = tmp_path / "senders"
    path.write_text("not#comment@x.y.z   # but this is a comment\n")
    addresses = AddressList(str(path))
    assert addresses.match("not#comment@x.y.z")


def test_whole_address_lsearch(tmp_path):
    path = tmp_path / "blocked"
    path.write_text("spammer@example.com: 1\n")
    addresses = AddressList(f"lsearch;{path}")
    assert addresses.match("Spammer@Example.com")
    assert not addresses.match("")


# -- local part lists ------------------------------------------------------------

def test_local_part_list():
    parts = LocalPartList("postmaster : *-request : ^abuse$ : !root")
    assert parts.match("PostMaster")
    assert parts.match("list-request")
    assert parts.match("abuse")
    assert not parts.match("root")
    assert parts.match("anyone")      # last item negative


def test_local_part_caseful():
    parts = LocalPartList("+caseful : Admin")
    assert parts.match("Admin")
    assert not parts.match("admin")


# -- speed ------------------------------------------------------------------------

def test_host_match_is_fast():
    text = "<; " + " ; ".join(f"10.{i}.0.0/16" for i in range(200)) + " ; 2001:db8::/32"
    hosts = HostList(text)
    start = time.perf_counter()
    for _ in range(10000):
        hosts.match("192.0.2.1")
    per_call = (time.perf_counter() - start) / 10000
    assert per_call < 20e-6

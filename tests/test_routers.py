"""Routers and compile_delivery: parsing, preconditions, manualroute, dnslookup
against a real DNS server on loopback, and configuration errors."""
import random

import pytest

from dns_server import DnsServer
from delivery_support import write_config
from mta.config import load_config
from mta.configfile import ConfigError
from mta.delivery_config import compile_delivery
from mta.dns_resolver import Resolver
from mta.lookups import LookupCache
from mta.routers import (
    Address, Host, RouteDeferred, RouteFailed, Routed, RoutingContext, order_mx, parse_host_item,
    resolve_by_name, route_address, split_rule_fields,
)
from mta.dns_resolver import MxRecord
from mta.values import BadValue

TRANSPORTS = """
begin transports
remote_smtp:
  driver = smtp
local_delivery:
  driver = appendfile
  directory = /tmp/unused/$local_part
  maildir_format
"""


def compile_text(tmp_path, routers: str, transports: str = TRANSPORTS, retry: str = ""):
    return compile_delivery(load_config(write_config(tmp_path, "begin routers\n" + routers + transports + retry)))


def context(servers=()):
    return RoutingContext({"primary_hostname": "mta.test"}, LookupCache(), resolve_by_name,
                          lambda configured: Resolver(list(configured or servers), timeout=1.0),
                          random.Random(1))


def route(delivery, address, sender="s@example.org", ctx=None):
    return route_address(delivery.routers, Address.parse(address), sender, ctx or context())


@pytest.mark.parametrize("item, expected", [
    ("mail.example.com", ("mail.example.com", None)),
    ("mail.example.com:2525", ("mail.example.com", 2525)),
    ("127.0.0.1:26", ("127.0.0.1", 26)),
    ("[::1]:2526", ("::1", 2526)),
    ("[::1]", ("::1", None)),
    ("::1", ("::1", None)),
    ("host:smtp", ("host", 25)),
])
def test_host_items(item, expected):
    assert parse_host_item(item) == expected


def test_bad_host_items():
    for item in ("[::1", "[::1]x", "host:99999"):
        with pytest.raises(BadValue):
            parse_host_item(item)


def test_rule_fields_may_be_quoted():
    assert split_rule_fields('*.x  "a : b"  byname') == ["*.x", "a : b", "byname"]
    with pytest.raises(BadValue):
        split_rule_fields('* "open')


def test_mx_order_by_preference_random_within():
    records = [MxRecord(20, "c"), MxRecord(10, "a"), MxRecord(10, "b")]
    orders = {tuple(r.exchange for r in order_mx(records, random.Random(seed))) for seed in range(20)}
    assert orders == {("a", "b", "c"), ("b", "a", "c")}


def test_accept_for_local_domains_then_manualroute(tmp_path):
    delivery = compile_text(tmp_path, """
local_user:
  driver = accept
  domains = +local_domains
  transport = local_delivery
smarthost:
  driver = manualroute
  domains = ! +local_domains
  route_list = *.example.com 127.0.0.1::2525 ; other.org "<, [::1]:2600 , 127.0.0.2"
  transport = remote_smtp
""")
    assert route(delivery, "bob@localhost") == Routed("local_user", "local_delivery")
    assert route(delivery, "bob@mx.example.com") == Routed("smarthost", "remote_smtp",
                                                           (Host("127.0.0.1", "127.0.0.1", 2525),))
    assert route(delivery, "bob@other.org") == Routed("smarthost", "remote_smtp",
                                                      (Host("::1", "::1", 2600), Host("127.0.0.2", "127.0.0.2")))
    assert route(delivery, "bob@nowhere.net") == RouteFailed("", "Unrouteable address")


def test_route_list_host_names_by_name_and_expanded(tmp_path):
    delivery = compile_text(tmp_path, """
smarthost:
  driver = manualroute
  route_list = ^x.*$ "${if eq{$local_part}{bob}{127.0.0.9}{127.0.0.8}}" ; * localhost::2525 byname
  transport = remote_smtp
""")
    assert route(delivery, "bob@x.test").hosts == (Host("127.0.0.9", "127.0.0.9"),)
    assert route(delivery, "eve@x.test").hosts == (Host("127.0.0.8", "127.0.0.8"),)
    routed = route(delivery, "a@example.com")
    assert routed.hosts and all(h.name == "localhost" and h.port == 2525 for h in routed.hosts)
    assert {h.address for h in routed.hosts} <= {"127.0.0.1", "::1"}


def test_expanded_route_data(tmp_path):
    delivery = compile_text(tmp_path, """
smarthost:
  driver = manualroute
  route_data = ${if eq{$domain}{a.test}{127.0.0.5::26}{}}
  transport = remote_smtp
""")
    assert route(delivery, "x@a.test").hosts == (Host("127.0.0.5", "127.0.0.5", 26),)
    assert route(delivery, "x@b.test") == RouteFailed("", "Unrouteable address")


def test_unknown_host_with_host_find_failed(tmp_path, dns):
    delivery = compile_text(tmp_path, """
fails:
  driver = manualroute
  domains = f.test
  route_list = * no-such-host.test bydns
  host_find_failed = fail
  transport = remote_smtp
ignores:
  driver = manualroute
  domains = i.test
  route_list = * no-such-host.test:primary.mx.test bydns
  host_find_failed = ignore
  transport = remote_smtp
defers:
  driver = manualroute
  domains = d.test
  route_list = * broken.test bydns
  transport = remote_smtp
""")
    ctx = context([("127.0.0.1", dns.port)])
    failed = route(delivery, "x@f.test", ctx=ctx)
    assert isinstance(failed, RouteFailed) and "no-such-host.test" in failed.message
    assert route(delivery, "x@i.test", ctx=ctx).hosts == (Host("primary.mx.test", "127.0.0.21"),)
    assert isinstance(route(delivery, "x@d.test", ctx=ctx), RouteDeferred)


def test_preconditions_and_no_more(tmp_path):
    delivery = compile_text(tmp_path, """
vip:
  driver = manualroute
  senders = *@vip.example
  local_parts = ceo : cfo
  route_list = * 127.0.0.10
  transport = remote_smtp
stop_here:
  driver = manualroute
  domains = stop.example
  route_list = nomatch.example 127.0.0.11
  transport = remote_smtp
  no_more
catch_all:
  driver = manualroute
  route_list = * 127.0.0.12
  transport = remote_smtp
""")
    assert route(delivery, "ceo@x.test", "boss@vip.example").router == "vip"
    assert route(delivery, "ceo@x.test", "other@else.example").router == "catch_all"
    assert route(delivery, "clerk@x.test", "boss@vip.example").router == "catch_all"
    assert route(delivery, "ceo@stop.example", "a@b") == RouteFailed("stop_here", "Unrouteable address")


ZONE = {
    "mx.test": {"MX": ["20 backup.mx.test.", "10 primary.mx.test."]},
    "primary.mx.test": {"A": ["127.0.0.21"]},
    "backup.mx.test": {"A": ["127.0.0.22"], "AAAA": ["::1"]},
    "nomx.test": {"A": ["127.0.0.23"]},
    "nullmx.test": {"MX": ["0 ."]},
    "dangling.test": {"MX": ["10 gone.dangling.test."]},
    "loop.test": {"MX": ["10 primary.mx.test."]},
}


@pytest.fixture
def dns():
    server = DnsServer(ZONE, servfail=("broken.test",)).start()
    yield server
    server.stop()


def dnslookup_config(tmp_path, port, extra=""):
    return compile_text(tmp_path, f"""
dnslookup:
  driver = dnslookup
  dns_servers = 127.0.0.1::{port}
  transport = remote_smtp
{extra}
""")


def test_dnslookup_mx_then_addresses(tmp_path, dns):
    delivery = dnslookup_config(tmp_path, dns.port)
    routed = route(delivery, "a@mx.test")
    assert routed.hosts == (Host("primary.mx.test", "127.0.0.21", None, 10),
                            Host("backup.mx.test", "127.0.0.22", None, 20),
                            Host("backup.mx.test", "::1", None, 20))
    assert route(delivery, "a@nomx.test").hosts == (Host("nomx.test", "127.0.0.23"),)


def test_dnslookup_failures(tmp_path, dns):
    delivery = dnslookup_config(tmp_path, dns.port)
    assert route(delivery, "a@unknown.test") == RouteFailed("", "Unrouteable address")
    assert isinstance(route(delivery, "a@broken.test"), RouteDeferred)
    assert route(delivery, "a@nullmx.test").message == "domain does not accept mail (null MX record)"
    assert "non-existent hosts" in route(delivery, "a@dangling.test").message


def test_dnslookup_ignore_target_hosts(tmp_path, dns):
    delivery = dnslookup_config(tmp_path, dns.port, "  ignore_target_hosts = <; 127.0.0.21 ; ::1")
    assert route(delivery, "a@mx.test").hosts == (Host("backup.mx.test", "127.0.0.22", None, 20),)
    assert route(delivery, "a@loop.test") == RouteFailed("", "Unrouteable address")


def test_no_dns_without_dnslookup(tmp_path, dns):
    delivery = compile_text(tmp_path, """
smarthost:
  driver = manualroute
  route_list = * 127.0.0.1
  transport = remote_smtp
""")
    route(delivery, "a@mx.test", ctx=context([("127.0.0.1", dns.port)]))
    assert dns.queries == []
    assert not delivery.uses_dns


@pytest.mark.parametrize("routers, transports, message", [
    ("r:\n  driver = nosuch\n  transport = remote_smtp\n", TRANSPORTS, 'unknown driver "nosuch"'),
    ("r:\n  driver = accept\n  transport = remote_smtp\n  colour = blue\n", TRANSPORTS,
     'option "colour" unknown'),
    ("r:\n  driver = accept\n  transport = missing\n", TRANSPORTS, 'transport "missing" is not defined'),
    ("r:\n  driver = accept\n", TRANSPORTS, "has no transport"),
    ("r:\n  driver = manualroute\n  transport = remote_smtp\n", TRANSPORTS, "needs route_list"),
    ("r:\n  driver = manualroute\n  route_list = * [::1\n  transport = remote_smtp\n", TRANSPORTS,
     "route_list: malformed host item"),
    ("r:\n  driver = manualroute\n  route_list = * h1 sideways\n  transport = remote_smtp\n", TRANSPORTS,
     'unknown host list option "sideways"'),
    ("r:\n  driver = accept\n  transport = t\n  no_transport\n", "begin transports\nt:\n  driver = smtp\n",
     '"transport" is not a boolean option'),
    ("r:\n  driver = accept\n  transport = t\n",
     "begin transports\nt:\n  driver = smtp\n  socks_proxy = 127.0.0.1 port=99999\n", "socks_proxy: "),
    ("r:\n  driver = accept\n  transport = t\n",
     "begin transports\nt:\n  driver = smtp\n  command_timeout = soon\n", "command_timeout: "),
    ("r:\n  driver = accept\n  transport = t\n",
     "begin transports\nt:\n  driver = appendfile\n  directory = /x\n", "maildir_format only"),
    ("r:\n  driver = accept\n  transport = t\n",
     "begin transports\nt:\n  driver = smtp\n  helo_data = ${nosuchop:x}\n", "helo_data: "),
    ("r:\n  driver = dnslookup\n  transport = t\n  dns_servers = dns.example\n",
     "begin transports\nt:\n  driver = smtp\n", "is not an IP address"),
])
def test_configuration_errors_name_the_line(tmp_path, routers, transports, message):
    with pytest.raises(ConfigError) as info:
        compile_text(tmp_path, routers, transports)
    assert message in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "mta.conf") + ":")


def test_bad_retry_rule_and_expanded_socks_proxy(tmp_path):
    ok = compile_text(tmp_path, "r:\n  driver = accept\n  transport = t\n",
                      "begin transports\nt:\n  driver = smtp\n  socks_proxy = ${if eq{1}{1}{127.0.0.1}{}}\n")
    assert ok.transports["t"].socks_proxy is not None
    with pytest.raises(ConfigError, match="unknown error type"):
        compile_text(tmp_path, "r:\n  driver = accept\n  transport = t\n",
                     "begin transports\nt:\n  driver = smtp\n", "begin retry\n* badtype F,1h,1m\n")


def test_booleans_and_defaults(tmp_path):
    delivery = compile_text(tmp_path, "r:\n  driver = accept\n  transport = t\n", """
begin transports
t:
  driver = appendfile
  directory = mail/$local_part
  maildir_format
  no_create_directory
  return_path_add = true
  hide envelope_to_add
""")
    transport = delivery.transports["t"]
    assert (transport.maildir_format, transport.create_directory, transport.return_path_add,
            transport.envelope_to_add, transport.delivery_date_add) == (True, False, True, True, False)
    assert transport.resolve_path("mail/bob") == str(tmp_path / "mail" / "bob")

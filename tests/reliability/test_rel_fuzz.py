"""Hostile input, fuzzed: the PROXY parser, the SMTP session, the
configuration reader and the expansion engine answer arbitrary input with
their own kind of answer (a header or ProxyProtocolError; SMTP replies; a
Config or ConfigError; a string or ExpansionError), never another exception.

Also relied on (not repeated here): tests/test_proxy_protocol.py's
hypothesis properties, tests/test_expand.py's, and `make fuzz` (a million
PROXY inputs through bench/proxy_parser.py); a short run of the latter is
part of this suite.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from bench.proxy_parser import run_fuzz
from mta.config import load_config
from mta.configfile import ConfigError
from mta.expand import DictContext, ExpansionError, compile_expansion
from mta.smtp_commands import MAX_COMMAND_LINE
from mta.validate import validate_config
from test_acl import Server
from test_expand import _FRAGMENTS as EXPANSION_FRAGMENTS

PROXY_FUZZ_INPUTS = 50_000
SMTP_EXAMPLES = 600
CONFIG_EXAMPLES = 500
REPLY_LINE = re.compile(r"[2-5]\d\d[ -]")


def test_proxy_parser_fuzz(report):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = run_fuzz(PROXY_FUZZ_INPUTS, seed=int.from_bytes(os.urandom(4), "big"))
    assert status == 0, output.getvalue()
    report("fuzz: PROXY parser", "random, built, truncated, mutated headers", PROXY_FUZZ_INPUTS, 0,
           "+ hypothesis in test_proxy_protocol.py; make fuzz: 1e6")


# ------------------------------------------------------------------ the SMTP session

ACLS = r"""
helo:
  deny    condition = ${if eq{$sender_helo_name}{bad.example}}
  accept
mail:
  deny    senders = bad@example.org
          message = no mail from $sender_address
  accept
rcpt:
  deny    local_parts = dropme
          message = refused $local_part@$domain
  drop    local_parts = hangup
  discard local_parts = blackhole
  accept  domains = +local_domains
predata:
  accept
"""
STAGES = ("acl_smtp_helo = helo\nacl_smtp_mail = mail\nacl_smtp_rcpt = rcpt\n"
          "acl_smtp_predata = predata\nsmtp_max_synprot_errors = 1000")
_SMTP_SERVER: list[Server] = []

VERBS = st.sampled_from([b"HELO ", b"EHLO ", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT",
                         b"VRFY ", b"EXPN ", b"HELP", b"STARTTLS", b"BDAT ", b"AUTH ", b"mail from: ",
                         b"PROXY TCP4 203.0.113.9 192.0.2.1 1 25", b"", b" ", b"\t"])
ARGUMENTS = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"<a@example.org>", b"<u@localhost>", b"<>", b" SIZE=100", b" BODY=8BITMIME",
                     b" BODY=BINARYMIME", b"<dropme@localhost>", b"<hangup@localhost>", b"<blackhole@mta.test>",
                     b"<bad@example.org>", b"bad.example", b"c.example", b"<@a,@b:u@localhost>", b"\x00",
                     b"\xff\xfe", b" SIZE=99999999999999999999", b" SIZE=", b"=", b"<<>>", b"u@localhost",
                     b"postmaster", b"<" + b"x" * 300 + b"@localhost>", b"\r", b"\n"]))
LINES = st.one_of(
    st.builds(lambda verb, rest: verb + rest, VERBS, st.lists(ARGUMENTS, max_size=4).map(b"".join)),
    st.binary(max_size=100),
    st.just(b"X" * (MAX_COMMAND_LINE + 1)),
)


def smtp_server() -> Server:
    if not _SMTP_SERVER:
        _SMTP_SERVER.append(Server(Path(tempfile.mkdtemp(prefix="mta-fuzz-")), ACLS, STAGES))
    return _SMTP_SERVER[0]


def assert_smtp_reply(text: str) -> None:
    lines = text.split("\r\n")
    assert all(REPLY_LINE.match(line) for line in lines), repr(text)


@settings(max_examples=SMTP_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINES, max_size=25))
def test_smtp_session_answers_anything_with_smtp_replies(lines):
    session = smtp_server().connect().session
    for line in lines:
        reply = session.handle(line)
        assert_smtp_reply(reply.text)
        if reply.close:
            return
        if reply.start_data:
            session.data_received()
            session.message_done()
        if reply.start_tls:
            session.tls_started("TLSv1.3:TLS_AES_256_GCM_SHA384:256", "TLSv1.3")


def test_smtp_session_fuzz_row(report):
    report("fuzz: SMTP session (ACLs on)", "hypothesis: sequences of <=25 hostile lines", SMTP_EXAMPLES, 0,
           "only SMTP replies, no exception")


# ------------------------------------------------------------------ the configuration reader

CONFIG_FRAGMENTS = st.sampled_from([
    "primary_hostname = mta.test", "smtp_accept_max = ", "-1", "99999999999999999999999", "5m", "1w2d",
    "begin acl", "begin routers", "begin transports", "begin retry", "begin bogus", "acl_smtp_rcpt = r",
    "acl_smtp_data = nowhere", "r:", "  accept", "  deny domains = ", "  require", "  warn ratelimit = ",
    "driver = accept", "driver = smtp", "driver = appendfile", "driver = manualroute", "driver = dnslookup",
    "route_list = * 127.0.0.1", "transport = t", "t:", "router:", "hostlist h = ", "+h", "+nothere",
    "domainlist local_domains = ", "127.0.0.1/33", "10.0.0.0/8", "::1", "<; ", "::", ":", "\\", " ", "#",
    "MACRO = ", "MACRO", "MACRO == ", ".include", ".include_if_exists /nonexistent", ".bogus", "${if",
    "${lookup{", "}", "{", "$", '"', "=", "log_selector = +all", "-proxy", "+nothing", "local_interfaces = ",
    "daemon_smtp_ports = ", "smtp", "65536", "smtp_banner = ", "* * F,2h,15m; G,16h,1h,1.5", "exim_user = ",
    "tls_certificate = /nonexistent", "tls_on_connect_ports = 465", "message_size_limit = 10M",
    "hosts_proxy = ", "socks_proxy = 127.0.0.1 port=1080 weight=x", "no_bogus", "spool_sync = sometimes",
    "maildir_format", "directory = /tmp/x", "\t", "=yes", "true", "no_smtp_accept_max",
])
SOUND_CONFIG = r"""primary_hostname = mta.test
domainlist local_domains = localhost : mta.test
hostlist relays = 127.0.0.1 : 10.0.0.0/8
hosts_proxy = +relays
acl_smtp_rcpt = rcpt
message_size_limit = 10M
log_selector = +proxy +incoming_port
begin acl
rcpt:
  deny    message = not here: ${lc:$domain}
          domains = !+local_domains
  warn    ratelimit = 10 / 1h / per_rcpt / $sender_address
  accept
begin routers
remote:
  driver = manualroute
  domains = ! +local_domains
  route_list = * 127.0.0.1
  transport = remote_smtp
local:
  driver = accept
  transport = local_delivery
begin transports
remote_smtp:
  driver = smtp
  socks_proxy = 127.0.0.1 port=1080 weight=2
local_delivery:
  driver = appendfile
  directory = /tmp/mail/$local_part
  maildir_format
begin retry
*  *  F,2h,15m; G,16h,1h,1.5
""".splitlines()


def mutate(lines: list[str], edits: list[tuple[int, str, str, int]]) -> str:
    """Apply (line, how, fragment, position) edits to a sound configuration."""
    lines = list(lines)
    for index, how, fragment, position in edits:
        index %= len(lines) or 1
        if not lines:
            lines.append(fragment)
        elif how == "replace":
            lines[index] = fragment
        elif how == "insert":
            lines.insert(index, fragment)
        elif how == "cut":
            lines[index] = lines[index][: position % (len(lines[index]) + 1)]
        elif how == "splice":
            cut = position % (len(lines[index]) + 1)
            lines[index] = lines[index][:cut] + fragment + lines[index][cut:]
        else:
            del lines[index]
    return "\n".join(lines) + "\n"


EDITS = st.lists(st.tuples(st.integers(0, 100), st.sampled_from(["replace", "insert", "cut", "splice", "delete"]),
                           st.one_of(CONFIG_FRAGMENTS, st.text(max_size=12)), st.integers(0, 100)),
                 min_size=1, max_size=4)
CONFIG_TEXTS = st.one_of(
    EDITS.map(lambda edits: mutate(SOUND_CONFIG, edits)),
    st.lists(st.tuples(CONFIG_FRAGMENTS, st.sampled_from(["\n", " ", "", "\n  ", "\\\n"])), max_size=30)
    .map(lambda parts: "".join(text + separator for text, separator in parts)),
    st.text(max_size=200),
)


def test_the_sound_configuration_is_sound(tmp_path):
    path = tmp_path / "mta.conf"
    path.write_text(mutate(SOUND_CONFIG, []))
    validate_config(load_config(str(path)))


@settings(max_examples=CONFIG_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIG_TEXTS)
def test_configuration_reader_gives_a_config_or_a_config_error(text):
    with tempfile.TemporaryDirectory(prefix="mta-fuzz-config-") as directory:
        path = os.path.join(directory, "mta.conf")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
        try:
            validate_config(load_config(path))
        except ConfigError as exc:
            assert str(exc)


def test_configuration_fuzz_row(report):
    report("fuzz: configuration reader", "hypothesis: option/section/macro fragments, text",
           CONFIG_EXAMPLES, 0, "Config or ConfigError only")


# ------------------------------------------------------------------ the expansion engine

@settings(max_examples=300, deadline=None)
@given(st.lists(EXPANSION_FRAGMENTS, max_size=20).map("".join), st.text(max_size=40))
def test_variable_values_are_never_expanded_again(template, hostile):
    """What a client sends ($sender_address, $local_part...) is data: an
    expansion that uses it never evaluates it, whatever it contains."""
    context = DictContext({"x": hostile, "sender_address": hostile})
    assert compile_expansion("<$sender_address>").expand(context) == f"<{hostile}>"
    try:
        result = compile_expansion(template).expand(context)
    except ExpansionError:
        return
    assert isinstance(result, str)


def test_expansion_fuzz_row(report):
    report("fuzz: expansion engine", "hypothesis: fragments with hostile variable values", 300, 0,
           "+ test_expand.py property")

"""The ACL engine in process: verbs, conditions, modifiers and messages as
Exim has them, against a real SmtpSession and a real (dict) rate store."""
import os

import pytest

from harness import CHAPTER_CONNECT_ACL
from mta.acl import AclPolicy, AclServices, compile_acls, split_message
from mta.config import load_config
from mta.configfile import ConfigError
from mta.lists import DomainList
from mta.log import Logs
from mta.lookups import LookupCache
from mta.policy import LocalDomainsPolicy
from mta.ratelimit import DictRateStore
from mta.smtp_session import ConnectionInfo, Limits, SmtpSession

LIMITS = Limits(hostname="mta.test", message_size_limit=10_000_000, recipients_max=100,
                max_synprot_errors=3, tls_available=False, qualify_domain="mta.test")
TEMPORARY = "451 Temporary local problem - please try later"


class Server:
    """One compiled configuration; `connect()` opens an in-process session."""

    def __init__(self, tmp_path, acls: str, options: str = "", log_selector: str = "") -> None:
        self.directory = tmp_path
        path = tmp_path / "mta.conf"
        path.write_text(f"""
primary_hostname = mta.test
spool_directory = {tmp_path}/spool
log_file_path = {tmp_path}/log/%slog
log_selector = {log_selector}
domainlist local_domains = localhost : mta.test
{options}
begin acl
{acls}
""")
        self.config = load_config(str(path))
        self.logs = Logs(self.config.log_file_path, self.config.log_selector)
        self.sleeps: list[float] = []
        self.store = DictRateStore()
        self.services = AclServices(self.store, self.logs, LookupCache(), sleep=self.sleeps.append)
        local = DomainList("+local_domains", self.config.compiled_lists, "mta.test")
        self.acls = compile_acls(self.config)
        self.fallback = LocalDomainsPolicy(local)

    def connect(self, address: str = "127.0.0.2") -> "Session":
        policy = AclPolicy(self.acls, self.services, self.fallback)
        return Session(SmtpSession(ConnectionInfo(address, 40000, "127.0.0.1", 25), LIMITS, policy))

    def log(self, kind: str = "main") -> str:
        path = os.path.join(self.directory, "log", f"{kind}log")
        return open(path).read() if os.path.exists(path) else ""


class Session:
    def __init__(self, session: SmtpSession) -> None:
        self.session = session

    def connect(self):
        """The connect ACL's verdict, as the server asks for it."""
        return self.session.policy.check("connect", self.session)

    def send(self, line: str) -> str:
        return self.session.handle(line.encode()).text

    def reply(self, line: str):
        return self.session.handle(line.encode())

    def start(self, sender: str = "a@example.org") -> None:
        assert self.send("EHLO c.example").startswith("250")
        assert self.send(f"MAIL FROM:<{sender}>").startswith("250")


def rcpt_server(tmp_path, acl_body: str, **kwargs) -> Server:
    return Server(tmp_path, "acl_check_rcpt:\n" + acl_body, "acl_smtp_rcpt = acl_check_rcpt", **kwargs)


# --------------------------------------------------------------------------
# Verbs


def test_deny_defaults_and_messages(tmp_path):
    server = rcpt_server(tmp_path, """
  deny    domains = plain.example
  deny    domains = told.example
          message = not for $domain
          log_message = refused $local_part
  deny    domains = coded.example
          message = 550 5.7.1 go away
  accept
""")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@plain.example>") == "550 Administrative prohibition"
    assert client.send("RCPT TO:<v@told.example>") == "550 not for told.example"
    assert client.send("RCPT TO:<w@coded.example>") == "550 5.7.1 go away"
    assert client.send("RCPT TO:<x@fine.example>").startswith("250")
    reject = server.log("reject")
    assert "H=(c.example) [127.0.0.2] F=<a@example.org> rejected RCPT <u@plain.example>\n" in reject
    assert "H=(c.example) [127.0.0.2] F=<a@example.org> rejected RCPT <v@told.example>: refused v\n" in reject


def test_defer_verb_shows_its_message_and_is_logged_as_temporary(tmp_path):
    server = rcpt_server(tmp_path, """
  defer   domains = later.example
          message = try again soon
  defer   domains = quiet.example
  accept
""")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@later.example>") == "451 try again soon"
    assert client.send("RCPT TO:<u@quiet.example>") == TEMPORARY
    assert "F=<a@example.org> temporarily rejected RCPT <u@later.example>: try again soon" in server.log("reject")


def test_drop_closes_after_the_refusal(tmp_path):
    server = rcpt_server(tmp_path, "  drop message = bye\n       domains = drop.example\n  accept\n")
    client = server.connect()
    client.start()
    reply = client.reply("RCPT TO:<u@drop.example>")
    assert (reply.text, reply.close) == ("550 bye", True)


def test_discard_at_rcpt_accepts_and_drops_only_that_recipient(tmp_path):
    server = rcpt_server(tmp_path, "  discard domains = void.example\n  accept\n")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@void.example>").startswith("250")
    assert client.send("RCPT TO:<kept@localhost>").startswith("250")
    transaction = client.session.transaction
    assert transaction.recipients == ["kept@localhost"]
    assert transaction.discarded_recipients == 1 and not transaction.discard


def test_discard_at_mail_and_not_at_connect(tmp_path):
    server = Server(tmp_path, "mail:\n  discard\nconnect:\n  discard\n",
                    "acl_smtp_mail = mail\nacl_smtp_connect = connect")
    client = server.connect()
    verdict = client.connect()
    assert (verdict.action, verdict.message) == ("defer", "")
    assert '"discard" verb not allowed in connection ACL' in server.log("panic")
    client.start()
    assert client.session.transaction.discard


def test_discard_in_the_data_acl_discards_the_message(tmp_path):
    server = Server(tmp_path, "data:\n  discard senders = spam@example.org\n  accept\n", "acl_smtp_data = data")
    for sender, discarded in (("spam@example.org", True), ("a@example.org", False)):
        client = server.connect()
        client.start(sender)
        assert client.send("RCPT TO:<u@localhost>").startswith("250")
        assert client.send("DATA").startswith("354")
        verdict = client.session.data_received()
        assert verdict.accepted and client.session.transaction.discard == discarded


def test_require_and_implicit_deny_at_the_end(tmp_path):
    server = rcpt_server(tmp_path, """
  require message = local parts must be short
          condition = ${if <{${strlen:$local_part}}{6}}
  accept  domains = +local_domains
""")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<toolongname@localhost>") == "550 local parts must be short"
    assert client.send("RCPT TO:<ok@localhost>").startswith("250")
    assert client.send("RCPT TO:<ok@elsewhere.example>") == "550 Administrative prohibition"


def test_message_is_the_last_one_reached(tmp_path):
    server = rcpt_server(tmp_path, """
  require message = first
          domains = localhost : a.example
          message = second
          local_parts = good
  accept
""")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@b.example>") == "550 first"
    assert client.send("RCPT TO:<bad@a.example>") == "550 second"
    assert client.send("RCPT TO:<good@a.example>").startswith("250")


def test_warn_logs_once_per_connection_and_goes_on(tmp_path):
    server = rcpt_server(tmp_path, """
  warn    log_message = odd recipient $local_part
          local_parts = odd
  warn    message = only a header, never logged
  accept
""")
    client = server.connect()
    client.start()
    for _ in range(2):
        assert client.send("RCPT TO:<odd@localhost>").startswith("250")
    main = server.log()
    assert main.count("H=(c.example) [127.0.0.2] Warning: odd recipient odd") == 1
    assert "never logged" not in main


def test_negated_conditions(tmp_path):
    server = rcpt_server(tmp_path, "  deny !hosts = 127.0.0.2\n  deny !senders = a@example.org\n  accept\n")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@x.example>").startswith("250")
    other = server.connect("127.0.0.3")
    other.start()
    assert other.send("RCPT TO:<u@x.example>").startswith("550")
    third = server.connect()
    third.start("b@example.org")
    assert third.send("RCPT TO:<u@x.example>").startswith("550")


def test_list_conditions_at_rcpt(tmp_path):
    server = rcpt_server(tmp_path, """
  accept  recipients = postmaster@mta.test
  accept  senders = : friend@*.example
          local_parts = \\N^[a-z]+$\\N : \\N^x\\d+$\\N
  deny
""")
    client = server.connect()
    client.start("friend@sub.example")
    assert client.send("RCPT TO:<postmaster@mta.test>").startswith("250")
    assert client.send("RCPT TO:<abc@anywhere.example>").startswith("250")
    assert client.send("RCPT TO:<x12@anywhere.example>").startswith("250")
    assert client.send("RCPT TO:<a.b@anywhere.example>").startswith("550")
    bounce = server.connect()
    bounce.start("")
    assert bounce.send("RCPT TO:<abc@anywhere.example>").startswith("250")


def test_expanded_list_and_forced_failure(tmp_path):
    server = rcpt_server(tmp_path, """
  accept  hosts = ${if eq{$local_part}{me}{$sender_host_address}{192.0.2.1}}
  accept  hosts = ${if eq{$local_part}{fail}{x}fail}
  deny
""")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<me@x.example>").startswith("250")
    assert client.send("RCPT TO:<you@x.example>").startswith("550")
    assert client.send("RCPT TO:<other@x.example>").startswith("550")


# --------------------------------------------------------------------------
# Nested ACLs


def test_nested_acl_results_and_arguments(tmp_path):
    server = Server(tmp_path, """
acl_check_rcpt:
  accept  acl = is_domain $domain ok.example
  require message = outer says no
          acl = not_drop
  require acl = check_count
  accept
is_domain:
  accept  condition = ${if and{{eq{$acl_arg1}{$acl_arg2}}{eq{$acl_narg}{2}}}}
not_drop:
  drop    local_parts = dropme
          message = dropped by inner
  accept
check_count:
  deny    local_parts = counted
          message = inner message
  accept
""", "acl_smtp_rcpt = acl_check_rcpt")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@ok.example>").startswith("250")
    assert client.send("RCPT TO:<counted@x.example>") == "550 inner message"
    reply = client.reply("RCPT TO:<dropme@x.example>")
    assert (reply.text, reply.close) == ("550 outer says no", True)


def test_nested_defer_defers_and_discard_needs_accept(tmp_path):
    server = Server(tmp_path, """
acl_check_rcpt:
  deny    local_parts = d
          acl = defers
  deny    local_parts = x
          acl = discards
  deny    local_parts = z
          acl = accepts
          acl = discards
  accept  acl = discards
defers:
  defer   message = inner defer
discards:
  discard
accepts:
  accept
""", "acl_smtp_rcpt = acl_check_rcpt")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<d@x.example>") == "451 inner defer"
    assert client.send("RCPT TO:<x@x.example>") == TEMPORARY
    assert client.send("RCPT TO:<z@x.example>") == TEMPORARY
    assert 'nested ACL returned "discard" for "deny" command' in server.log("reject")
    assert client.send("RCPT TO:<y@x.example>").startswith("250")
    assert client.session.transaction.discarded_recipients == 1
    assert client.session.transaction.recipients == []


def test_nesting_loop_is_a_temporary_error(tmp_path):
    server = Server(tmp_path, "loop:\n  accept acl = loop\n", "acl_smtp_mail = loop")
    client = server.connect()
    client.send("EHLO c.example")
    assert client.send("MAIL FROM:<a@example.org>") == TEMPORARY
    assert "temporarily rejected MAIL <a@example.org>: ACL nested too deep: possible loop" in server.log()


# --------------------------------------------------------------------------
# Modifiers and variables


def test_set_connection_and_message_variables(tmp_path):
    server = Server(tmp_path, """
connect:
  accept  set acl_c0 = seen $sender_host_address
          set acl_m_early = at connect
mail:
  accept  set acl_m1 = sender $sender_address
rcpt:
  deny    message = [$acl_c0] [$acl_m1] [$acl_m_early]
""", "acl_smtp_connect = connect\nacl_smtp_mail = mail\nacl_smtp_rcpt = rcpt")
    client = server.connect()
    assert client.connect().accepted
    client.start()
    assert client.send("RCPT TO:<u@x.example>") == "550 [seen 127.0.0.2] [sender a@example.org] []"
    assert client.session.transaction.variables == {"acl_m1": "sender a@example.org"}


def test_condition_values(tmp_path):
    server = rcpt_server(tmp_path, """
  accept  condition = ${if eq{$local_part}{yes}{yes}{$local_part}}
  deny    message = false for $local_part
""")
    client = server.connect()
    client.start()
    for true in ("yes", "1", "-3", "true", "TRUE"):
        assert client.send(f"RCPT TO:<{true}@x.example>").startswith("250"), true
    for false in ("no", "0", "false"):
        assert client.send(f"RCPT TO:<{false}@x.example>") == f"550 false for {false}"
    assert client.send("RCPT TO:<maybe@x.example>") == TEMPORARY
    assert 'temporarily rejected RCPT <maybe@x.example>: invalid "condition" value "maybe"' in server.log()


def test_delay_control_and_logwrite(tmp_path):
    server = rcpt_server(tmp_path, """
  warn    delay = 1m30s
          control = no_pipelining
          logwrite = plain line for $local_part
          logwrite = :reject: to the reject log
  deny    local_parts = err
          control = error
  accept
""")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@x.example>").startswith("250")
    assert server.sleeps == [90.0]
    assert "plain line for u\n" in server.log()
    assert "to the reject log\n" in server.log("reject")
    assert client.send("RCPT TO:<err@x.example>") == TEMPORARY


def test_expansion_failure_is_a_temporary_error_with_the_reason(tmp_path):
    server = rcpt_server(tmp_path, "  deny condition = ${if eq{$nosuch}{x}}\n  accept\n")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@x.example>") == TEMPORARY
    assert ('H=(c.example) [127.0.0.2] F=<a@example.org> temporarily rejected RCPT <u@x.example>: '
            'failed to expand ACL string "${if eq{$nosuch}{x}}": unknown variable name "nosuch"') in server.log()


def test_lookup_defer_skips_a_warn_and_defers_a_deny(tmp_path):
    missing = tmp_path / "missing"
    server = rcpt_server(tmp_path, f"""
  warn    log_message = found
          condition = ${{lookup{{$local_part}}lsearch{{{missing}}}{{yes}}{{no}}}}
  deny    local_parts = strict
          condition = ${{lookup{{$local_part}}lsearch{{{missing}}}{{yes}}{{no}}}}
  accept
""")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@x.example>").startswith("250")
    assert 'Warning: ACL "warn" statement skipped: condition test deferred: failed to expand' in server.log()
    assert client.send("RCPT TO:<strict@x.example>") == TEMPORARY


def test_condition_not_allowed_in_a_stage_is_an_error_when_nested(tmp_path):
    server = Server(tmp_path, "mail:\n  accept acl = domainly\ndomainly:\n  accept domains = x\n",
                    "acl_smtp_mail = mail")
    client = server.connect()
    client.send("EHLO c.example")
    assert client.send("MAIL FROM:<a@example.org>") == TEMPORARY
    assert "cannot test domains condition in MAIL ACL" in server.log()


def test_option_forms_literal_and_expanded(tmp_path):
    server = Server(tmp_path, "mail_ok:\n  accept\nmail_no:\n  deny message = no mail from $sender_address\n",
                    "acl_smtp_helo = deny\n"
                    "acl_smtp_mail = ${if eq{$sender_address_domain}{good.example}{mail_ok}{mail_no}}\n"
                    "acl_smtp_predata = ${if eq{1}{2}{x}fail}")
    client = server.connect()
    assert client.send("EHLO c.example") == "550 Administrative prohibition"
    assert "rejected EHLO or HELO c.example" in server.log("reject")
    other = Server(tmp_path, "mail_ok:\n  accept\nmail_no:\n  deny message = no mail from $sender_address\n",
                   "acl_smtp_mail = ${if eq{$sender_address_domain}{good.example}{mail_ok}{mail_no}}\n"
                   "acl_smtp_predata = ${if eq{1}{2}{x}fail}")
    client = other.connect()
    client.send("EHLO c.example")
    assert client.send("MAIL FROM:<a@bad.example>") == "550 no mail from a@bad.example"
    assert client.send("MAIL FROM:<a@good.example>").startswith("250")
    assert client.send("RCPT TO:<u@localhost>").startswith("250")
    assert client.send("DATA").startswith("354")


def test_unset_rcpt_acl_accepts_local_domains_only(tmp_path):
    server = Server(tmp_path, "", "")
    client = server.connect()
    client.start()
    assert client.send("RCPT TO:<u@localhost>").startswith("250")
    assert client.send("RCPT TO:<u@relay.example>") == "550 relay not permitted"
    assert "rejected RCPT <u@relay.example>: relay not permitted" in server.log("reject")


def test_long_messages_are_split_as_exim_does():
    text = "This is a deliberately long message: it has to be wrapped because it exceeds seventy five characters"
    assert split_message(text) == ("This is a deliberately long message:\nit has to be wrapped because it "
                                   "exceeds seventy five characters")
    assert split_message("short") == "short"


# --------------------------------------------------------------------------
# ratelimit


CHAPTER = "\n" + CHAPTER_CONNECT_ACL


def test_chapter_example_defers_the_sixth_connection(tmp_path):
    server = Server(tmp_path, CHAPTER, "LIMIT = 5\nacl_smtp_connect = acl_check_connect")
    verdicts = [server.connect().connect() for _ in range(7)]
    assert [v.action for v in verdicts] == ["accept"] * 5 + ["defer"] * 2
    assert verdicts[5].message == "Too many connections from this IP right now"
    assert server.connect("127.0.0.3").connect().accepted
    assert server.store.get("5s/per_conn/127.0.0.3").rate == 1.0


def test_per_conn_counts_once_per_connection_and_sets_variables(tmp_path):
    server = Server(tmp_path, """
connect:
  accept  ratelimit = 2 / 1h / per_conn / strict
  accept
helo:
  deny    ratelimit = 2 / 1h / per_conn / strict
          message = rate $sender_rate limit $sender_rate_limit per $sender_rate_period
  accept
""", "acl_smtp_connect = connect\nacl_smtp_helo = helo")
    for _ in range(2):
        client = server.connect()
        assert client.connect().accepted
        assert client.send("EHLO a").startswith("250")
        assert client.send("EHLO b").startswith("250")
    third = server.connect()
    assert third.connect().accepted
    assert third.send("EHLO c") == "550 rate 3.0 limit 2 per 1h"
    assert 2.9 < server.store.get("1h/per_conn/127.0.0.2").rate < 3.0


@pytest.mark.parametrize("mode, stored", [("leaky", (0.9, 2.0)), ("strict", (3.9, 4.0))])
def test_leaky_records_only_what_it_lets_through(tmp_path, mode, stored):
    server = Server(tmp_path, f"connect:\n  deny ratelimit = 2 / 1h / per_conn / {mode}\n  accept\n",
                    "acl_smtp_connect = connect")
    assert [server.connect().connect().action for _ in range(4)] == ["accept", "accept", "deny", "deny"]
    assert stored[0] < server.store.get("1h/per_conn/127.0.0.2").rate < stored[1]


def test_limit_that_expands_to_nothing_is_zero(tmp_path):
    limits = tmp_path / "limits"
    limits.write_text("127.0.0.2: 2\n")
    server = Server(tmp_path, CHAPTER, f"LIMIT = ${{lookup{{$sender_host_address}}iplsearch{{{limits}}}}}\n"
                                       "acl_smtp_connect = acl_check_connect")
    assert [server.connect().connect().action for _ in range(3)] == ["accept", "accept", "defer"]
    unlisted = server.connect("127.0.0.9").connect()
    assert (unlisted.action, unlisted.message) == ("defer", "Too many connections from this IP right now")


def test_missing_limits_file_defers_with_the_lookup_error(tmp_path):
    server = Server(tmp_path, CHAPTER, f"LIMIT = ${{lookup{{$sender_host_address}}iplsearch{{{tmp_path}/none}}}}\n"
                                       "acl_smtp_connect = acl_check_connect")
    verdict = server.connect().connect()
    assert (verdict.action, verdict.message) == ("defer", "")
    assert "gave DEFER" in verdict.log_message


def test_bad_ratelimit_after_expansion_is_an_error(tmp_path):
    server = Server(tmp_path, CHAPTER, "LIMIT = ${if eq{1}{1}{lots}}\nacl_smtp_connect = acl_check_connect")
    verdict = server.connect().connect()
    assert verdict.action == "defer" and verdict.message == ""
    assert verdict.log_message == 'error in arguments to "ratelimit" condition: "lots" is not a positive number'


# --------------------------------------------------------------------------
# Configuration errors name FILE:LINE


def test_unknown_verb(tmp_path):
    with pytest.raises(ConfigError) as error:
        Server(tmp_path, "acl_check_rcpt:\n  allow hosts = *\n", "acl_smtp_rcpt = acl_check_rcpt")
    assert str(error.value) == f'{tmp_path}/mta.conf:10: unknown ACL verb "allow" in "allow hosts = *"'


@pytest.mark.parametrize("body, message", [
    ("  allow hosts = *", 'unknown ACL condition/modifier in "allow hosts = *"'),
    ("  accept hostz = *", 'unknown ACL condition/modifier in "accept hostz = *"'),
    ("  require verify = sender", 'ACL condition/modifier "verify" is not supported by mta-server'),
    ("  accept !message = x", 'ACL error: negation is not allowed with "message"'),
    ("  accept hosts *", '"=" missing after ACL "hosts" condition'),
    ("  accept set acl_x = 1", 'invalid variable name after "set"'),
    ("  accept hosts = 10.0.0.0/33", 'malformed IP address or network "10.0.0.0/33"'),
    ("  accept condition = ${frobnicate{x}}", 'unknown expansion item "frobnicate"'),
    ("  accept acl = nowhere", 'unknown ACL verb "nowhere"'),
    ("  accept ratelimit = 5 / 5 / per_conn", '"5" is not a time value'),
    ("  accept delay = 30", '"30" is not a time value'),
    ("  accept control = freeze", 'unsupported or unknown control "freeze"'),
    ("  !accept", 'malformed ACL line "!accept"'),
])
def test_configuration_errors(tmp_path, body, message):
    with pytest.raises(ConfigError) as error:
        Server(tmp_path, "acl_check_rcpt:\n  warn\n" + body + "\n", "acl_smtp_rcpt = acl_check_rcpt")
    assert message in str(error.value)
    assert str(error.value).startswith(f"{tmp_path}/mta.conf:11: ")


def test_stage_checks_for_the_stage_acl(tmp_path):
    with pytest.raises(ConfigError) as error:
        Server(tmp_path, "connect:\n  accept domains = x\n", "acl_smtp_connect = connect")
    assert "mta.conf:10: cannot test domains condition in connection ACL" in str(error.value)
    with pytest.raises(ConfigError) as error:
        Server(tmp_path, "connect:\n  accept ratelimit = 1 / 1h / per_rcpt / strict\n",
               "acl_smtp_connect = connect")
    assert '"per_rcpt" must not have /leaky or /strict option' in str(error.value)

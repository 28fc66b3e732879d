"""The configuration reader: Exim's syntax and our checks, FILE:LINE errors."""
import os
import subprocess
import sys

import pytest

from harness import REPO
from mta.config import load_config
from mta.configfile import ConfigError


def write(tmp_path, text, name="mta.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_macros_continuations_and_comments(tmp_path):
    path = write(tmp_path, """
# a comment
LIMIT = 5
PORTS = 2525 : \\
        2526
daemon_smtp_ports = PORTS
message_size_limit = LIMIT\\
M
  # an indented comment
smtp_banner = NOLIMIT $primary_hostname # not a comment
spool_directory = spool
""")
    config = load_config(path)
    assert config.daemon_smtp_ports == (2525, 2526)
    assert config.message_size_limit == 5 * 1024 * 1024
    assert config.smtp_banner == "NOLIMIT $primary_hostname # not a comment"
    assert config.spool_directory == str(tmp_path / "spool")
    assert config.macros["LIMIT"] == "5"


def test_include_and_sections(tmp_path):
    write(tmp_path, "hostlist relays = <; 127.0.0.1 ; ::1\n", "lists.conf")
    path = write(tmp_path, """
.include lists.conf
domainlist local_domains = localhost : @
begin acl
acl_check_rcpt:
  accept domains = +local_domains
  deny   message = relay not permitted
begin routers
local_user:
  driver = accept
begin retry
*  *  F,2h,15m
""")
    config = load_config(path)
    assert config.named_lists["hostlist"]["relays"][0] == "<; 127.0.0.1 ; ::1"
    assert [line.text for line in config.acls["acl_check_rcpt"].body] == [
        "accept domains = +local_domains", "deny   message = relay not permitted"]
    assert config.routers[0].name == "local_user"
    assert [line.text for line in config.retry_rules] == ["*  *  F,2h,15m"]
    assert str(tmp_path / "lists.conf") in config.files


@pytest.mark.parametrize("text, line, message", [
    ("no_such_option = 1\n", 1, 'main option "no_such_option" unknown'),
    ("\n\nmessage_size_limit = lots\n", 3, "is not an integer"),
    ("smtp_receive_timeout = 5 minutes\n", 1, "not a time interval"),
    ("daemon_smtp_ports = 25\ndaemon_smtp_ports = 26\n", 2, "set for the second time"),
    ("log_selector = +nonsense\n", 1, 'unknown log_selector item "+nonsense"'),
    ("begin nowhere\n", 1, 'unknown section "begin nowhere"'),
    ("hostlist bad = 300.1.2.3/8\n", 1, "hostlist bad"),
    ("acl_smtp_rcpt = missing_acl\n", 1, 'no ACL named "missing_acl"'),
    (".include nothere.conf\n", 1, "no such file"),
    ("smtp_worker_cpu_affinity = maybe\n", 1, '"maybe" is not true, false, yes or no'),
    ("no_smtp_worker_cpu_affinity = true\n", 1, '"no_smtp_worker_cpu_affinity" takes no value'),
    ("no_smtp_workers\n", 1, '"smtp_workers" is not a boolean option'),
    ("smtp_workers\n", 1, '"smtp_workers" needs a value'),
    ("smtp_worker_cpu_affinity\nno_smtp_worker_cpu_affinity\n", 2, "set for the second time"),
])
def test_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.filename == path
    assert caught.value.line == line
    assert message in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("", True),
    ("smtp_worker_cpu_affinity\n", True),
    ("smtp_worker_cpu_affinity = no\n", False),
    ("smtp_worker_cpu_affinity = True\n", True),
    ("no_smtp_worker_cpu_affinity\n", False),
    ("not_smtp_worker_cpu_affinity\n", False),
])
def test_boolean_options_take_exims_spellings(tmp_path, text, expected):
    assert load_config(write(tmp_path, text)).smtp_worker_cpu_affinity is expected


def test_check_config_command(tmp_path):
    good = write(tmp_path, "spool_directory = spool\n", "good.conf")
    bad = write(tmp_path, "spool_directory = spool\nsmtp_accept_max = -3\n", "bad.conf")
    run = lambda path: subprocess.run([sys.executable, "-m", "workers.cli", "check-config", "-C", path],
                                      cwd=REPO, capture_output=True, text=True)
    ok = run(good)
    assert ok.returncode == 0, ok.stderr
    failed = run(bad)
    assert failed.returncode != 0
    assert f"{bad}:2:" in failed.stderr and "smtp_accept_max" in failed.stderr


def test_embedded_default_config_is_valid():
    config = load_config(os.path.join(REPO, "etc", "mta.conf"))
    assert config.daemon_smtp_ports == (2525,)
    assert config.local_interfaces == ("127.0.0.1",)
    assert config.spool_directory == os.path.join(REPO, "var", "spool")

"""The pure SMTP command parser."""
import pytest
from hypothesis import given, strategies as st

from mta import smtp_commands as cmds
from mta.smtp_commands import SmtpSyntaxError


def test_split_command():
    assert cmds.split_command(b"mail FROM:<a@b>") == cmds.Command("MAIL", "FROM:<a@b>")
    assert cmds.split_command(b"  QUIT  ") == cmds.Command("QUIT", "")
    assert cmds.split_command(b"\xff\x00junk").verb not in cmds.VERBS


@pytest.mark.parametrize("argument, address, params", [
    ("FROM:<a@b.c>", "a@b.c", {}),
    ("FROM: <a@b.c> SIZE=100 BODY=8BITMIME", "a@b.c", {"SIZE": "100", "BODY": "8BITMIME"}),
    ("FROM:<>", "", {}),
    ("from:a@b.c", "a@b.c", {}),
    ("FROM:<@relay.example:a@b.c>", "@relay.example:a@b.c", {}),
])
def test_parse_path(argument, address, params):
    assert cmds.parse_path(argument, "FROM") == (address, params)


@pytest.mark.parametrize("argument", ["TO:<a@b>", "FROM:<a@b@c>", "FROM:<a\x01@b>", "FROM:<a@b> SIZE=x=y", "FROM"])
def test_parse_path_errors(argument):
    with pytest.raises(SmtpSyntaxError) as caught:
        cmds.parse_path(argument, "FROM")
    assert caught.value.reply[:3] in ("501", "555")


def test_size_and_body():
    assert cmds.parse_size_parameter({"SIZE": "123"}) == 123
    assert cmds.parse_size_parameter({}) is None
    with pytest.raises(SmtpSyntaxError):
        cmds.parse_size_parameter({"SIZE": "-1"})
    with pytest.raises(SmtpSyntaxError):
        cmds.parse_body_parameter({"BODY": "BINARYMIME"})


@given(st.binary(max_size=200))
def test_parser_never_raises_foreign_exceptions(line):
    command = cmds.split_command(line)
    for keyword in ("FROM", "TO"):
        try:
            cmds.parse_path(command.argument, keyword)
        except SmtpSyntaxError as exc:
            assert exc.reply[:1] == "5"

"""Retry rules: parsing, matching and the retry arithmetic (pure)."""
import pytest

from mta.configfile import ConfigError, Line
from mta.retry import (
    HostRetryTable, RecipientRetry, RetryRuleError, default_rule, error_matches, find_retry_rule,
    is_due, next_retry_time, pack_retry_state, parse_retry_rule, parse_retry_rules, record_deferral,
    unpack_retry_state,
)

H = 3600.0
M = 60.0


def test_parse_exim_default_rule():
    rule = parse_retry_rule("*   *   F,2h,15m; G,16h,1h,1.5; F,4d,6h")
    assert [(s.kind, s.cutoff, s.interval, s.multiplier) for s in rule.steps] == [
        ("F", 2 * H, 15 * M, 1.0), ("G", 16 * H, H, 1.5), ("F", 96 * H, 6 * H, 1.0)]
    assert rule.timeout == 96 * H


@pytest.mark.parametrize("text, message", [
    ("*", "needs a pattern and an error"),
    ("* nonsense F,2h,15m", 'unknown error type "nonsense"'),
    ("* * X,2h,15m", "start with F, G or H"),
    ("* * F,2h", "F takes 2 values"),
    ("* * G,2h,1h", "G takes 3 values"),
    ("* * F,2x,15m", "not a time interval"),
    ("* * G,2h,1h,0.5", "multiplier at least 1"),
    ("* * senders=a@b F,1h,1m", "senders= in retry rules is not supported"),
])
def test_bad_rules_are_rejected(text, message):
    with pytest.raises(RetryRuleError, match=message):
        parse_retry_rule(text)


def test_bad_rule_names_its_line():
    with pytest.raises(ConfigError) as info:
        parse_retry_rules([Line("* * F,1h,1m", "/etc/x.conf", 7), Line("* * Q,1h", "/etc/x.conf", 8)])
    assert str(info.value).startswith("/etc/x.conf:8: ")


def test_rule_without_parameters_means_no_retries():
    rule = parse_retry_rule("*.example.com *")
    assert rule.steps == ()
    assert next_retry_time(rule, 100.0, 100.0, 100.0) is None


@pytest.mark.parametrize("pattern, error, expected", [
    ("*", "rcpt_451", True),
    ("refused", "refused_MX", True),
    ("refused", "refused_A", True),
    ("refused_MX", "refused_A", False),
    ("timeout", "timeout_connect_A", True),
    ("timeout_connect", "timeout_A", False),
    ("timeout_A", "timeout_connect_A", True),
    ("timeout_MX", "timeout_connect_A", False),
    ("rcpt_4xx", "rcpt_451", True),
    ("rcpt_45x", "rcpt_451", True),
    ("rcpt_45x", "rcpt_421", False),
    ("rcpt_4xx", "mail_451", False),
    ("data_452", "data_452", True),
    ("lost_connection", "lost_connection", True),
    ("refused", "socks", False),
])
def test_error_matching(pattern, error, expected):
    assert error_matches(pattern, error) is expected


def test_first_matching_rule_wins_and_patterns_match_addresses():
    rules = parse_retry_rules([
        Line("*.slow.example * F,1h,10m", "f", 1),
        Line("bob@example.org rcpt_4xx F,2h,20m", "f", 2),
        Line("* refused F,3h,30m", "f", 3),
        Line("* * F,4h,40m", "f", 4),
    ])
    assert find_retry_rule(rules, "x@mx.slow.example", "rcpt_451").timeout == 1 * H
    assert find_retry_rule(rules, "bob@example.org", "rcpt_450").timeout == 2 * H
    assert find_retry_rule(rules, "bob@example.org", "refused_A").timeout == 3 * H
    assert find_retry_rule(rules, "eve@example.org", "data_451").timeout == 4 * H


def test_no_rules_means_exims_default_and_no_match_means_none():
    assert find_retry_rule([], "a@b", "rcpt_451").timeout == default_rule().timeout == 96 * H
    rules = parse_retry_rules([Line("example.com * F,1h,10m", "f", 1)])
    assert find_retry_rule(rules, "a@other.org", "rcpt_451") is None


def test_fixed_geometric_and_time_out():
    rule = default_rule()
    first = 1000.0
    assert next_retry_time(rule, first, first, first) == first + 15 * M
    now = first + 3 * H   # in the G step; last try 15 minutes ago: max(1h, 15m*1.5)
    assert next_retry_time(rule, first, now - 15 * M, now) == now + H
    now = first + 10 * H  # last try 2h ago: 2h*1.5 = 3h
    assert next_retry_time(rule, first, now - 2 * H, now) == now + 3 * H
    now = first + 20 * H
    assert next_retry_time(rule, first, now - 3 * H, now) == now + 6 * H
    assert next_retry_time(rule, first, first + 95 * H, first + 96 * H) is None


def test_h_step_is_randomised_between_half_and_all_of_the_growth():
    rule = parse_retry_rule("* * H,1d,1h,2")
    low = next_retry_time(rule, 0.0, 0.0 + 1000, 0.0 + 1000 + 2 * H, rng=lambda: 0.0)
    high = next_retry_time(rule, 0.0, 0.0 + 1000, 0.0 + 1000 + 2 * H, rng=lambda: 1.0)
    now = 1000 + 2 * H
    assert low == now + H + (4 * H - H) / 2
    assert high == now + 4 * H


def test_record_deferral_keeps_first_failure_and_times_out():
    rule = parse_retry_rule("* * F,1h,10m")
    state = record_deferral(None, rule, 100.0, "451 later")
    assert state == RecipientRetry(100.0, 100.0, 100.0 + 10 * M, "451 later")
    state = record_deferral(state, rule, 200.0, "451 again", not_before=5000.0)
    assert (state.first_failure, state.last_try, state.next_try) == (100.0, 200.0, 5000.0)
    assert record_deferral(state, rule, 100.0 + H + 1, "451") is None
    assert record_deferral(None, None, 100.0, "no rule matched") is None


def test_state_round_trip_and_due():
    state = {"a@x": RecipientRetry(1.0, 2.0, 50.0, "e"), "b@x": RecipientRetry(1.0, 2.0, 80.0, "f")}
    assert unpack_retry_state(pack_retry_state(state)) == state
    assert unpack_retry_state(b"garbage\xff") == {}
    assert not is_due(state, ["a@x", "b@x"], 40.0)
    assert is_due(state, ["a@x", "b@x"], 60.0)
    assert is_due(state, ["c@x"], 0.0)


def test_host_retry_table():
    table = HostRetryTable()
    rule = parse_retry_rule("* * F,1h,5m")
    table.failed("127.0.0.1:25", rule, 1000.0)
    assert table.waiting_until("127.0.0.1:25", 1001.0) == 1000.0 + 5 * M
    assert table.waiting_until("127.0.0.1:25", 1000.0 + 5 * M) is None
    assert table.waiting_until("127.0.0.2:25", 1001.0) is None
    table.succeeded("127.0.0.1:25")
    assert len(table) == 0

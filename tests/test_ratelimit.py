"""Exim ratelimit semantics: parsing, EWMA arithmetic, update modes, caching."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.ratelimit import (
    BLOOM_MIN_BYTES, ConnectionCache, DictRateStore, RateRecord, RatelimitError,
    bloom_add, bloom_size, check, decode_bloom, evaluate, event_count, event_unique,
    format_rate, parse_ratelimit, parse_time_interval, record_key, split_exim_list,
    update_rate,
)


# ---- parsing -------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("5s", 5), ("1h", 3600), ("2h30m", 9000), ("1d", 86400), ("1w", 604800),
    ("1w2d3h4m5s", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5), ("1s1w", 604801),
    ("0s", 0),
])
def test_time_interval(text, seconds):
    assert parse_time_interval(text) == seconds


@pytest.mark.parametrize("text", ["90", "", "1x", "h", "1h30", "-1s", "1.5h", "1H", "99999999999w",
                                  "40000w", "\u0661s"])
def test_time_interval_errors(text):
    with pytest.raises(ValueError):
        parse_time_interval(text)


def test_exim_list_splitting():
    assert split_exim_list(" 5 / 5s /per_conn/ strict ") == ["5", "5s", "per_conn", "strict"]
    assert split_exim_list("1/1h/a//b") == ["1", "1h", "a/b"]
    assert split_exim_list("1/1h/") == ["1", "1h"]
    assert split_exim_list("1/ /x") == ["1", "", "x"]
    assert split_exim_list("   ") == []


def test_chapter_example():
    spec = parse_ratelimit("5 / 5s / per_conn / strict", "connect")
    assert (spec.limit, spec.period, spec.per, spec.mode, spec.scope) == \
        (5.0, 5.0, "per_conn", "strict", "conn")
    assert record_key(spec, "192.0.2.1") == "5s/per_conn/192.0.2.1"


def test_defaults_are_per_mail_leaky_count_one():
    spec = parse_ratelimit("100/1h", "rcpt")
    assert (spec.per, spec.mode, spec.count, spec.key) == ("per_mail", "leaky", 1.0, None)
    assert record_key(spec, "") == "1h/per_mail/"


def test_explicit_key_with_slashes_and_period_text_kept():
    spec = parse_ratelimit("100/60m/per_rcpt/leaky/a@b.example/x", "rcpt")
    assert record_key(spec, "192.0.2.1") == "60m/per_rcpt/a@b.example/x"
    assert spec.period == 3600


@pytest.mark.parametrize("text, limit", [
    ("5k/1h", 5120.0), ("1.5m/1d", 1.5 * 1024 * 1024), ("2G/1d", 2.0 * 1024 ** 3),
    ("0/1h", 0.0), ("inf/1h", math.inf), ("/1h", 0.0),
])
def test_limit_numbers(text, limit):
    assert parse_ratelimit(text, "connect").limit == limit


@pytest.mark.parametrize("text, reason", [
    ("", "sender rate limit not set"),
    ("-1/1h", '"-1" is not a positive number'),
    ("5x/1h", '"5x" is not a positive number'),
    ("nan/1h", '"nan" is not a positive number'),
    ("5", "sender rate period not set"),
    ("5/5", '"5" is not a time value'),
    ("5/0s", '"0s" is not a time value'),
    ("5/1h/count=-2", '"count=-2" is not a positive number'),
    ("5/1h/count=2x", '"count=2x" is not a positive number'),
    ("5/1h/per_conn/per_mail", "conflicting per_* options"),
    ("5/1h/per_conn/per_conn", "conflicting per_* options"),
    ("5/1h/strict/leaky", "conflicting update modes"),
    ("5/1h/readonly/strict", "conflicting update modes"),
    ("5/1h/per_rcpt/strict", '"per_rcpt" must not have /leaky or /strict option, '
                             "or cannot be used in connection ACL"),
])
def test_parse_errors(text, reason):
    with pytest.raises(RatelimitError) as info:
        parse_ratelimit(text, "connect")
    assert info.value.reason == reason
    assert str(info.value) == f'error in arguments to "ratelimit" condition: {reason}'


def test_unknown_acl_is_a_programming_error():
    with pytest.raises(ValueError):
        parse_ratelimit("5/1h", "nowhere")


def test_options_are_case_insensitive_and_repeatable():
    spec = parse_ratelimit("5/1h/STRICT/strict/Per_Cmd", "helo")
    assert (spec.mode, spec.per) == ("strict", "per_cmd")


def test_wrong_acl_makes_readonly_unless_leaky_or_strict_given():
    spec = parse_ratelimit("5/1h/per_rcpt", "connect")
    assert (spec.mode, spec.count, spec.scope) == ("readonly", 0.0, "cmd")
    spec = parse_ratelimit("5/1h/per_mail/strict/noupdate", "helo")
    assert (spec.mode, spec.noupdate) == ("readonly", True)


def test_noupdate_means_readonly_with_no_count():
    spec = parse_ratelimit("5/1h/per_conn/strict/noupdate", "connect")
    assert (spec.mode, spec.noupdate, spec.count) == ("readonly", True, 0.0)


def test_per_rcpt_counts_one_in_rcpt_and_all_recipients_later():
    in_rcpt = parse_ratelimit("5/1h/per_rcpt", "rcpt")
    assert (in_rcpt.scope, event_count(in_rcpt, recipients_count=7)) == ("cmd", 1.0)
    in_data = parse_ratelimit("5/1h/per_rcpt", "data")
    assert (in_data.per, in_data.scope) == ("per_rcpt", "mail")
    assert event_count(in_data, recipients_count=7) == 7.0


def test_count_option_order_matters_as_in_exim():
    assert event_count(parse_ratelimit("5/1h/count=3/per_rcpt", "data"),
                       recipients_count=7) == 7.0
    assert event_count(parse_ratelimit("5/1h/per_rcpt/count=3", "data"),
                       recipients_count=7) == 3.0


def test_per_byte_is_filed_under_per_mail_like_exim():
    spec = parse_ratelimit("1m/1d/per_byte", "data")
    assert record_key(spec, "h") == "1d/per_mail/h"
    assert event_count(spec, message_size=12345) == 12345.0
    assert event_count(spec, message_size=-1) == 0.0


def test_per_addr_uses_the_recipient_and_unique_key():
    spec = parse_ratelimit("10/1h/per_addr", "rcpt")
    assert record_key(spec, "192.0.2.1") == "1h/per_rcpt/unique/192.0.2.1"
    assert event_unique(spec, recipient="u@d.example") == "u@d.example"
    with pytest.raises(ValueError):
        event_unique(spec)
    elsewhere = parse_ratelimit("10/1h/per_addr", "data")
    assert (elsewhere.mode, elsewhere.unique) == ("readonly", "*")


def test_format_rate():
    assert format_rate(4.85) == "4.8"   # 4.85 is 4.8499999... in binary, as in C
    assert format_rate(0) == "0.0"
    assert format_rate(12.345) == "12.3"


# ---- arithmetic ----------------------------------------------------------

def test_first_sighting_rate_is_count():
    assert update_rate(None, 100.0, 60.0, 3.0) == RateRecord(100.0, 3.0)


def test_ewma_hand_computed():
    # interval 2, period 4: a = e^-0.5; (1-a)*1/0.5 + a*4
    assert update_rate(RateRecord(0.0, 4.0), 2.0, 4.0, 1.0).rate == \
        pytest.approx(3.2130613194, abs=1e-9)


def test_decay_hand_computed():
    # interval 20, period 10: a = e^-2; (1-a)*1/2 + a*10
    assert update_rate(RateRecord(0.0, 10.0), 20.0, 10.0, 1.0).rate == \
        pytest.approx(1.7856851904, abs=1e-9)


def test_isolated_event_after_silence_counts_as_count():
    assert update_rate(RateRecord(0.0, 0.5), 1e6, 10.0, 2.0).rate == 2.0


def test_clock_going_back_clamps_interval_and_moves_time():
    record = update_rate(RateRecord(100.0, 3.0), 99.0, 10.0, 1.0)
    assert record.time == 99.0
    assert record.rate == pytest.approx(4.0, abs=1e-6)


def test_burst_of_limit_events_reaches_limit():
    spec = parse_ratelimit("5/1h/strict", "connect")
    prev, overs = None, []
    for _ in range(6):
        result, prev = evaluate(spec, prev, 1000.0, 1.0)
        overs.append(result.over_limit)
    assert overs == [False, False, False, False, True, True]


def _burst(spec, events, now=0.0):
    prev = None
    for _ in range(events):
        _, new = evaluate(spec, prev, now, 1.0)
        prev = new or prev
    return prev


def test_leaky_stops_growing_strict_keeps_punishing():
    leaky = parse_ratelimit("3/10s/leaky", "connect")
    strict = parse_ratelimit("3/10s/strict", "connect")
    leaky_rec, strict_rec = _burst(leaky, 10), _burst(strict, 10)
    assert leaky_rec.rate < 3.0
    assert strict_rec.rate == pytest.approx(10.0, rel=1e-6)
    # five seconds later: a = e^-0.5, the leaky sender is let through
    later_leaky, _ = evaluate(leaky, leaky_rec, 5.0, 1.0)
    later_strict, _ = evaluate(strict, strict_rec, 5.0, 1.0)
    assert later_leaky.rate == pytest.approx(0.78694 + 0.60653 * leaky_rec.rate, abs=1e-4)
    assert not later_leaky.over_limit
    assert later_strict.over_limit and later_strict.rate == pytest.approx(6.852, abs=1e-3)


def test_leaky_over_limit_is_not_stored():
    spec = parse_ratelimit("1/1h", "connect")
    result, record = evaluate(spec, RateRecord(0.0, 5.0), 1.0, 1.0)
    assert result.over_limit and not result.store and record is None


def test_readonly_counts_nothing_and_stores_nothing():
    spec = parse_ratelimit("2/10s/readonly", "connect")
    result, record = evaluate(spec, RateRecord(0.0, 4.0), 10.0, 5.0)
    assert record is None and not result.store
    assert result.rate == pytest.approx(math.exp(-1) * 4.0)
    first, _ = evaluate(spec, None, 10.0, 5.0)
    assert first.rate == 0.0 and not first.over_limit


def test_zero_limit_blocks_everything():
    result, _ = evaluate(parse_ratelimit("0/1h/readonly", "connect"), None, 0.0, 1.0)
    assert result.over_limit


def test_count_option_scales_events():
    spec = parse_ratelimit("10/1h/count=2.5", "connect")
    result, record = evaluate(spec, None, 0.0, event_count(spec))
    assert result.rate == 2.5 and record.rate == 2.5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 50), st.floats(0, 20)), max_size=40),
       st.floats(0.5, 20))
def test_leaky_stored_rate_stays_below_limit(events, limit):
    spec = parse_ratelimit(f"{limit}/7s", "connect")
    prev = None
    for offset, count in events:
        now = (prev.time if prev else 0.0) + offset
        result, record = evaluate(spec, prev, now, count)
        assert math.isfinite(result.rate) and result.rate >= count
        if record is not None:
            assert record.rate < limit
            prev = record


# ---- unique events -------------------------------------------------------

def test_bloom_filter_sees_repeats():
    bloom = bytearray(bloom_size(10))
    assert len(bloom) == BLOOM_MIN_BYTES
    assert not bloom_add(bloom, "a@example.com")
    assert bloom_add(bloom, "a@example.com")
    assert not bloom_add(bloom, "b@example.com")
    assert bloom_size(1000) == 2000 and bloom_size(1000, cap=100) == 100


def test_per_addr_counts_each_recipient_once_per_period():
    spec = parse_ratelimit("10/1h/per_addr/strict", "rcpt")
    prev = None
    for now, rcpt in [(0, "a@x"), (1, "a@x"), (2, "b@x"), (3, "a@x")]:
        result, prev = evaluate(spec, prev, float(now), 1.0, rcpt)
    # two distinct recipients: after the burst the rate is the 2 events'
    assert 1.9 < prev.rate < 2.0 + 1e-3
    epoch, bloom = decode_bloom(prev.blob)
    assert epoch == 0 and len(bloom) == BLOOM_MIN_BYTES
    # within the period a repeat counts zero: the rate only decays
    repeat, _ = evaluate(spec, prev, 1803.0, 1.0, "a@x")
    assert repeat.rate == pytest.approx(math.exp(-0.5) * prev.rate)
    # after more than a period the filter is discarded: "a@x" counts again
    later, record = evaluate(spec, prev, 3601.5, 1.0, "a@x")
    assert decode_bloom(record.blob)[0] == 3601
    i_over_p = 3598.5 / 3600
    decay = math.exp(-i_over_p)
    assert later.rate == pytest.approx((1 - decay) / i_over_p + decay * prev.rate)


def test_damaged_bloom_blob_is_replaced():
    spec = parse_ratelimit("10/1h/unique=x/strict", "connect")
    _, record = evaluate(spec, RateRecord(0.0, 1.0, b"junk"), 1.0, 1.0)
    assert decode_bloom(record.blob) is not None


# ---- session caching through check() ---------------------------------------

def test_per_conn_counts_once_per_connection():
    store, cache = DictRateStore(), ConnectionCache()
    spec = parse_ratelimit("5/5s/per_conn/strict", "connect")
    cache.new_connection()
    check(store, cache, spec, default_key="192.0.2.1", now=0.0, count=1.0)
    again = check(store, cache, spec, default_key="192.0.2.1", now=0.0, count=1.0)
    assert again.rate == 1.0 and not again.store
    assert store.get("5s/per_conn/192.0.2.1").rate == 1.0
    cache.new_connection()
    check(store, cache, spec, default_key="192.0.2.1", now=0.0, count=1.0)
    assert store.get("5s/per_conn/192.0.2.1").rate == pytest.approx(2.0)


def test_cached_rate_is_compared_with_each_conditions_limit():
    store, cache = DictRateStore(), ConnectionCache()
    cache.new_connection()
    check(store, cache, parse_ratelimit("5/5s/per_conn", "connect"),
          default_key="h", now=0.0, count=1.0)
    tighter = check(store, cache, parse_ratelimit("1/5s/per_conn", "connect"),
                    default_key="h", now=0.0, count=1.0)
    assert tighter.over_limit and tighter.rate == 1.0


def test_per_cmd_counts_once_per_acl_run_and_per_mail_once_per_message():
    store, cache = DictRateStore(), ConnectionCache()
    per_cmd = parse_ratelimit("50/1h/per_cmd/strict", "rcpt")
    per_mail = parse_ratelimit("50/1h/per_mail/strict", "rcpt")
    cache.new_connection()
    for _ in range(3):
        cache.start_acl()
        for _ in range(2):
            check(store, cache, per_cmd, default_key="h", now=0.0, count=1.0)
            check(store, cache, per_mail, default_key="h", now=0.0, count=1.0)
    assert store.get("1h/per_cmd/h").rate == pytest.approx(3.0)
    assert store.get("1h/per_mail/h").rate == pytest.approx(1.0)
    cache.reset_message()
    cache.start_acl()
    check(store, cache, per_mail, default_key="h", now=0.0, count=1.0)
    assert store.get("1h/per_mail/h").rate == pytest.approx(2.0)


def test_check_caps_the_bloom_to_the_store():
    store, cache = DictRateStore(blob_size=30), ConnectionCache()
    spec = parse_ratelimit("1000/1h/per_addr/strict", "rcpt")
    cache.new_connection()
    check(store, cache, spec, default_key="h", now=0.0, count=1.0, unique="a@x")
    assert len(store.get("1h/per_rcpt/unique/h").blob) == 30

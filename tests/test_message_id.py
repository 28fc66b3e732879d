"""Exim-format message ids: layout, the parts they encode, uniqueness."""
from __future__ import annotations

from mta.message_id import BASE62, FRACTION_UNITS, MessageIdSource, is_message_id


def decode(digits: str) -> int:
    number = 0
    for digit in digits:
        number = number * 62 + BASE62.index(digit)
    return number


def test_an_id_encodes_time_pid_and_fraction():
    message_id = MessageIdSource(4242).next_id(1_700_000_000.5)
    assert is_message_id(message_id)
    seconds, pid, fraction = message_id.split("-")
    assert (len(seconds), len(pid), len(fraction)) == (6, 12, 4)
    assert decode(seconds) == 1_700_000_000
    assert decode(pid) == 4242
    assert decode(fraction) == FRACTION_UNITS // 2


def test_ids_are_unique_and_ordered_when_the_clock_stands_still_or_steps_back():
    source = MessageIdSource(7)
    ids = [source.next_id(1_700_000_000.0) for _ in range(1000)]
    ids += [source.next_id(1_699_999_999.0) for _ in range(10)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_the_fraction_carries_into_the_next_second():
    source = MessageIdSource(7)
    last_of_second = source.next_id(1_700_000_000 + (FRACTION_UNITS - 0.5) / FRACTION_UNITS)
    assert decode(last_of_second.split("-")[2]) == FRACTION_UNITS - 1
    carried = source.next_id(1_700_000_000.0)
    assert carried > last_of_second
    assert decode(carried.split("-")[0]) == 1_700_000_001
    assert decode(carried.split("-")[2]) == 0

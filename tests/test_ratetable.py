"""The shared ratelimit table: persistence, eviction, torn records, and
correctness with real concurrent processes and killed lock holders."""

import os
import signal
import struct
import time

import gevent
import pytest

from mta.ratelimit import ConnectionCache, check, evaluate, parse_ratelimit, update_rate
from shared.ratetable import (
    HEADER_SIZE, RateTable, RateTableBusy, RateTableFormatError, Record,
)

KEY_OFFSET, RATE_OFFSET = 30, 22   # within a record: key bytes, rate field


def _record_at(table, key):
    """Offset of the record holding ``key``, found by its bytes past the header."""
    return table._mm.find(key.encode(), HEADER_SIZE) - KEY_OFFSET


def _count(record):
    return Record(record.time + 1.0 if record else 1.0,
                  (record.rate if record else 0.0) + 1.0)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "ratelimit.table")


def test_update_get_and_fill(path):
    table = RateTable.create(path, 64)
    assert table.recreated is None
    assert table.get("a") is None
    assert table.update("a", lambda prev: None) is None
    assert table.get("a") is None
    table.update("a", _count)
    table.update("a", _count)
    table.update("b", lambda prev: Record(5.0, 0.5, b"xyz"))
    assert table.get("a") == Record(2.0, 2.0, b"")
    assert table.get("b") == Record(5.0, 0.5, b"xyz")
    assert table.fill() == (2, 64)
    assert sorted((item.key, item.rate) for item in table.items()) == [("a", 2.0), ("b", 0.5)]


def test_records_survive_reopen(path):
    table = RateTable.create(path, 64)
    table.update("5s/per_conn/192.0.2.1", lambda prev: Record(10.0, 3.5))
    table.close()
    again = RateTable.create(path, 64)
    assert again.recreated is None
    assert again.get("5s/per_conn/192.0.2.1") == Record(10.0, 3.5, b"")
    reader = RateTable.open(path)
    assert [item.key for item in reader.items()] == ["5s/per_conn/192.0.2.1"]
    assert reader.get("5s/per_conn/192.0.2.1").rate == 3.5


def test_empty_file_is_recreated(path):
    open(path, "wb").close()
    table = RateTable.create(path, 8)
    assert "shorter than a header" in table.recreated
    assert table.update("k", _count).rate == 1.0


def test_foreign_file_is_recreated_with_reason(path):
    with open(path, "wb") as handle:
        handle.write(b"this is not a table" * 10)
    table = RateTable.create(path, 64)
    assert "bad magic" in table.recreated
    table.update("k", _count)
    assert table.get("k").rate == 1.0
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(struct.pack("<I", 99))
    assert "format version 99" in RateTable.create(path, 64).recreated


def test_open_refuses_foreign_file(path):
    with open(path, "wb") as handle:
        handle.write(b"short")
    with pytest.raises(RateTableFormatError):
        RateTable.open(path)


def test_geometry_change_carries_records_over(path):
    table = RateTable.create(path, 50)
    for index in range(20):
        table.update(f"key{index}", lambda prev, i=index: Record(float(i), i * 1.5))
    table.close()
    bigger = RateTable.create(path, 500, blob_size=64)
    assert "carried over 20 of 20 records" in bigger.recreated
    assert all(bigger.get(f"key{i}") == Record(float(i), i * 1.5) for i in range(20))


def test_long_keys_are_stored_by_digest(path):
    table = RateTable.create(path, 64, key_max=64)
    first, second = "x" * 100 + "1", "x" * 100 + "2"
    table.update(first, lambda prev: Record(1.0, 1.0))
    table.update(second, lambda prev: Record(2.0, 2.0))
    assert table.get(first).rate == 1.0 and table.get(second).rate == 2.0
    shown = sorted(item.key for item in table.items())
    assert all(key.startswith("x" * 32 + "…#") and len(key) == 32 + 2 + 16 for key in shown)
    assert shown[0] != shown[1]


def test_oversized_blob_is_refused_without_damage(path):
    table = RateTable.create(path, 8, blob_size=4)
    table.update("k", lambda prev: Record(1.0, 1.0, b"abcd"))
    with pytest.raises(ValueError):
        table.update("k", lambda prev: Record(2.0, 2.0, b"abcde"))
    assert table.get("k") == Record(1.0, 1.0, b"abcd")


def test_full_window_evicts_the_stalest(path):
    table = RateTable.create(path, 1, probe=4)   # every key shares one window of 4
    for key, stamp in [("k0", 10.0), ("k1", 20.0), ("k2", 5.0), ("k3", 30.0)]:
        table.update(key, lambda prev, t=stamp: Record(t, 1.0))
    table.update("k4", lambda prev: Record(40.0, 1.0))
    assert table.get("k2") is None
    assert all(table.get(key) is not None for key in ["k0", "k1", "k3", "k4"])
    for index in range(100):
        table.update(f"more{index}", lambda prev, t=index: Record(100.0 + t, 1.0))
    assert table.get("more99") is not None and table.fill() == (4, 1)


def test_torn_and_corrupt_records_are_absent_and_reused(path):
    table = RateTable.create(path, 16)
    table.update("torn-record", lambda prev: Record(1.0, 7.0))
    table.update("corrupt-record", lambda prev: Record(1.0, 8.0))
    mm = table._mm
    torn_at = _record_at(table, "torn-record")
    struct.pack_into("<I", mm, torn_at, struct.unpack_from("<I", mm, torn_at)[0] | 1)
    corrupt_at = _record_at(table, "corrupt-record")
    struct.pack_into("<d", mm, corrupt_at + RATE_OFFSET, 99.0)   # CRC left stale
    assert table.get("torn-record") is None and table.get("corrupt-record") is None
    assert {item.key for item in table.items()} == set()
    seen = []
    table.update("torn-record", lambda prev: seen.append(prev) or Record(2.0, 1.0))
    assert seen == [None] and table.get("torn-record") == Record(2.0, 1.0, b"")


def test_sequence_number_wraps(path):
    table = RateTable.create(path, 16)
    table.update("wrapping-key", lambda prev: Record(1.0, 1.0))
    at = _record_at(table, "wrapping-key")
    struct.pack_into("<I", table._mm, at, 0xFFFFFFFE)
    table.update("wrapping-key", _count)
    assert struct.unpack_from("<I", table._mm, at)[0] == 0
    assert table.get("wrapping-key") == Record(2.0, 2.0, b"")


# ---- concurrency with real processes ----------------------------------------

def _run_children(count, work):
    """Fork ``count`` children that start together and run ``work(index)``."""
    start_read, start_write = os.pipe()
    pids = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(start_write)
                os.read(start_read, 1)
                work(index)
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    os.close(start_read)
    os.write(start_write, b"g" * count)
    os.close(start_write)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    assert statuses == [0] * count


def test_concurrent_processes_lose_no_update(path):
    # Room enough that no window of 8 ever holds more than 8 of the 55 keys:
    # an eviction (by design, in a full window) would lose a count.
    table = RateTable.create(path, 4096, probe=8)
    spec = parse_ratelimit("1000000/1d/per_cmd/strict", "rcpt")
    processes, per_process = 4, 1500

    def hammer(index):
        for step in range(per_process):
            table.update("hot", lambda prev: evaluate(spec, prev, 1000.0, 1.0)[1])
            table.update(f"own{index}", _count)
            table.update(f"shared{step % 50}", _count)

    _run_children(processes, hammer)
    expected = None
    for _ in range(processes * per_process):
        expected = update_rate(expected, 1000.0, spec.period, 1.0)
    assert table.get("hot").rate == expected.rate
    assert all(table.get(f"own{i}").rate == per_process for i in range(processes))
    assert sum(table.get(f"shared{i}").rate for i in range(50)) == processes * per_process


def test_check_through_the_table_in_several_processes(path):
    table = RateTable.create(path, 1024)
    spec = parse_ratelimit("5/5s/per_conn/strict", "connect")

    def connections(index):
        cache = ConnectionCache()
        for _ in range(100):
            cache.new_connection()
            check(table, cache, spec, default_key="192.0.2.9", now=50.0, count=1.0)

    _run_children(3, connections)
    expected = None
    for _ in range(300):
        expected = update_rate(expected, 50.0, 5.0, 1.0)
    assert table.get("5s/per_conn/192.0.2.9").rate == expected.rate


def _child_holding_lock(table, key):
    """Fork a child that takes ``key``'s lock (inside update) and sleeps."""
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        def hold(prev):
            os.write(ready_write, b"x")
            time.sleep(60)
        try:
            table.update(key, hold)
        finally:
            os._exit(1)
    os.close(ready_write)
    assert os.read(ready_read, 1) == b"x"
    os.close(ready_read)
    return pid


def test_killed_lock_holder_does_not_wedge_others(path):
    table = RateTable.create(path, 64, lock_timeout=10.0)
    pid = _child_holding_lock(table, "victim")
    ticks = []

    def ticker():
        while True:
            ticks.append(1)
            gevent.sleep(0.005)

    ticking = gevent.spawn(ticker)
    waiter = gevent.spawn(table.update, "victim", _count)
    gevent.sleep(0.2)
    assert not waiter.ready()          # the lock really is held ...
    assert len(ticks) > 10             # ... and the hub was not blocked
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert waiter.get(timeout=2).rate == 1.0
    ticking.kill()
    assert table.get("victim").rate == 1.0


def test_live_stuck_holder_times_out(path):
    table = RateTable.create(path, 64, lock_timeout=0.2)
    pid = _child_holding_lock(table, "stuck")
    try:
        started = time.monotonic()
        with pytest.raises(RateTableBusy):
            table.update("stuck", _count)
        assert 0.2 <= time.monotonic() - started < 2.0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert table.update("stuck", _count).rate == 1.0

"""Shared connection counts: per-worker slots, readers in other processes,
dead workers cleared by the master, overflow and compaction."""

import collections
import os
import signal
import struct
import time

import gevent
import pytest

from shared.conncount import ConnCounts, SlotStats


def test_add_remove_in_one_slot():
    counts = ConnCounts.create(4, 16)
    slot = counts.slot(2)
    slot.add("h:192.0.2.1", "p:10.0.0.1")
    slot.add("h:192.0.2.1", "p:10.0.0.1")
    slot.add(b"h:192.0.2.2")
    assert counts.total() == 3
    assert counts.count("h:192.0.2.1") == 2
    assert counts.count(b"h:192.0.2.2") == 1
    assert counts.count("p:10.0.0.1") == 2
    assert counts.count("h:10.0.0.1") == 0
    slot.remove("h:192.0.2.1", "p:10.0.0.1")
    assert (counts.total(), counts.count("h:192.0.2.1"), counts.count("p:10.0.0.1")) == (2, 1, 1)
    assert counts.snapshot()[2] == SlotStats(total=2, keys=3, overflow=0)


def test_a_counted_connection_gains_a_key_without_being_counted_twice():
    counts = ConnCounts.create(2, 16)
    slot = counts.slot(1)
    slot.add("p:10.0.0.1")
    slot.add_keys("h:192.0.2.1")
    assert (counts.total(), counts.count("p:10.0.0.1"), counts.count("h:192.0.2.1")) == (1, 1, 1)
    slot.remove("p:10.0.0.1", "h:192.0.2.1")
    assert (counts.total(), counts.count("p:10.0.0.1"), counts.count("h:192.0.2.1")) == (0, 0, 0)


def test_counts_sum_over_slots_and_clear_slot():
    counts = ConnCounts.create(3, 8)
    counts.slot(0).add("h:a")
    counts.slot(1).add("h:a")
    counts.slot(1).add("h:b")
    assert (counts.total(), counts.count("h:a")) == (3, 2)
    counts.clear_slot(1)
    assert (counts.total(), counts.count("h:a"), counts.count("h:b")) == (1, 1, 0)
    with pytest.raises(IndexError):
        counts.slot(3)


def test_removing_more_than_added_never_goes_negative():
    counts = ConnCounts.create(1, 8)
    slot = counts.slot(0)
    slot.add("k")
    slot.remove("k")
    slot.remove("k")
    assert (counts.total(), counts.count("k")) == (0, 0)


def test_full_slot_counts_overflow_and_recovers():
    counts = ConnCounts.create(1, 2)          # capacity 8 entries
    slot = counts.slot(0)
    keys = [f"h:10.0.0.{i}" for i in range(10)]
    for key in keys:
        slot.add(key)
    stats = counts.snapshot()[0]
    assert (stats.total, stats.keys, stats.overflow) == (10, 8, 2)
    assert sum(counts.count(key) for key in keys) == 8
    for key in keys:
        slot.remove(key)
    assert counts.snapshot()[0] == SlotStats(0, 0, 0)


def test_tombstones_are_compacted_away():
    counts = ConnCounts.create(1, 4)
    slot = counts.slot(0)
    slot.add("steady")
    for index in range(2000):
        slot.add(f"churn{index}")
        slot.remove(f"churn{index}")
    assert counts.snapshot()[0] == SlotStats(total=1, keys=1, overflow=0)
    assert counts.count("steady") == 1


def _fork(work):
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            work()
            status = 0
        finally:
            os._exit(status)
    return pid


def test_workers_in_processes_and_a_killed_worker():
    counts = ConnCounts.create(4, 64)
    ready_read, ready_write = os.pipe()
    hold_read, hold_write = os.pipe()

    def worker(index):
        slot = counts.slot(index)
        for _ in range(index + 1):
            slot.add("h:192.0.2.1", "p:10.0.0.1")
        slot.add(f"h:198.51.100.{index}")
        os.write(ready_write, b"r")
        os.read(hold_read, 1)
        for _ in range(index + 1):
            slot.remove("h:192.0.2.1", "p:10.0.0.1")
        slot.remove(f"h:198.51.100.{index}")

    pids = [_fork(lambda i=i: worker(i)) for i in range(3)]
    for _ in pids:
        assert os.read(ready_read, 1) == b"r"
    assert counts.total() == 1 + 2 + 3 + 3
    assert counts.count("h:192.0.2.1") == 6
    assert counts.count("p:10.0.0.1") == 6
    assert counts.count("h:198.51.100.1") == 1

    os.kill(pids[1], signal.SIGKILL)
    assert os.waitpid(pids[1], 0)[1] != 0
    assert counts.count("h:192.0.2.1") == 6        # still counted until reaped ...
    counts.clear_slot(1)                           # ... by the master
    assert counts.count("h:192.0.2.1") == 4
    assert counts.count("h:198.51.100.1") == 0

    os.write(hold_write, b"gg")
    assert [os.waitpid(pid, 0)[1] for pid in (pids[0], pids[2])] == [0, 0]
    assert counts.total() == 0
    assert counts.count("h:192.0.2.1") == 0


def _busy(seconds):
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def _readings_while_churning(counts, churn, read) -> collections.Counter:
    """Fork a writer that counts "steady" five times, then runs
    ``churn(slot)``; meanwhile collect ``read()`` until it exits cleanly."""
    go_read, go_write = os.pipe()

    def writer():
        slot = counts.slot(1)
        for _ in range(5):
            slot.add("steady")
        os.write(go_write, b"g")
        churn(slot)

    pid = _fork(writer)
    os.read(go_read, 1)
    readings = collections.Counter()
    reaped, status = 0, 0
    while not reaped:
        readings[read()] += 1
        reaped, status = os.waitpid(pid, os.WNOHANG)
    assert status == 0
    return readings


def test_reader_sees_consistent_counts_while_writer_churns():
    counts = ConnCounts.create(2, 8)

    def churn(slot):
        for index in range(20000):
            slot.add(f"churn{index % 13}", "steady")
            _busy(20e-6)                      # stay a while in the "6" state
            slot.remove(f"churn{index % 13}", "steady")

    readings = _readings_while_churning(counts, churn, lambda: counts.count("steady"))
    assert set(readings) <= {5, 6} and len(readings) == 2
    assert counts.count("steady") == 5


def test_total_never_reads_as_zero_while_a_writer_churns():
    """Writes to the shared slot must never pass through zero bytes
    (struct.pack_into clears its target first) nor publish the even version
    before the total: either let a reader take a total of 0, and two workers
    admit past smtp_accept_max."""
    counts = ConnCounts.create(2, 8)

    def churn(slot):
        for _ in range(100000):
            slot.add("steady")
            slot.remove("steady")

    readings = _readings_while_churning(counts, churn, counts.total)
    assert set(readings) <= {5, 6}, readings


def _stuck_mid_update(counts, index, pid):
    """Make slot ``index`` look as if writer ``pid`` stopped mid-update."""
    base, _ = counts._offsets(index)
    version = struct.unpack_from("<I", counts._mm, base)[0]
    struct.pack_into("<II", counts._mm, base, version | 1, pid)


def test_reader_does_not_wait_for_a_dead_writer():
    counts = ConnCounts.create(2, 8, read_timeout=30.0)
    pid = _fork(lambda: counts.slot(1).add("k"))
    assert os.waitpid(pid, 0)[1] == 0
    _stuck_mid_update(counts, 1, pid)
    started = time.monotonic()
    assert counts.count("k") == 1 and counts.total() == 1
    assert time.monotonic() - started < 1.0
    counts.clear_slot(1)
    assert counts.count("k") == 0


def test_reader_gives_up_on_a_stopped_writer_after_the_timeout():
    counts = ConnCounts.create(1, 8, read_timeout=0.2)
    pid = _fork(lambda: time.sleep(30))
    try:
        counts.slot(0).add("k")
        _stuck_mid_update(counts, 0, pid)
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(100)])
        started = time.monotonic()
        assert counts.count("k") == 1
        assert 0.2 <= time.monotonic() - started < 2.0
        assert len(ticks) >= 5          # the reader yielded to the hub meanwhile
        ticker.kill()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

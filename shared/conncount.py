"""Open-connection counts shared by the SMTP workers.

Serves ``smtp_accept_max`` (the total), ``smtp_accept_max_per_host`` and
``smtp_accept_max_per_proxy`` (per key: callers use distinct keys for the
real client and for the proxy, e.g. ``b"h:" + ip`` and ``b"p:" + ip``).

One anonymous MAP_SHARED region created by the master before it forks; the
counts are lost on restart, which is right since the connections are too.
The region has one *slot per worker*: a worker writes only its own slot, so
writers need no lock, and a dead worker cannot leak counts: the master
calls :meth:`ConnCounts.clear_slot` when it reaps it, before giving the slot
to a new worker (size ``n_slots`` for both generations of a reload).
Readers in any process sum over the slots.

Each slot: a header ``version u32 | writer pid u32 | total i64 | overflow i64 |
used u32 | capacity u32`` and ``capacity`` entries of ``digest[16] | count
i32 | pad``.  The region holds every slot's header first, side by side (the
total over all slots, read on every connection, touches one page), then
every slot's entries.  A key is represented by its 16-byte BLAKE2b digest (never all
zero: the low bit of the first byte is forced on).  Entries whose count
drops to zero stay as tombstones until the slot is compacted (when used
entries pass 3/4 of the capacity).

Readers use the version as a seqlock: the writer makes it odd while
changing the slot and even afterwards; a reader retries while it is odd or
changes.  A writer can be preempted mid-update for milliseconds, so a
reader that keeps seeing an odd version yields (``gevent.sleep``, never
blocking the hub) and tries again for as long as the writer, whose pid is
in the slot header, is alive.  A writer killed mid-update leaves the
version odd until the master clears the slot: readers then take what they
read (counts at most one connection off); after ``read_timeout`` they do
so too, in case the writer is stopped or not yet reaped.

Full slot: if a slot has no free entry for a new key (more distinct keys
than ``capacity``, which is twice ``keys_per_slot``), the connection is
still counted in the total, and the key is counted in the slot's
``overflow`` instead: :meth:`ConnCounts.count` does not see it (an
under-count for that key), :meth:`snapshot` shows the overflow.  Nothing
raises.  Size ``keys_per_slot`` to twice the connections a worker may hold
and this cannot happen.

Admission: counting and checking are separate steps, so two workers can
race.  Add first, then compare ``count()``/``total()`` with the limit and
remove again if over: the limit is then never exceeded (at worst two
simultaneous arrivals are both refused).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import gevent

from shared.mmwrite import store

T = TypeVar("T")

_HEADER = struct.Struct("<IIqqII")  # version pid total overflow used capacity
_VERSION = struct.Struct("<I")
_VERSION_AND_TOTAL = struct.Struct("<I4xq")  # version, (pid), total
_ENTRY = struct.Struct("<16siI")    # digest count pad
_DIGEST_SIZE = 16
_EMPTY = bytes(_DIGEST_SIZE)
_SPINS = 100
_U32 = 0xFFFFFFFF


def _process_gone(pid: int) -> bool:
    """True if no process ``pid`` exists (a zombie still counts as existing)."""
    if pid == 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _publish(mm: mmap.mmap, base: int, writing: int) -> None:
    """End a write: the even version is stored last, on its own.  Stored
    with the header (version is its first field), it would be seen before
    the total that follows it, and a reader could take an old total."""
    store(mm, base, _VERSION, (writing + 1) & _U32)


class SlotStats(NamedTuple):
    """One worker slot, for status output."""

    total: int
    keys: int
    overflow: int


def key_digest(key: bytes | str) -> bytes:
    """The fixed-size, never-empty representation of a key."""
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    digest = bytearray(hashlib.blake2b(raw, digest_size=_DIGEST_SIZE).digest())
    digest[0] |= 1
    return bytes(digest)


def _capacity_for(keys_per_slot: int) -> int:
    capacity = 8
    while capacity < 2 * keys_per_slot:
        capacity *= 2
    return capacity


class _SlotView:
    """Reading one slot of the region (any process)."""

    def __init__(self, mm: mmap.mmap, base: int, entries: int, capacity: int,
                 read_timeout: float, sleep: Callable[[float], Any]) -> None:
        self._mm = mm
        self._base = base          # the slot's header
        self._entries = entries    # its first entry
        self._capacity = capacity
        self._mask = capacity - 1
        self._read_timeout = read_timeout
        self._sleep = sleep

    def _entry_offset(self, index: int) -> int:
        return self._entries + index * _ENTRY.size

    def _header(self) -> tuple[int, int, int, int, int, int]:
        return _HEADER.unpack_from(self._mm, self._base)

    def _probe(self, digest: bytes) -> tuple[int | None, int | None]:
        """(index holding ``digest`` or None, first reusable index or None)."""
        index = int.from_bytes(digest[1:9], "little") & self._mask
        reusable = None
        for _ in range(self._capacity):
            found, count, _ = _ENTRY.unpack_from(self._mm, self._entry_offset(index))
            if found == digest:
                return index, reusable
            if found == _EMPTY:
                return None, index if reusable is None else reusable
            if count == 0 and reusable is None:
                reusable = index
            index = (index + 1) & self._mask
        return None, reusable

    def _count_unlocked(self, digest: bytes) -> int:
        index, _ = self._probe(digest)
        if index is None:
            return 0
        return _ENTRY.unpack_from(self._mm, self._entry_offset(index))[1]

    def _consistent(self, read: Callable[[], T]) -> T:
        """Run ``read()`` inside the seqlock protocol (see the module doc)."""
        attempts = 0
        deadline = None
        while True:
            before = _VERSION.unpack_from(self._mm, self._base)[0]
            value = read()
            if before == _VERSION.unpack_from(self._mm, self._base)[0] and not before & 1:
                return value
            attempts += 1
            if attempts < _SPINS:
                continue
            now = time.monotonic()
            deadline = deadline or now + self._read_timeout
            if now > deadline or _process_gone(self._header()[1]):
                return value
            self._sleep(0.0002)

    def count(self, digest: bytes) -> int:
        return self._consistent(lambda: self._count_unlocked(digest))

    def total(self) -> int:
        return self._consistent(self._header)[2]

    def stats(self) -> SlotStats:
        _, _, total, overflow, _, _ = self._consistent(self._header)
        live = self._consistent(self._live_keys)
        return SlotStats(total, live, overflow)

    def _live_keys(self) -> int:
        live = 0
        for index in range(self._capacity):
            found, count, _ = _ENTRY.unpack_from(self._mm, self._entry_offset(index))
            live += found != _EMPTY and count > 0
        return live


class SlotWriter(_SlotView):
    """The owning worker's handle on its slot.  Not for other processes."""

    def claim(self) -> None:
        """Record this process as the slot's writer."""
        version, _, total, overflow, used, capacity = self._header()
        store(self._mm, self._base, _HEADER, version, os.getpid(), total, overflow, used, capacity)

    def add(self, *keys: bytes | str) -> None:
        """Count one connection, identified by ``keys`` (each counted once)."""
        self._change(+1, keys, connections=+1)

    def add_keys(self, *keys: bytes | str) -> None:
        """Count more keys for a connection already counted (its total stays).

        One write: taking the connection's keys away and adding them back
        with the new one would, for that moment, show every other worker
        one connection fewer under the old keys, and let it admit one too many.
        """
        self._change(+1, keys, connections=0)

    def remove(self, *keys: bytes | str) -> None:
        """Uncount a connection previously added (with `add` and `add_keys`)."""
        self._change(-1, keys, connections=-1)

    def _change(self, delta: int, keys: tuple[bytes | str, ...], connections: int) -> None:
        digests = [key_digest(key) for key in keys]
        version, pid, total, overflow, used, capacity = self._header()
        writing = version | 1
        store(self._mm, self._base, _VERSION, writing)
        total = max(0, total + connections)
        for digest in digests:
            overflow, used = self._bump(digest, delta, overflow, used)
        if used * 4 > capacity * 3:
            used = self._compact()
        store(self._mm, self._base, _HEADER, writing, pid, total, overflow, used, capacity)
        _publish(self._mm, self._base, writing)

    def _bump(self, digest: bytes, delta: int, overflow: int, used: int) -> tuple[int, int]:
        """Apply ``delta`` to one key; returns the new (overflow, used)."""
        index, reusable = self._probe(digest)
        if index is not None:
            offset = self._entry_offset(index)
            count = _ENTRY.unpack_from(self._mm, offset)[1]
            if delta > 0 or count > 0:
                store(self._mm, offset, _ENTRY, digest, count + delta, 0)
                return overflow, used
        if delta < 0:
            return max(0, overflow - 1), used
        if reusable is None:
            return overflow + 1, used
        offset = self._entry_offset(reusable)
        was_empty = _ENTRY.unpack_from(self._mm, offset)[0] == _EMPTY
        store(self._mm, offset, _ENTRY, digest, 1, 0)
        return overflow, used + was_empty

    def _compact(self) -> int:
        """Drop tombstones by re-inserting the live entries; returns used."""
        live = []
        for index in range(self._capacity):
            found, count, _ = _ENTRY.unpack_from(self._mm, self._entry_offset(index))
            if found != _EMPTY and count > 0:
                live.append((found, count))
        start = self._entry_offset(0)
        self._mm[start:start + self._capacity * _ENTRY.size] = bytes(self._capacity * _ENTRY.size)
        for digest, count in live:
            _, free = self._probe(digest)
            store(self._mm, self._entry_offset(free), _ENTRY, digest, count, 0)
        return len(live)


class ConnCounts:
    """The whole region: readers for everyone, writers per slot."""

    def __init__(self, mm: mmap.mmap, n_slots: int, capacity: int,
                 read_timeout: float = 0.5,
                 sleep: Callable[[float], Any] = gevent.sleep) -> None:
        self._mm = mm
        self.n_slots = n_slots
        self.capacity = capacity
        self._entries_size = capacity * _ENTRY.size
        self._reading = (read_timeout, sleep)
        self._views = [_SlotView(mm, *self._offsets(i), capacity, *self._reading) for i in range(n_slots)]
        # Every slot's version and total in one unpack of the header table,
        # every version again in a second: pad bytes skip the other fields.
        skip = _HEADER.size - _VERSION_AND_TOTAL.size
        self._all_totals = struct.Struct("<" + f"I4xq{skip}x" * n_slots)
        self._all_versions = struct.Struct("<" + f"I{_HEADER.size - _VERSION.size}x" * n_slots)

    def _offsets(self, index: int) -> tuple[int, int]:
        """(header, first entry) of slot ``index``: the headers come first,
        side by side, so that `total` reads one page rather than one per slot."""
        return index * _HEADER.size, self.n_slots * _HEADER.size + index * self._entries_size

    @classmethod
    def create(cls, n_slots: int, keys_per_slot: int, *, read_timeout: float = 0.5,
               sleep: Callable[[float], Any] = gevent.sleep) -> ConnCounts:
        """Allocate the anonymous shared region (master, before forking).

        ``read_timeout`` bounds how long a reader waits for a live writer
        stuck mid-update; ``sleep`` is how readers yield meanwhile.
        """
        if n_slots < 1 or keys_per_slot < 1:
            raise ValueError("n_slots and keys_per_slot must be positive")
        capacity = _capacity_for(keys_per_slot)
        mm = mmap.mmap(-1, n_slots * (_HEADER.size + capacity * _ENTRY.size), mmap.MAP_SHARED)
        for index in range(n_slots):
            _HEADER.pack_into(mm, index * _HEADER.size, 0, 0, 0, 0, 0, capacity)
        return cls(mm, n_slots, capacity, read_timeout, sleep)

    def slot(self, index: int) -> SlotWriter:
        """The writer for slot ``index``, claimed by the calling process:
        call it in the worker (after the fork) and use it there only."""
        self._check_index(index)
        writer = SlotWriter(self._mm, *self._offsets(index), self.capacity, *self._reading)
        writer.claim()
        return writer

    def clear_slot(self, index: int) -> None:
        """Forget a dead worker's connections (master, after reaping it)."""
        self._check_index(index)
        base, entries = self._offsets(index)
        version = _HEADER.unpack_from(self._mm, base)[0] | 1
        store(self._mm, base, _HEADER, version, 0, 0, 0, 0, self.capacity)
        self._mm[entries:entries + self._entries_size] = bytes(self._entries_size)
        _publish(self._mm, base, version)

    def total(self) -> int:
        """Open connections over all workers.

        On every connection's path, over every slot, so the seqlock read
        is done for all slots at once: one unpack of every (version, total),
        one of every version again; when some slot was caught mid-write
        (a version odd or changed), that slot is read again the slow way.
        """
        pairs = self._all_totals.unpack_from(self._mm)
        versions = self._all_versions.unpack_from(self._mm)
        if pairs[0::2] == versions and not any(map((1).__and__, versions)):
            return sum(pairs[1::2])
        total = 0
        for index, view in enumerate(self._views):
            before, count = pairs[2 * index], pairs[2 * index + 1]
            if before & 1 or versions[index] != before:
                count = view.total()
            total += count
        return total

    def count(self, key: bytes | str) -> int:
        """Open connections with ``key`` over all workers."""
        digest = key_digest(key)
        return sum(view.count(digest) for view in self._views)

    def snapshot(self) -> list[SlotStats]:
        """Per-slot totals, live keys and overflow, for status output."""
        return [view.stats() for view in self._views]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.n_slots:
            raise IndexError(f"slot {index} not in 0..{self.n_slots - 1}")

"""A fixed-size hash table of rate records shared by pre-forked workers.

The table is a file under the spool directory, mapped MAP_SHARED by the
master before it forks, so every worker inherits the same pages and the
records survive a restart.

Layout: a 64-byte header (magic, format version, geometry, hash salt) then
``slots + probe - 1`` fixed-size records.  A key hashes (keyed BLAKE2b, so
clients cannot aim keys at one bucket) to a home slot in ``[0, slots)`` and
lives in the window ``[home, home + probe)``: linear probing without
wrap-around, hence the ``probe - 1`` spare records at the end.  Records are
never deleted, only overwritten, so an empty record always ends a chain.
When a window holds neither the key nor a free record, the stalest record
in the window is evicted.

Record: ``seq u32 | crc u32 | key_len u16 | blob_len u16 | flags u16 |
time f64 | rate f64 | key[key_max] | blob[blob_size]``.  Keys longer than
``key_max`` bytes (UTF-8) are stored as their first ``key_max - 32`` bytes
followed by the SHA-256 of the whole key, with flag ``DIGEST_KEY``; lookups
compare that stored form, dumps show the prefix, "…#" and 16 hex digits.

Locking.  Every read-modify-write locks the stripes (runs of ``probe``
records) covering the key's whole window, with one non-blocking fcntl
byte-range lock (F_SETLK via ``fcntl.lockf(LOCK_NB)``) on the backing file:

* it never blocks the gevent hub: if the lock is taken we yield with
  ``gevent.sleep`` (0 first, then a short back-off) and try again; the
  holder keeps it for microseconds;
* the kernel drops fcntl locks when their process dies, so a worker killed
  with SIGKILL while holding one cannot wedge the others;
* fcntl locks belong to the process, not to the greenlet, and do not
  exclude each other inside one process.  Two greenlets of a worker still
  cannot interleave because the critical section never yields: it is plain
  Python on the mmap plus the caller's ``fn``, which must not yield either
  (and the table must not be used from OS threads).  Also because of
  POSIX semantics, closing any descriptor of this file in a process drops
  that process's locks: nothing here opens the file twice.

Torn records.  A writer bumps ``seq`` to odd, writes, stores the CRC-32 of
the record's content, then bumps ``seq`` to even.  A record whose ``seq`` is
odd (its writer died mid-write) or whose CRC does not match is treated as
absent and its place reused; :meth:`items` reads without locks using the
same two checks.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import gevent

MAGIC = b"MTARATE\0"
VERSION = 1
HEADER_SIZE = 64
# magic, version, slots, probe, key_max, blob_size, record_size, salt
_HEADER = struct.Struct("<8sIIIIII16s")
_SEQ = struct.Struct("<I")
_CRC_OFFSET = 4
_META = struct.Struct("<HHHdd")  # key_len blob_len flags time rate
_META_OFFSET = 8
_KEY_OFFSET = _META_OFFSET + _META.size
_SLOT_HEAD = struct.Struct("<IIHHHdd")  # seq crc + meta, read in one go
_DIGEST_SIZE = 32
DIGEST_KEY = 1
_U32 = 0xFFFFFFFF
_FAST_RETRIES = 8
_MAX_BACKOFF = 0.005


class Record(NamedTuple):
    """A stored rate record (same fields as ``mta.ratelimit.RateRecord``)."""

    time: float
    rate: float
    blob: bytes = b""


class TableItem(NamedTuple):
    """One valid record, for dumps."""

    key: str
    time: float
    rate: float
    blob: bytes


class RateTableBusy(Exception):
    """The lock could not be taken within the time-out (a stopped holder)."""


class RateTableFormatError(Exception):
    """An existing file is not a ratelimit table this code can use."""


class _Geometry(NamedTuple):
    slots: int
    probe: int
    key_max: int
    blob_size: int

    @property
    def record_size(self) -> int:
        raw = _KEY_OFFSET + self.key_max + self.blob_size
        return (raw + 7) & ~7

    @property
    def physical_slots(self) -> int:
        return self.slots + self.probe - 1

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.physical_slots * self.record_size

    def check(self) -> None:
        if self.slots < 1 or self.probe < 1:
            raise ValueError("slots and probe must be positive")
        if not _DIGEST_SIZE < self.key_max <= 0xFFFF or not 0 <= self.blob_size <= 0xFFFF:
            raise ValueError("key_max must be in 33..65535 and blob_size in 0..65535")


def _read_header(mm: mmap.mmap) -> tuple[_Geometry, bytes, str | None]:
    """Geometry, salt and a reason the header is unusable (None if usable)."""
    if len(mm) < HEADER_SIZE:
        return _Geometry(0, 0, 0, 0), b"", "file is shorter than a header"
    magic, version, slots, probe, key_max, blob_size, record_size, salt = \
        _HEADER.unpack_from(mm, 0)
    geometry = _Geometry(slots, probe, key_max, blob_size)
    if magic != MAGIC:
        return geometry, salt, "not a ratelimit table (bad magic)"
    if version != VERSION:
        return geometry, salt, f"format version {version}, expected {VERSION}"
    if record_size != geometry.record_size or len(mm) != geometry.file_size:
        return geometry, salt, "file size does not match its header"
    return geometry, salt, None


def _map_file(path: str, writable: bool) -> tuple[int, mmap.mmap]:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise RateTableFormatError(f"{path}: file is shorter than a header")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    except BaseException:
        os.close(fd)
        raise


class RateTable:
    """The shared table.  Build it with :meth:`create` (master, before fork)
    or :meth:`open` (read-only tools such as a dump command)."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, geometry: _Geometry,
                 salt: bytes, recreated: str | None = None,
                 lock_timeout: float = 1.0,
                 sleep: Callable[[float], Any] = gevent.sleep) -> None:
        self.path = path
        self.recreated = recreated
        self.slots = geometry.slots
        self.probe = geometry.probe
        self.key_max = geometry.key_max
        self.blob_size = geometry.blob_size
        self._fd = fd
        self._mm = mm
        self._hasher = hashlib.blake2b(digest_size=8, key=salt)
        self._record_size = geometry.record_size
        self._blob_offset = _KEY_OFFSET + geometry.key_max
        self._lock_timeout = lock_timeout
        self._sleep = sleep

    # ---- construction -------------------------------------------------

    @classmethod
    def create(cls, path: str, slots: int, *, probe: int = 16, key_max: int = 200,
               blob_size: int = 128, lock_timeout: float = 1.0,
               sleep: Callable[[float], Any] = gevent.sleep) -> RateTable:
        """Open the table at ``path``, or (re)create it.

        An existing file of this format and geometry is used as it is.  Any
        other file is replaced (atomically, by rename); ``table.recreated``
        then says why, for the caller to log.  Records of a valid table of
        another geometry are carried over when they fit.
        """
        geometry = _Geometry(slots, probe, key_max, blob_size)
        geometry.check()
        options = {"lock_timeout": lock_timeout, "sleep": sleep}
        if not os.path.exists(path):
            return cls._build(path, geometry, [], None, options)
        try:
            fd, mm = _map_file(path, writable=True)
        except RateTableFormatError as exc:
            return cls._build(path, geometry, [], str(exc), options)
        found, salt, problem = _read_header(mm)
        if problem is None and found == geometry:
            return cls(path, fd, mm, geometry, salt, None, **options)
        carried: list[tuple[bytes, int, Record]] = []
        if problem is None:
            old = cls(path, fd, mm, found, salt)
            carried = list(old._raw_items())
            problem = (f"geometry changed from {tuple(found)} to {tuple(geometry)} "
                       "(slots, probe, key_max, blob_size)")
        mm.close()
        os.close(fd)
        return cls._build(path, geometry, carried, problem, options)

    @classmethod
    def _build(cls, path: str, geometry: _Geometry,
               carried: list[tuple[bytes, int, Record]], reason: str | None,
               options: dict[str, Any]) -> RateTable:
        salt = os.urandom(16)
        tmp = f"{path}.new.{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, geometry.file_size)
            mm = mmap.mmap(fd, geometry.file_size, mmap.MAP_SHARED)
            _HEADER.pack_into(mm, 0, MAGIC, VERSION, *geometry, geometry.record_size, salt)
            table = cls(path, fd, mm, geometry, salt, None, **options)
            kept = table._insert_carried(carried)
            mm.flush()
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        if carried:
            reason = f"{reason}; carried over {kept} of {len(carried)} records"
        table.recreated = reason
        return table

    @classmethod
    def open(cls, path: str) -> RateTable:
        """Map an existing table read-only (for dumps); never modifies it."""
        fd, mm = _map_file(path, writable=False)
        geometry, salt, problem = _read_header(mm)
        if problem is not None:
            mm.close()
            os.close(fd)
            raise RateTableFormatError(f"{path}: {problem}")
        return cls(path, fd, mm, geometry, salt)

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)

    # ---- public operations --------------------------------------------

    def update(self, key: str, fn: Callable[[Record | None], Any]) -> Any:
        """Atomically (across processes) replace the record of ``key`` by
        ``fn(current)``; ``fn`` gets None when there is none and returns an
        object with ``time``, ``rate`` and ``blob``, or None to store nothing.
        Returns what ``fn`` returned.  ``fn`` must not yield to the hub.
        Raises :class:`RateTableBusy` if the lock stays taken too long.
        """
        stored, flags = self._stored_key(key)
        home = self._home(stored)
        locked = self._lock(home)
        try:
            slot, current = self._find(stored, flags, home)
            new = fn(current)
            if new is not None:
                self._write(slot, stored, flags, new)
            return new
        finally:
            self._unlock(locked)

    def get(self, key: str) -> Record | None:
        """The record of ``key`` (read under the lock), or None."""
        stored, flags = self._stored_key(key)
        home = self._home(stored)
        locked = self._lock(home, fcntl.LOCK_SH)
        try:
            return self._find(stored, flags, home)[1]
        finally:
            self._unlock(locked)

    def items(self) -> Iterator[TableItem]:
        """Every valid record, read without locks (torn ones are skipped)."""
        for stored, flags, record in self._raw_items():
            yield TableItem(self._display_key(stored, flags), record.time,
                            record.rate, record.blob)

    def fill(self) -> tuple[int, int]:
        """(records in use, home slots)."""
        used = sum(1 for _ in self._raw_items())
        return used, self.slots

    # ---- keys and hashing ---------------------------------------------

    def _stored_key(self, key: str) -> tuple[bytes, int]:
        raw = key.encode("utf-8", "surrogateescape")
        if not raw:
            raise ValueError("empty ratelimit key")
        if len(raw) <= self.key_max:
            return raw, 0
        digest = hashlib.sha256(raw).digest()
        return raw[:self.key_max - _DIGEST_SIZE] + digest, DIGEST_KEY

    def _display_key(self, stored: bytes, flags: int) -> str:
        if not flags & DIGEST_KEY:
            return stored.decode("utf-8", "surrogateescape")
        prefix = stored[:-_DIGEST_SIZE].decode("utf-8", "replace")
        return f"{prefix}…#{stored[-_DIGEST_SIZE:].hex()[:16]}"

    def _home(self, stored: bytes) -> int:
        hasher = self._hasher.copy()
        hasher.update(stored)
        return int.from_bytes(hasher.digest(), "little") % self.slots

    # ---- locking ------------------------------------------------------

    def _lock(self, home: int, mode: int = fcntl.LOCK_EX) -> tuple[int, int]:
        """Lock the stripes of the window starting at ``home`` (exclusive, or
        shared for readers); returns (length, start) of the locked range."""
        first = home // self.probe
        length = (home + self.probe - 1) // self.probe - first + 1
        attempts = 0
        deadline = None
        while True:
            try:
                fcntl.lockf(self._fd, mode | fcntl.LOCK_NB, length, first)
                return length, first
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            attempts += 1
            now = time.monotonic()
            deadline = deadline or now + self._lock_timeout
            if now > deadline:
                raise RateTableBusy(f"{self.path}: lock held for over {self._lock_timeout}s")
            self._sleep(0 if attempts < _FAST_RETRIES
                        else min(_MAX_BACKOFF, 0.0001 * 2 ** (attempts - _FAST_RETRIES)))

    def _unlock(self, locked: tuple[int, int]) -> None:
        length, start = locked
        fcntl.lockf(self._fd, fcntl.LOCK_UN, length, start)

    # ---- records ------------------------------------------------------

    def _offset(self, slot: int) -> int:
        return HEADER_SIZE + slot * self._record_size

    def _find(self, stored: bytes, flags: int, home: int) -> tuple[int, Record | None]:
        """Locate ``stored`` in its window: (slot holding it, record), or
        (slot to write it to, None).  Caller holds the window's lock."""
        mm = self._mm
        size = len(stored)
        reusable = None
        stalest, stalest_time = home, float("inf")
        offset = self._offset(home)
        for slot in range(home, home + self.probe):
            seq, _, key_len, _, rec_flags, rec_time, _ = _SLOT_HEAD.unpack_from(mm, offset)
            if seq & 1:
                if reusable is None:
                    reusable = slot
            elif key_len == 0:
                return (slot if reusable is None else reusable), None
            elif key_len == size and rec_flags == flags \
                    and mm[offset + _KEY_OFFSET:offset + _KEY_OFFSET + size] == stored:
                valid = self._read_valid(offset)
                return slot, None if valid is None else valid[2]
            elif rec_time < stalest_time:
                stalest, stalest_time = slot, rec_time
            offset += self._record_size
        return (stalest if reusable is None else reusable), None

    def _read_valid(self, offset: int) -> tuple[bytes, int, Record] | None:
        """The record at ``offset`` if its seq is even and stays so, and its
        CRC matches; None otherwise (torn, corrupt, or being written)."""
        mm = self._mm
        seq, crc, key_len, blob_len, flags, rec_time, rate = _SLOT_HEAD.unpack_from(mm, offset)
        if seq & 1 or key_len == 0 or key_len > self.key_max or blob_len > self.blob_size:
            return None
        head = mm[offset + _META_OFFSET:offset + _KEY_OFFSET + key_len]
        blob_start = offset + self._blob_offset
        blob = mm[blob_start:blob_start + blob_len] if blob_len else b""
        if zlib.crc32(blob, zlib.crc32(head)) != crc or _SEQ.unpack_from(mm, offset)[0] != seq:
            return None
        return head[_META.size:], flags, Record(rec_time, rate, blob)

    def _write(self, slot: int, stored: bytes, flags: int, new: Any) -> None:
        """Write one record: seq odd, content, CRC, seq even."""
        blob = bytes(new.blob)
        if len(blob) > self.blob_size:
            raise ValueError(f"record blob of {len(blob)} bytes exceeds {self.blob_size}")
        head = _META.pack(len(stored), len(blob), flags, new.time, new.rate) + stored
        crc = zlib.crc32(blob, zlib.crc32(head))
        mm = self._mm
        offset = self._offset(slot)
        writing = ((_SEQ.unpack_from(mm, offset)[0] + 1) | 1) & _U32
        _SEQ.pack_into(mm, offset, writing)
        mm[offset + _META_OFFSET:offset + _META_OFFSET + len(head)] = head
        if blob:
            blob_start = offset + self._blob_offset
            mm[blob_start:blob_start + len(blob)] = blob
        _SEQ.pack_into(mm, offset + _CRC_OFFSET, crc)
        _SEQ.pack_into(mm, offset, (writing + 1) & _U32)

    def _raw_items(self) -> Iterator[tuple[bytes, int, Record]]:
        for slot in range(self.slots + self.probe - 1):
            record = self._read_valid(self._offset(slot))
            if record is not None:
                yield record

    def _insert_carried(self, carried: list[tuple[bytes, int, Record]]) -> int:
        """Insert records salvaged from a table of another geometry."""
        kept = 0
        for stored, flags, record in carried:
            if len(stored) > self.key_max or len(record.blob) > self.blob_size:
                continue
            slot, _ = self._find(stored, flags, self._home(stored))
            self._write(slot, stored, flags, record)
            kept += 1
        return kept

"""SOCKS proxy health and counters shared by all processes (anonymous shared mmap).

The master calls `ProxyPool.create()` before forking; every child inherits the
mapping.  Proxies are keyed by (ip, port).

Scheme: one region ("slot") per process, written only by that process, so no
locks are ever taken and nothing can block the hub.  A child calls
`bind_slot(n)` (n >= 1) after the fork; slot 0 belongs to the master (and to a
process that never binds, such as a test).  Each slot is a small open-addressing
table of records; each record is guarded by a sequence counter (seqlock: odd
while the owner writes) so readers in other processes retry instead of seeing
a half-written record.

Readers combine the slots:
* counters (dials, failures, in_use) are summed;
* health is the most recent observation of any process (by monotonic time,
  which is system-wide on Linux): "down until T", "up", or "probing until T".

Back-off: `mark_down` puts a proxy down for `backoff` seconds.  Failures during
that period belong to the same outage and change nothing.  Once it has passed,
the next dialer claims a probe (`begin_dial` records "probing" so other
processes keep treating the proxy as down meanwhile); a failed probe doubles
the back-off (up to MAX_BACKOFF), a success resets it.  Two processes may both
claim a probe within the same microseconds; that is harmless.

When the master reaps a dead child it calls `retire_slot(n)`: the child's
dials and failures move to slot 0 and its in_use drops to zero.  A process
that sees more than `max_proxies` distinct proxies does not track the extra
ones (they always look up and are not counted).
"""

from __future__ import annotations

import ipaddress
import mmap
import struct
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from shared.mmwrite import store
from shared.socks5 import ProxySpec

DEFAULT_BACKOFF = 30.0
MAX_BACKOFF = 600.0

UP, DOWN, PROBING = 0, 1, 2
_STATE_NAMES = {UP: "up", DOWN: "down", PROBING: "probing"}

_MAGIC = b"MTAPROX1"
_HEADER = struct.Struct("<8sII")          # magic, max_proxies, max_processes
_SEQ = struct.Struct("<I")
# after the seq: used, ip version, port, ip (16), dials, failures, in_use,
# fail streak, state, observed_at, down_until (the probe deadline when probing)
_BODY = struct.Struct("<BBH16sQQqIIdd")
_RECORD_SIZE = _SEQ.size + _BODY.size
_SPIN_LIMIT = 1000


class _Record(NamedTuple):
    used: int
    version: int
    port: int
    ip: bytes
    dials: int
    failures: int
    in_use: int
    streak: int
    state: int
    observed_at: float
    down_until: float


_Key = tuple[int, bytes, int]  # (ip version, packed ip padded to 16, port)


class ProxyPool:
    """Proxy health and counters in shared memory; see the module docstring."""

    def __init__(self, memory: mmap.mmap, max_proxies: int, max_processes: int) -> None:
        self._mm = memory
        self._max_proxies = max_proxies
        self._max_processes = max_processes
        self._records_at = _HEADER.size + max_processes
        self._slot = 0
        self._keys: dict[tuple[str, int], _Key] = {}
        self._offsets: dict[tuple[int, _Key], int] = {}

    @classmethod
    def create(cls, max_proxies: int = 256, max_processes: int = 64) -> "ProxyPool":
        """Map a fresh zeroed shared region; call before forking."""
        size = _HEADER.size + max_processes + max_processes * max_proxies * _RECORD_SIZE
        memory = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        _HEADER.pack_into(memory, 0, _MAGIC, max_proxies, max_processes)
        pool = cls(memory, max_proxies, max_processes)
        pool.bind_slot(0)
        return pool

    # ------------------------------------------------------------ slots

    def bind_slot(self, slot: int) -> None:
        """Make this process the single writer of `slot` (children: 1..max_processes-1)."""
        if not 0 <= slot < self._max_processes:
            raise ValueError(f"slot {slot} out of range 0-{self._max_processes - 1}")
        self._slot = slot
        self._offsets.clear()
        self._mm[_HEADER.size + slot] = 1

    def retire_slot(self, slot: int) -> None:
        """Master only, for a dead child: fold its counters into slot 0, zero in_use."""
        if not 1 <= slot < self._max_processes:
            raise ValueError(f"slot {slot} cannot be retired")
        for offset in self._slot_offsets(slot):
            record = self._read(offset)
            if not record.used:
                continue
            key = (record.version, record.ip, record.port)
            master = self._find(0, key, create=True)
            if master is not None:
                totals = self._read(master)
                self._write(master, totals._replace(dials=totals.dials + record.dials,
                                                    failures=totals.failures + record.failures))
            self._write(offset, record._replace(dials=0, failures=0, in_use=0))

    # ------------------------------------------------------------ health

    def is_down(self, spec: ProxySpec, now: float | None = None) -> bool:
        """True while a failure's back-off or another dialer's probe is running."""
        latest = self._latest(self._key(spec))
        return latest is not None and latest.state != UP and latest.down_until > _now(now)

    def mark_down(self, spec: ProxySpec, backoff: float = DEFAULT_BACKOFF,
                  now: float | None = None) -> float:
        """Record a failure; returns the back-off in force (grows per failed probe).

        A failure while the proxy is already down (an attempt that began before
        the mark, or a last-resort try) belongs to the same outage and changes
        nothing.
        """
        now = _now(now)
        key = self._key(spec)
        latest = self._latest(key)
        if latest is None or latest.state == UP:
            streak = 1
        elif latest.state == DOWN and latest.down_until > now:
            return _backoff(backoff, latest.streak)
        else:
            streak = latest.streak + 1
        delay = _backoff(backoff, streak)
        self._update_own(key, streak=streak, state=DOWN, observed_at=now, down_until=now + delay)
        return delay

    def mark_up(self, spec: ProxySpec, now: float | None = None) -> None:
        """Record a success: the proxy is up and its back-off resets."""
        self._update_own(self._key(spec), streak=0, state=UP, observed_at=_now(now),
                         down_until=0.0)

    # ------------------------------------------------------------ counters

    def begin_dial(self, spec: ProxySpec, probe_window: float,
                   now: float | None = None) -> "ProxyLease":
        """Count a dial (dials+1, in_use+1); claim the probe if the back-off has run out.

        `probe_window` is how long other processes keep seeing the proxy as down
        while this probe runs (the dialer passes its remaining deadline).
        """
        now = _now(now)
        key = self._key(spec)
        latest = self._latest(key)
        offset = self._find(self._slot, key, create=True)
        if offset is not None:
            own = self._read(offset)
            own = own._replace(dials=own.dials + 1, in_use=own.in_use + 1)
            if latest is not None and latest.state != UP and latest.down_until <= now:
                own = own._replace(state=PROBING, streak=latest.streak, observed_at=now,
                                   down_until=now + probe_window)
            self._write(offset, own)
        return ProxyLease(self, key)

    def _end_dial(self, key: _Key, failed: bool) -> None:
        offset = self._find(self._slot, key, create=False)
        if offset is not None:
            own = self._read(offset)
            self._write(offset, own._replace(in_use=own.in_use - 1,
                                             failures=own.failures + int(failed)))

    def snapshot(self, now: float | None = None) -> list[dict]:
        """Per proxy: ip, port, dials, failures, in_use, state, fail_streak, down_until.

        down_until is wall-clock epoch seconds, 0.0 when the proxy is up.
        """
        now = _now(now)
        rows: dict[_Key, dict] = {}
        latest: dict[_Key, _Record] = {}
        for slot in self._active_slots():
            for offset in self._slot_offsets(slot):
                if self._mm[offset + _SEQ.size]:
                    _merge(rows, latest, self._read_consistent(offset))
        for key, row in rows.items():
            _add_health(row, latest.get(key), now)
        return sorted(rows.values(), key=lambda r: (r["ip"], r["port"]))

    # ------------------------------------------------------------ internals

    def _key(self, spec: ProxySpec) -> _Key:
        key = self._keys.get(spec.key)
        if key is None:
            ip = ipaddress.ip_address(spec.address)
            key = (ip.version, ip.packed.ljust(16, b"\0"), spec.port)
            self._keys[spec.key] = key
        return key

    def _latest(self, key: _Key) -> _Record | None:
        best = None
        for slot in self._active_slots():
            offset = self._find(slot, key, create=False)
            if offset is None:
                continue
            record = self._read_consistent(offset)
            if record.observed_at and (best is None or record.observed_at > best.observed_at):
                best = record
        return best

    def _update_own(self, key: _Key, **fields: float) -> None:
        offset = self._find(self._slot, key, create=True)
        if offset is not None:
            self._write(offset, self._read(offset)._replace(**fields))

    def _active_slots(self) -> list[int]:
        base = _HEADER.size
        return [s for s in range(self._max_processes) if self._mm[base + s]]

    def _slot_offsets(self, slot: int) -> range:
        start = self._records_at + slot * self._max_proxies * _RECORD_SIZE
        return range(start, start + self._max_proxies * _RECORD_SIZE, _RECORD_SIZE)

    def _find(self, slot: int, key: _Key, create: bool) -> int | None:
        """Offset of key's record in slot; only the slot's owner may create it."""
        cached = self._offsets.get((slot, key))
        if cached is not None:
            return cached
        version, ip, port = key
        offsets = self._slot_offsets(slot)
        start = zlib.crc32(ip + bytes((version,)) + port.to_bytes(2, "big")) % self._max_proxies
        for probe in range(self._max_proxies):
            offset = offsets[(start + probe) % self._max_proxies]
            record = self._read_consistent(offset)
            if not record.used:
                if not create:
                    return None
                self._write(offset, _Record(1, version, port, ip, 0, 0, 0, 0, UP, 0.0, 0.0))
            elif (record.version, record.ip, record.port) != key:
                continue
            self._offsets[(slot, key)] = offset
            return offset
        return None

    def _read(self, offset: int) -> _Record:
        return _Record(*_BODY.unpack_from(self._mm, offset + _SEQ.size))

    def _read_consistent(self, offset: int) -> _Record:
        """Seqlock read; after _SPIN_LIMIT tries (a writer died mid-write) take what is there."""
        for _ in range(_SPIN_LIMIT):
            (before,) = _SEQ.unpack_from(self._mm, offset)
            record = self._read(offset)
            if before % 2 == 0 and _SEQ.unpack_from(self._mm, offset)[0] == before:
                return record
        return record

    def _write(self, offset: int, record: _Record) -> None:
        (seq,) = _SEQ.unpack_from(self._mm, offset)
        seq |= 1  # an odd seq left by a writer that died mid-write stays odd here
        store(self._mm, offset, _SEQ, seq)
        store(self._mm, offset + _SEQ.size, _BODY, *record)
        store(self._mm, offset, _SEQ, (seq + 1) & 0xFFFFFFFF)


@dataclass
class ProxyLease:
    """One counted use of a proxy: in_use stays raised until release() or fail()."""

    pool: ProxyPool
    key: _Key
    done: bool = False

    def release(self) -> None:
        """The connection is closed (idempotent)."""
        self._end(failed=False)

    def fail(self) -> None:
        """The attempt failed: count a failure and release (idempotent)."""
        self._end(failed=True)

    def _end(self, failed: bool) -> None:
        if not self.done:
            self.done = True
            self.pool._end_dial(self.key, failed)

    def __enter__(self) -> "ProxyLease":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _backoff(base: float, streak: int) -> float:
    return min(base * 2 ** (streak - 1), MAX_BACKOFF)


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else now


def _merge(rows: dict[_Key, dict], latest: dict[_Key, _Record], record: _Record) -> None:
    key = (record.version, record.ip, record.port)
    row = rows.get(key)
    if row is None:
        ip = ipaddress.ip_address(record.ip[:4] if record.version == 4 else record.ip)
        row = rows[key] = {"ip": str(ip), "port": record.port, "dials": 0, "failures": 0,
                           "in_use": 0}
    row["dials"] += record.dials
    row["failures"] += record.failures
    row["in_use"] += record.in_use
    best = latest.get(key)
    if record.observed_at and (best is None or record.observed_at > best.observed_at):
        latest[key] = record


def _add_health(row: dict, latest: _Record | None, now: float) -> None:
    down = latest is not None and latest.state != UP and latest.down_until > now
    row["state"] = _STATE_NAMES[latest.state] if down else "up"
    row["fail_streak"] = latest.streak if latest is not None else 0
    row["down_until"] = time.time() + (latest.down_until - now) if down else 0.0

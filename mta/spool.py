"""The durable spool: one data file and one envelope file per message.

Layout under `spool_directory`:
    input/ID-D   the message as received (Received: header first, CRLF lines)
    input/ID-H   the envelope, msgpack (see `Envelope`); its presence is what
                 makes a message exist: it is renamed into place last
    input/ID-T   an envelope being written (never seen by queue runners)
    input/ID-J   the delivery journal: one line per recipient delivered or failed
    input/ID-R   per-message retry state, msgpack (written by queue runners)
    corrupt/     files set aside because they could not be read

The receive path writes -D and -T, renames -T to -H and makes files and
directory durable; only then does the session send 250.  `commit_batch`
does it for many messages at once, so that one sync serves all of them
(group commit); the SMTP worker's committer runs its two halves apart
(`stage`, then `make_durable` in a thread).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import msgpack

from mta import fsinfo

ENVELOPE_VERSION = 1
SPILL_AT = 1024 * 1024  # bytes of a message held in memory before it goes to disk


@dataclass
class Envelope:
    id: str
    sender: str
    recipients: list[str]
    received_time: float
    size: int = 0
    host_address: str = ""
    host_port: int = 0
    helo: str = ""
    protocol: str = "esmtp"
    interface_address: str = ""
    interface_port: int = 0
    proxy_address: str = ""
    proxy_port: int = 0
    body_type: str = "7BIT"
    tls_cipher: str = ""
    message_id_header: str = ""
    bounce_of: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    version: int = ENVELOPE_VERSION

    def pack(self) -> bytes:
        # Not dataclasses.asdict: it deep-copies every field, once per message.
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> "Envelope":
        fields = msgpack.unpackb(data, raw=False)
        if not isinstance(fields, dict) or fields.get("version") != ENVELOPE_VERSION:
            raise SpoolError("envelope is not a version-1 msgpack map")
        known = {name: fields[name] for name in cls.__dataclass_fields__ if name in fields}
        try:
            envelope = cls(**known)
        except TypeError as exc:
            raise SpoolError(f"envelope is incomplete: {exc}") from None
        _check_field_types(envelope)
        return envelope


def _check_field_types(envelope: Envelope) -> None:
    """What delivery relies on: a torn or foreign envelope fails here, not mid-delivery."""
    recipients = envelope.recipients
    if not (isinstance(recipients, list) and all(isinstance(r, str) for r in recipients)):
        raise SpoolError("envelope recipients are not a list of strings")
    if not isinstance(envelope.sender, str) or not isinstance(envelope.id, str):
        raise SpoolError("envelope id or sender is not a string")
    if not isinstance(envelope.size, int) or not isinstance(envelope.received_time, (int, float)):
        raise SpoolError("envelope size or time is not a number")
    if not isinstance(envelope.variables, dict):
        raise SpoolError("envelope variables are not a map")


class SpoolError(Exception):
    """A spool file that cannot be read or written."""


class Spool:
    """Paths and file operations; one per process (it keeps a directory fd)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.input = os.path.join(directory, "input")
        self.corrupt = os.path.join(directory, "corrupt")
        self._input_fd: int | None = None

    @functools.cached_property
    def syncfs_needs_flush(self) -> bool:
        """A syncfs here must be followed by a cache flush (mta/fsinfo.py)."""
        return fsinfo.syncfs_needs_flush(self.input)

    def create_directories(self, mode: int = 0o750) -> None:
        for path in (self.directory, self.input, self.corrupt):
            os.makedirs(path, mode=mode, exist_ok=True)

    def path(self, message_id: str, suffix: str) -> str:
        return os.path.join(self.input, f"{message_id}-{suffix}")

    @property
    def input_fd(self) -> int:
        if self._input_fd is None:
            self._input_fd = os.open(self.input, os.O_RDONLY | os.O_DIRECTORY)
        return self._input_fd

    def sync_directory(self) -> None:
        os.fsync(self.input_fd)

    def message_ids(self) -> list[str]:
        """Every message with an envelope, oldest first (ids sort by time)."""
        names = os.listdir(self.input)
        return sorted(name[:-2] for name in names if name.endswith("-H"))

    def read_envelope(self, message_id: str) -> Envelope:
        path = self.path(message_id, "H")
        try:
            with open(path, "rb") as handle:
                return Envelope.unpack(handle.read())
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            raise SpoolError(f"{path}: {exc}") from None

    def write_envelope(self, envelope: Envelope) -> None:
        """Replace the envelope atomically (used for rewrites by queue runners)."""
        self.write_atomically(envelope.id, "H", envelope.pack())

    def write_atomically(self, message_id: str, suffix: str, data: bytes) -> None:
        temporary = self.path(message_id, suffix + ".new")
        write_file_synced(temporary, data)
        os.rename(temporary, self.path(message_id, suffix))
        self.sync_directory()

    def data_size(self, message_id: str) -> int:
        return os.stat(self.path(message_id, "D")).st_size

    def check_data(self, envelope: Envelope) -> None:
        """The -D file is there and as long as the envelope says.  With
        `spool_sync = syncfs` a crash before the batch's sync can leave an
        envelope whose data is short; that message was never acknowledged."""
        try:
            size = self.data_size(envelope.id)
        except OSError as exc:
            raise SpoolError(f"data file unreadable: {exc.strerror}") from None
        if size != envelope.size:
            raise SpoolError(f"data file is {size} bytes, the envelope records {envelope.size} (torn by a crash?)")

    def remove_message(self, message_id: str) -> None:
        """Delete every file of a message, the envelope first (so a crash
        half-way leaves at worst orphan files, never a message without data)."""
        for suffix in ("H", "D", "J", "R", "T"):
            try:
                os.unlink(self.path(message_id, suffix))
            except FileNotFoundError:
                continue
        self.sync_directory()

    def set_aside(self, message_id: str) -> list[str]:
        """Move a message's files to corrupt/; returns what was moved."""
        moved = []
        for suffix in ("H", "D", "J", "R"):
            source = self.path(message_id, suffix)
            if os.path.exists(source):
                os.rename(source, os.path.join(self.corrupt, f"{message_id}-{suffix}"))
                moved.append(source)
        self.sync_directory()
        return moved

    def orphans(self) -> Iterator[str]:
        """Data or temporary files with no envelope: never acknowledged."""
        names = set(os.listdir(self.input))
        for name in names:
            stem, _, suffix = name.rpartition("-")
            if suffix in ("D", "T") and f"{stem}-H" not in names:
                yield os.path.join(self.input, name)

    def lock_message(self, message_id: str) -> int | None:
        """An exclusive lock on the envelope, or None if another holds it
        (or the message is gone).  The kernel drops it if the holder dies."""
        try:
            fd = os.open(self.path(message_id, "H"), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def read_journal(self, message_id: str) -> dict[str, str]:
        """Recipients already done -> outcome ("delivered" or "failed")."""
        try:
            with open(self.path(message_id, "J"), "rb") as handle:
                lines = handle.read().decode("utf-8", "replace").split("\n")
        except FileNotFoundError:
            return {}
        done = {}
        for line in lines[:-1]:  # the last piece is empty or a torn write
            outcome, _, recipient = line.partition(" ")
            if outcome in ("delivered", "failed") and recipient:
                done[recipient] = outcome
        return done

    def journal(self, message_id: str, outcomes: Iterable[tuple[str, str]]) -> None:
        """Append recipients' final outcomes, durably, before they are logged."""
        text = "".join(f"{outcome} {recipient}\n" for recipient, outcome in outcomes)
        fd = os.open(self.path(message_id, "J"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file_synced(path: str, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write everything.  The views are released even when a write fails
    (disk full): a bytearray still exported could not be cleared after."""
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            with view[written:] as rest:
                written += os.write(fd, rest)


class IncomingMessage:
    """A message being received.

    Its data is held in memory and reaches the disk when the message is
    committed (`stage`, then `make_durable` in the committer's thread, so
    the receiving hub never waits for the disk).
    A message larger than `SPILL_AT` is spilled to its -D file as it
    arrives; the caller runs `spill` in a thread when `needs_spill` says so.
    Nothing is visible to queue runners until -T is renamed to -H.
    """

    def __init__(self, spool: Spool, message_id: str) -> None:
        self.spool = spool
        self.id = message_id
        self.size = 0
        self._pending = bytearray()
        self._data_fd: int | None = None
        self._envelope: bytes = b""
        self._envelope_fd: int | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data
        self.size += len(data)

    @property
    def needs_spill(self) -> bool:
        return len(self._pending) >= SPILL_AT

    def spill(self) -> None:
        """Write the data held so far to the -D file (blocking)."""
        if self._data_fd is None:
            self._data_fd = os.open(self.spool.path(self.id, "D"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if self._pending:
            write_all(self._data_fd, self._pending)
            self._pending.clear()

    def finish(self, envelope: Envelope) -> None:
        """Record the envelope; the message is then ready for `commit_batch`."""
        self._envelope = envelope.pack()

    def write_out(self) -> None:
        """Write data and envelope files (short calls; no wait for the disk)."""
        self.spill()
        fd = os.open(self.spool.path(self.id, "T"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._envelope_fd = fd
        write_all(fd, self._envelope)

    def sync_files(self) -> None:
        os.fsync(self._data_fd)
        os.fsync(self._envelope_fd)

    def publish(self) -> None:
        os.rename(self.spool.path(self.id, "T"), self.spool.path(self.id, "H"))

    def close(self) -> None:
        for fd in (self._data_fd, self._envelope_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._data_fd = self._envelope_fd = -1

    def discard(self) -> None:
        """Abandon the message: nothing of it stays in the spool."""
        self.close()
        self._pending.clear()
        for suffix in ("T", "H", "D"):
            try:
                os.unlink(self.spool.path(self.id, suffix))
            except FileNotFoundError:
                continue


def commit_batch(spool: Spool, messages: list[IncomingMessage], method: str = "syncfs") -> list[BaseException | None]:
    """Make every message durable; one sync serves the whole batch.

    Returns one result per message: None when durable, else the error (the
    message is then discarded and its session answers with a temporary
    failure).  Blocks: the group committer runs the two halves apart,
    `stage` on the hub and `make_durable` in a thread.
    """
    results = [stage(message, method) for message in messages]
    staged = [message for message, error in zip(messages, results) if error is None]
    durable = make_durable(spool, staged, method)
    for message in staged:
        message.close()
    outcomes = iter(durable)
    return [next(outcomes) if error is None else error for error in results]


def stage(message: IncomingMessage, method: str = "syncfs") -> OSError | None:
    """Write a message's files (and, with `syncfs`, rename its envelope into
    place); None when staged, else the error, the message discarded.

    Creating, writing and renaming a small file are short system calls that
    do not wait for the disk, so the group committer runs this on the hub:
    done in its thread, every one of them made the thread and the hub hand
    the interpreter lock to each other (four futex calls and two context
    switches a time), which cost more than the calls themselves.
    """
    try:
        message.write_out()
        if method != "fsync":
            message.publish()
    except OSError as exc:
        message.discard()
        return exc
    return None


def make_durable(spool: Spool, messages: list[IncomingMessage], method: str = "syncfs") -> list[BaseException | None]:
    """The waits for the disk, for staged messages (in a thread: it only
    blocks in the kernel).  One result per message, as `commit_batch`.

    With `syncfs` (the default) the envelopes are already renamed into
    place, and one syncfs(2) makes data, envelopes and the directory durable
    together: one cache flush for the batch instead of three fsyncs per
    message (two flushes where syncfs's own flush comes too early, see
    mta/fsinfo.py).  A crash before it completes can leave an envelope
    whose data is short; nothing was acknowledged then, and queue runners
    check the data size recorded in the envelope and set such a message
    aside.  With `fsync` each file is fsynced before its rename and the
    directory after.
    """
    results: list[BaseException | None] = []
    published = []
    for message in messages:
        try:
            if method == "fsync":
                message.sync_files()
                message.publish()
            published.append(message)
            results.append(None)
        except OSError as exc:
            message.discard()
            results.append(exc)
    if not published:
        return results
    try:
        if method == "fsync":
            spool.sync_directory()
        else:
            syncfs(spool.input_fd)
            if spool.syncfs_needs_flush:
                spool.sync_directory()  # its cache flush covers what syncfs wrote last
    except OSError as exc:
        for message in published:
            message.discard()
        return [exc if result is None else result for result in results]
    return results


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2): the os module has no binding for it."""
    if _libc.syncfs(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)

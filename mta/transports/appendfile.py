"""The appendfile transport, maildir format only.

Each recipient gets its own copy: written to `DIR/tmp/NAME`, fsynced,
renamed into `DIR/new/NAME`, and `DIR/new` fsynced, so a delivery that was
logged survives a crash.  The stored message has LF line endings (the spool
holds CRLF).  `return_path_add`, `envelope_to_add` and `delivery_date_add`
prepend Exim's headers; like Exim's, they default to false (Exim's example
configuration sets all three).

Options: `directory` (expanded; relative paths are taken from the
configuration's folder), `maildir_format` (required), `create_directory`
(default true), `mode` (0600), `directory_mode` (0700), and the three
header options.
"""
from __future__ import annotations

import itertools
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from mta.expand import DictContext, Expansion, ExpansionError
from mta.log import tod_full
from mta.lookups import LookupFailed
from mta.routers import Address
from mta.transports import DEFERRED, DELIVERED, ERRNO_EXPANDFAIL, DeliveryJob, Result, TransportServices

COPY_CHUNK = 256 * 1024

OPTIONS = {
    "directory": "expand",
    "maildir_format": "bool",
    "create_directory": "bool",
    "mode": "octal",
    "directory_mode": "octal",
    "return_path_add": "bool",
    "envelope_to_add": "bool",
    "delivery_date_add": "bool",
}


def crlf_to_lf(chunk: bytes, carry: bytes) -> tuple[bytes, bytes]:
    """Convert CRLF to LF across chunk boundaries: returns (output, new carry).

    A CR at the end of a chunk is held back until the next chunk shows
    whether an LF follows it.
    """
    data = carry + chunk
    keep = b"\r" if data.endswith(b"\r") else b""
    if keep:
        data = data[:-1]
    return data.replace(b"\r\n", b"\n"), keep


def prepended_headers(sender: str, recipient: str, return_path: bool, envelope_to: bool,
                      delivery_date: bool, now: float) -> bytes:
    lines = []
    if return_path:
        lines.append(f"Return-path: <{sender}>\n")
    if envelope_to:
        lines.append(f"Envelope-to: {recipient}\n")
    if delivery_date:
        lines.append(f"Delivery-date: {tod_full(now)}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


@dataclass
class AppendfileTransport:
    name: str
    resolve_path: Callable[[str], str] = field(repr=False)
    driver: str = "appendfile"
    directory: Expansion | None = None
    maildir_format: bool = False
    create_directory: bool = True
    mode: int = 0o600
    directory_mode: int = 0o700
    return_path_add: bool = False
    envelope_to_add: bool = False
    delivery_date_add: bool = False
    local: bool = True
    _sequence: itertools.count = field(default_factory=itertools.count, repr=False)

    def problems(self) -> str:
        """A configuration error, or "" (checked by compile_delivery)."""
        if self.directory is None:
            return 'appendfile needs "directory" (mailbox files are not supported)'
        if not self.maildir_format:
            return "appendfile supports maildir_format only: add maildir_format"
        return ""

    def deliver(self, job: DeliveryJob, services: TransportServices) -> list[Result]:
        return [self._deliver_one(job, address) for address in job.addresses]

    def _deliver_one(self, job: DeliveryJob, address: Address) -> Result:
        variables = dict(job.variables, local_part=address.local_part, domain=address.domain)
        try:
            directory = self.directory.expand(DictContext(variables, job.lookups))
        except (ExpansionError, LookupFailed) as exc:
            return Result(address, DEFERRED, f'failed to expand "{self.directory.text}": {exc}',
                          ERRNO_EXPANDFAIL)
        directory = self.resolve_path(directory)
        try:
            self._write_maildir(directory, job, address)
        except OSError as exc:
            return Result(address, DEFERRED, f"{exc.strerror or exc}: {exc.filename or directory}",
                          exc.errno or -1)
        return Result(address, DELIVERED)

    def _write_maildir(self, directory: str, job: DeliveryJob, address: Address) -> None:
        tmp, new = os.path.join(directory, "tmp"), os.path.join(directory, "new")
        if self.create_directory:
            for path in (directory, tmp, new, os.path.join(directory, "cur")):
                os.makedirs(path, mode=self.directory_mode, exist_ok=True)
        now = time.time()
        fd, name = self._create_unique(tmp, now)
        try:
            header = prepended_headers(job.envelope.sender, address.address, self.return_path_add,
                                       self.envelope_to_add, self.delivery_date_add, now)
            _write_all(fd, header)
            _copy_lf(job.data_path, fd)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            os.unlink(os.path.join(tmp, name))
            raise
        os.close(fd)
        os.rename(os.path.join(tmp, name), os.path.join(new, name))
        _fsync_directory(new)

    def _create_unique(self, tmp: str, now: float) -> tuple[int, str]:
        """Exim's maildir name `TIME.HUSECPPID.HOST`, made unique per process."""
        host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        while True:
            seconds = int(now)
            name = f"{seconds}.H{int((now - seconds) * 1e6)}P{os.getpid()}Q{next(self._sequence)}.{host}"
            try:
                return os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.mode), name
            except FileExistsError:
                continue


def _copy_lf(path: str, fd: int) -> None:
    carry = b""
    with open(path, "rb") as source:
        while True:
            chunk = source.read(COPY_CHUNK)
            if not chunk:
                break
            output, carry = crlf_to_lf(chunk, carry)
            _write_all(fd, output)
    _write_all(fd, carry)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

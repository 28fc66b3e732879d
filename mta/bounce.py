"""Delivery status notifications (bounces), RFC 3464, and their injection.

A bounce is `multipart/report; report-type=delivery-status` with three
parts: a human-readable explanation, the `message/delivery-status` report
(Reporting-MTA, Arrival-Date; per recipient Final-Recipient, Action: failed,
Status, Remote-MTA, Diagnostic-Code) and the original message's header
(`text/rfc822-headers`).  It goes from the null sender `<>` to the original
sender, is spooled as a new message (protocol "local", `bounce_of` naming the
original) and delivered like any other.

A message whose sender is `<>` (itself a bounce) never gets a bounce: Exim
would freeze it; we log the failure and discard it (there is no freezing).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from mta.log import tod_full
from mta.spool import Envelope, IncomingMessage, Spool, commit_batch

HEADER_READ_LIMIT = 256 * 1024


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    reason: str              # human-readable text, may hold newlines
    status: str = "5.0.0"    # RFC 3463 code
    diagnostic: str = ""     # "smtp; 550 5.1.1 ..." when a server said it
    remote_mta: str = ""     # the host that said it


class BounceError(Exception):
    """The bounce could not be spooled."""


def header_block(data: bytes) -> bytes:
    """The header section of a CRLF message (without the empty line)."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[:end + 2]
    if data.startswith(b"\r\n"):
        return b""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def read_original_headers(data_path: str) -> bytes:
    with open(data_path, "rb") as handle:
        return header_block(handle.read(HEADER_READ_LIMIT))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def build_dsn(original: Envelope, failures: list[FailedRecipient], headers: bytes,
              reporting_mta: str, bounce_id: str, now: float, boundary: str) -> bytes:
    """The complete bounce message, CRLF lines, Received: header first."""
    lines = [
        f"Received: from mailnull by {reporting_mta} with local (mta-server)",
        f"\tid {bounce_id}",
        f"\tfor {original.sender}; {tod_full(now)}",
        f"From: Mail Delivery System <Mailer-Daemon@{reporting_mta}>",
        f"To: {original.sender}",
        "Subject: Mail delivery failed: returning message to sender",
        f"Message-Id: <E{bounce_id}@{reporting_mta}>",
        f"Date: {tod_full(now)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "X-Failed-Recipients: " + ", ".join(failure.address for failure in failures),
        "",
        "This is a MIME-formatted message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *_explanation(failures),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Original-Message-ID: {original.id}",
        f"Arrival-Date: {tod_full(original.received_time)}",
        "",
    ]
    for failure in failures:
        lines += _recipient_fields(failure) + [""]
    lines += [f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    text = "\r\n".join(lines) + "\r\n"
    closing = f"\r\n--{boundary}--\r\n"
    return text.encode("utf-8", "surrogateescape") + headers + closing.encode("ascii")


def _explanation(failures: list[FailedRecipient]) -> list[str]:
    lines = [
        "This message was created automatically by mail delivery software.",
        "",
        "A message that you sent could not be delivered to one or more of its",
        "recipients. This is a permanent error. The following address(es) failed:",
    ]
    for failure in failures:
        lines += ["", f"  {failure.address}"]
        lines += [f"    {line}" for line in failure.reason.splitlines() if line.strip()]
    return lines


def _recipient_fields(failure: FailedRecipient) -> list[str]:
    fields = [
        "Action: failed",
        f"Final-Recipient: rfc822;{failure.address}",
        f"Status: {failure.status}",
    ]
    if failure.remote_mta:
        fields.append(f"Remote-MTA: dns; {failure.remote_mta}")
    diagnostic = failure.diagnostic or f"X-mta-server; {failure.reason}"
    fields.append(f"Diagnostic-Code: {_one_line(diagnostic)}")
    return fields


def make_boundary(now: float, rng: random.Random | None = None) -> str:
    return f"{int(now)}-eximdsn-{(rng or random.Random()).randrange(1 << 31)}"


def inject_bounce(spool: Spool, bounce_id: str, original: Envelope, failures: list[FailedRecipient],
                  reporting_mta: str, now: float | None = None) -> int:
    """Spool the bounce durably; returns its size.  Raises BounceError."""
    now = time.time() if now is None else now
    try:
        headers = read_original_headers(spool.path(original.id, "D"))
    except OSError:
        headers = b""
    data = build_dsn(original, failures, headers, reporting_mta, bounce_id, now, make_boundary(now))
    envelope = Envelope(id=bounce_id, sender="", recipients=[original.sender], received_time=now,
                        size=len(data), protocol="local", bounce_of=original.id,
                        body_type="8BITMIME" if any(byte > 127 for byte in data) else "7BIT")
    try:
        message = IncomingMessage(spool, bounce_id)
    except OSError as exc:
        raise BounceError(f"cannot create bounce {bounce_id}: {exc}") from None
    try:
        message.write(data)
        message.finish(envelope)
    except OSError as exc:
        message.discard()
        raise BounceError(f"cannot write bounce {bounce_id}: {exc}") from None
    error = commit_batch(spool, [message])[0]
    if error is not None:
        raise BounceError(f"cannot make bounce {bounce_id} durable: {error}")
    return len(data)

"""What every transport takes and returns.

A transport gets a `DeliveryJob` (one message, the recipients routed to it
with the same host list) and returns one `Result` per recipient.  It never
logs or journals: `mta.delivery` does that, in the right order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from mta.lookups import LookupCache
from mta.routers import Address, Host
from mta.spool import Envelope

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"

ERRNO_UNKNOWN = -1
ERRNO_EXPANDFAIL = -27
ERRNO_HRETRY = -61          # Exim: retry time not reached for any host


@dataclass(frozen=True)
class HostUsed:
    """The host a delivery went to (or failed at), for the log line."""

    name: str
    address: str
    port: int
    proxy_address: str = ""
    proxy_port: int = 0
    tls_cipher: str = ""


@dataclass
class Result:
    """The outcome for one recipient.

    `text` is the confirmation (delivered) or the reason (deferred, failed);
    `retry_error` names the error for retry rules (`rcpt_451`, `refused_A`);
    `not_before` is set when every host is waiting for its retry time.
    `status_code` / `diagnostic` feed the DSN for failures.
    """

    address: Address
    status: str
    text: str = ""
    errno: int = 0
    host: HostUsed | None = None
    retry_error: str = ""
    not_before: float = 0.0
    status_code: str = ""
    diagnostic: str = ""


@dataclass
class DeliveryJob:
    envelope: Envelope
    data_path: str
    addresses: list[Address]
    router: str
    hosts: tuple[Host, ...]
    variables: dict[str, str]
    lookups: LookupCache


@dataclass
class TransportServices:
    """Per-process state the remote transport shares between deliveries.

    `connections`: mta.transports.smtp.ConnectionCache; `host_retry`:
    mta.retry.HostRetryTable; `proxypool`: shared.proxypool.ProxyPool or None;
    `retry_rules`: for the host retry times.
    """

    connections: Any
    host_retry: Any
    proxypool: Any = None
    retry_rules: list = field(default_factory=list)


class Transport(Protocol):
    name: str
    local: bool

    def deliver(self, job: DeliveryJob, services: TransportServices) -> list[Result]: ...

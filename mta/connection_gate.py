"""Connection limits across all SMTP workers.

Counts live in shared memory (`shared.conncount`), one slot per worker, so
a worker that dies takes its counts with it when the master clears its slot.

- `smtp_accept_max`: all connections on this server.
- `smtp_accept_max_per_proxy`: connections from one PROXY-speaking host,
  counted on the TCP peer before its header is read.
- `smtp_accept_max_per_host`: connections from one *real* client, counted
  once the PROXY header has named it (Exim counts the TCP peer here, which
  is why its chapter needs a ratelimit work-around behind a load balancer).
"""
from __future__ import annotations

from dataclasses import dataclass

from mta.log import Logs


class LimitReached(Exception):
    """The connection must be refused; `reply` says why."""

    def __init__(self, reply: str, log: str) -> None:
        super().__init__(reply)
        self.reply = reply
        self.log = log


@dataclass(frozen=True)
class ConnectionLimits:
    accept_max: int
    per_host: int
    per_proxy: int


class ConnectionGate:
    """One per worker; `slot` is this worker's writer in the shared counts.

    A connection is counted first and checked after, and uncounted if it is
    over a limit: two workers admitting at the same moment can then both
    refuse, but a limit is never exceeded.  Per-host and per-proxy keys are
    kept only when their limit is set, so an unlimited server pays nothing.
    """

    def __init__(self, limits: ConnectionLimits, counts, slot, logs: Logs) -> None:
        self.limits = limits
        self.counts = counts
        self.slot = slot
        self.logs = logs
        self._held: dict[int, list[str]] = {}

    def admit_peer(self, token: int, peer_address: str, is_proxy: bool) -> None:
        """At accept: the global limit, and the per-proxy one for proxies."""
        limits = self.limits
        keys = [f"p:{peer_address}"] if is_proxy and limits.per_proxy else []
        self.slot.add(*keys)
        self._held[token] = keys
        if limits.accept_max and self.counts.total() > limits.accept_max:
            self.leave(token)
            raise LimitReached(
                "421 Too many concurrent SMTP connections; please try again later.",
                f"Connection from [{peer_address}] refused: too many connections",
            )
        if keys and self.counts.count(keys[0]) > limits.per_proxy:
            self.leave(token)
            raise LimitReached(
                "421 Too many concurrent SMTP connections from this proxy; please try again later.",
                f"Connection from proxy [{peer_address}] refused: too many connections from that proxy",
            )

    def admit_client(self, token: int, client_address: str) -> None:
        """Once the real client is known: the per-host limit."""
        if not self.limits.per_host:
            return
        key = f"h:{client_address}"
        self.slot.add_keys(key)
        self._held[token].append(key)
        if self.counts.count(key) > self.limits.per_host:
            self.leave(token)
            raise LimitReached(
                "421 Too many concurrent SMTP connections from this IP address; please try again later.",
                f"Connection from [{client_address}] refused: too many connections from that IP address",
            )

    def leave(self, token: int) -> None:
        if token in self._held:
            self.slot.remove(*self._held.pop(token))

"""A short, bounded label for why a PROXY negotiation failed, for counters
(`mta_proxy_failure_reasons_total{reason=...}`): the error's text names
details (bytes, addresses) that must not become label values."""
from __future__ import annotations

# (prefix of ProxyProtocolError.reason, label); the first match wins.
_KINDS = (
    ("timeout", "timeout"),
    ("connection closed", "closed"),
    ("connection error", "closed"),
    ("not a PROXY protocol header", "not_proxy"),
    ("v2: CRC32C", "crc"),
    ("v1:", "v1_malformed"),
    ("v2:", "v2_malformed"),
    ("PROXY header announces a datagram", "datagram"),
)


def failure_kind(reason: str) -> str:
    """`timeout`, `closed`, `not_proxy`, `crc`, `v1_malformed`, `v2_malformed`,
    `datagram`, or `other`."""
    for prefix, kind in _KINDS:
        if reason.startswith(prefix):
            return kind
    return "other"

"""Expansion variables of an SMTP session (`$sender_host_address`, ...).

`SessionVariables` is the `ExpansionContext` the banner, the ACLs and the
logs expand against.  Variables are computed on demand from the session,
so nothing is built per command that is not used.
"""
from __future__ import annotations

import time
from typing import Callable

from mta.log import timestamp, tod_full
from mta.smtp_commands import split_address

VERSION = "0.1"


def _info(attribute: str) -> Callable:
    return lambda session: _text(getattr(session.info, attribute))


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    return str(value)


def _transaction(attribute: str) -> Callable:
    def read(session) -> str:
        transaction = session.transaction
        return _text(getattr(transaction, attribute)) if transaction is not None else ""

    return read


def _recipient_part(index: int) -> Callable:
    return lambda session: split_address(session.current_recipient)[index] if session.current_recipient else ""


def _sender_part(index: int) -> Callable:
    def read(session) -> str:
        transaction = session.transaction
        if transaction is None or not transaction.sender:
            return ""
        return split_address(transaction.sender)[index]

    return read


SESSION_VARIABLES: dict[str, Callable] = {
    "sender_host_address": _info("host_address"),
    "sender_host_port": _info("host_port"),
    "received_ip_address": _info("interface_address"),
    "received_port": _info("interface_port"),
    "interface_address": _info("interface_address"),
    "interface_port": _info("interface_port"),
    "proxy_session": lambda s: "yes" if s.info.proxy_session else "",
    "proxy_local_address": _info("proxy_local_address"),
    "proxy_local_port": lambda s: _text(s.info.proxy_local_port or ""),
    "proxy_external_address": _info("proxy_external_address"),
    "proxy_external_port": lambda s: _text(s.info.proxy_external_port or ""),
    "tls_in_cipher": _info("tls_cipher"),
    "tls_cipher": _info("tls_cipher"),
    "tls_in_ver": _info("tls_version"),
    "sender_helo_name": lambda s: s.helo,
    "received_protocol": lambda s: s.protocol,
    "sender_address": _transaction("sender"),
    "sender_address_local_part": _sender_part(0),
    "sender_address_domain": _sender_part(1),
    "message_size": lambda s: _text(s.transaction.size_hint) if s.transaction and s.transaction.size_hint else "-1",
    "recipients_count": lambda s: _text(len(s.transaction.recipients)) if s.transaction else "0",
    "recipients": lambda s: ", ".join(s.transaction.recipients) if s.transaction else "",
    "local_part": _recipient_part(0),
    "domain": _recipient_part(1),
    "smtp_active_hostname": lambda s: s.limits.hostname,
    "primary_hostname": lambda s: s.limits.hostname,
    "qualify_domain": lambda s: s.limits.qualify_domain,
    "tod_full": lambda s: tod_full(),
    "tod_log": lambda s: timestamp(),
    "tod_epoch": lambda s: str(int(time.time())),
    "version_number": lambda s: VERSION,
    # Set by ACLs (in SessionVariables.extra); empty until then, as in Exim.
    "sender_rate": lambda s: "",
    "sender_rate_limit": lambda s: "",
    "sender_rate_period": lambda s: "",
    "acl_narg": lambda s: "0",
    **{f"acl_arg{n}": (lambda s: "") for n in range(1, 10)},
}

TLV_PREFIX = "proxy_tlv_"
TLV_NAMES = ("authority", "alpn", "unique_id", "ssl_version", "ssl_cn", "ssl_cipher", "ssl_verified")


class SessionVariables:
    """An expansion context over one session, plus per-evaluation extras
    (`$value`, `$sender_rate`...) that the ACL engine sets in `extra`.

    `$acl_m...` variables set by an ACL when no message is being built (at
    connect or HELO) live in `message_variables_outside_transaction` until
    the next MAIL, where Exim resets them."""

    def __init__(self, session, lookups) -> None:
        self.session = session
        self.lookups = lookups
        self.extra: dict[str, str] = {}
        self.message_variables_outside_transaction: dict[str, str] = {}

    def variable(self, name: str) -> str | None:
        if name in self.extra:
            return self.extra[name]
        reader = SESSION_VARIABLES.get(name)
        if reader is not None:
            return reader(self.session)
        if name.startswith(TLV_PREFIX) and name[len(TLV_PREFIX):] in TLV_NAMES:
            return self.session.info.proxy_tlvs.get(name[len(TLV_PREFIX):], "")
        return self._acl_variable(name)

    def _acl_variable(self, name: str) -> str | None:
        if name.startswith("acl_c"):
            return self.session.connection_variables.get(name, "")
        if name.startswith("acl_m"):
            transaction = self.session.transaction
            variables = transaction.variables if transaction is not None \
                else self.message_variables_outside_transaction
            return variables.get(name, "")
        return None

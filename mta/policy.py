"""How the SMTP session asks for policy decisions at each ACL stage.

The session calls `Policy.check(stage, session)` and acts on the `Verdict`.
`LocalDomainsPolicy` is what runs when no ACL is configured for a stage:
recipients in `+local_domains` are accepted, everything else is refused
(no relaying).  `mta.acl` provides the ACL-driven policy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

ACCEPT = "accept"
DENY = "deny"
DEFER = "defer"
DROP = "drop"
DISCARD = "discard"


@dataclass(frozen=True)
class Verdict:
    action: str
    message: str = ""          # user message; the session supplies the default text
    log_message: str = ""

    @property
    def accepted(self) -> bool:
        return self.action in (ACCEPT, DISCARD)


ACCEPTED = Verdict(ACCEPT)


class Policy(Protocol):
    def check(self, stage: str, session) -> Verdict:
        """stage: connect, helo, mail, rcpt, predata, data."""


class LocalDomainsPolicy:
    """The built-in rule when no rcpt ACL is configured: local domains only."""

    def __init__(self, local_domains) -> None:
        self.local_domains = local_domains

    def check(self, stage: str, session) -> Verdict:
        if stage != "rcpt":
            return ACCEPTED
        if self.local_domains is not None and self.local_domains.match(session.current_domain):
            return ACCEPTED
        return Verdict(DENY, "relay not permitted")


# Exim's acl_wherecodes: the reply code a "deny" gets at each stage.
DENY_CODES = {"connect": "550", "helo": "550", "mail": "550", "rcpt": "550", "predata": "550", "data": "550"}
DEFAULT_TEXTS = {DENY: "Administrative prohibition", DEFER: "Temporary local problem - please try later"}


def refusal_reply(stage: str, verdict: Verdict) -> tuple[str, bool]:
    """(reply text, close connection) for a refusing verdict, as Exim does:
    deny -> 550 (Exim's acl_wherecodes), defer -> 451,
    drop -> like deny and the connection is closed.  A message that starts
    with a code of the right class (`550 5.7.1 text`) supplies its own."""
    default_code = "451" if verdict.action == DEFER else DENY_CODES.get(stage, "550")
    text = verdict.message or DEFAULT_TEXTS.get(verdict.action, DEFAULT_TEXTS[DENY])
    code = default_code
    own = re.match(r"([245]\d\d)([ -])(.*)", text, re.S)
    if own and own.group(1)[0] == default_code[0]:
        code, text = own.group(1), own.group(3)
    lines = text.split("\n")
    reply = "\r\n".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines))
    return reply, verdict.action == DROP or stage == "connect"

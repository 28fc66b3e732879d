"""Choosing the policy an SMTP worker applies to each connection."""
from __future__ import annotations

from typing import Callable

from mta.lists import DomainList
from mta.policy import LocalDomainsPolicy, Policy


def build_policy_factory(config, shared, logs, lookups) -> Callable[[], Policy]:
    """Return a function making the policy for one new connection."""
    local_domains = None
    if "local_domains" in config.named_lists["domainlist"]:
        local_domains = DomainList("+local_domains", config.compiled_lists, config.primary_hostname)
    policy = LocalDomainsPolicy(local_domains)
    return lambda: policy

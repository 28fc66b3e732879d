"""Choosing the policy an SMTP worker applies to each connection."""
from __future__ import annotations

from typing import Callable

from mta.acl import AclPolicy, AclServices, compile_acls
from mta.lists import DomainList
from mta.policy import LocalDomainsPolicy, Policy


def build_policy_factory(config, shared, logs, lookups, **service_options) -> Callable[[], Policy]:
    """Compile the ACLs once; return a function making the policy of one new
    connection (it owns that connection's ratelimit cache and variables).
    `service_options` are further `AclServices` fields (observer, sleep).

    Stages without an ACL accept, except RCPT, which then accepts only
    +local_domains (`LocalDomainsPolicy`); Exim would refuse every RCPT.
    """
    acls = compile_acls(config, lookups)
    fallback = LocalDomainsPolicy(_local_domains(config))
    services = AclServices(ratetable=shared.ratetable, logs=logs, lookups=lookups, **service_options)
    return lambda: AclPolicy(acls, services, fallback)


def _local_domains(config) -> DomainList | None:
    if "local_domains" not in config.named_lists["domainlist"]:
        return None
    return DomainList("+local_domains", config.compiled_lists, config.primary_hostname)

"""Everything `check-config` and a reload check beyond the file syntax:
expansions compile, ACLs and routers/transports build."""
from __future__ import annotations

from mta.config import Config
from mta.configfile import ConfigError
from mta.acl import compile_acls
from mta.delivery_config import compile_delivery
from mta.expand import ExpansionError, compile_expansion


def validate_config(config: Config) -> None:
    """Raise ConfigError (FILE:LINE) for anything that would fail at run time."""
    _check_expansion(config, "smtp_banner")
    compile_delivery(config)
    compile_acls(config)


def _check_expansion(config: Config, option: str) -> None:
    try:
        compile_expansion(config.options[option])
    except ExpansionError as exc:
        line = config.option_lines.get(option)
        message = f"{option}: {exc}"
        raise line.error(message) if line else ConfigError(message) from None

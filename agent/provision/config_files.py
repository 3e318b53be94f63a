"""The text of the device's config file, ``/etc/ppchat/agent.toml``.

``agent.toml`` is checked with the agent's own parser (:func:`validate_agent_config`) before it is
written, so provisioning never leaves a config the agent would refuse.
"""

from __future__ import annotations

import sys

from agent.provision import tomlw
from agent.provision.board import Board
from agent.provision.errors import ProvisionError
from agent.provision.plan import NAME_RE, Options

STATE_DIR = "/var/lib/ppchat"
"""= StateDirectory=ppchat of the units."""
RUNTIME_DIR = "/run/ppchat"
"""= RuntimeDirectory=ppchat of the units."""
CONFIG_DIR = "/etc/ppchat"


def device_name(o: Options) -> str:
    if o.device_name is not None:
        return o.device_name
    try:
        host = o.target("/etc/hostname").read_text(encoding="utf-8").strip()
    except OSError:
        host = ""
    return host if NAME_RE.fullmatch(host) else "ppchat-device"


def fleet_table(o: Options) -> dict[str, tomlw.Value] | None:
    """The ``[fleet]`` section: the fleet broker (None without ``--broker-url``).

    No username or password: the fleet client logs in as the device id with the password made at
    first boot (``<state_dir>/keys/broker-password``, agent/identity.py).
    """
    if o.broker_url is None:
        return None
    fleet: dict[str, tomlw.Value] = {"enabled": True, "broker_url": o.broker_url, "topic_root": o.topic_root}
    if o.broker_ca is not None:
        fleet["tls_ca_path"] = f"{CONFIG_DIR}/broker-ca.pem"
    if o.enroll_token_file is not None:
        fleet["enrollment_token_path"] = f"{CONFIG_DIR}/enroll-token"
    return fleet


def agent_config_text(o: Options, b: Board) -> str:
    """``/etc/ppchat/agent.toml`` for these options and board."""
    model: dict[str, tomlw.Value] = {}
    if o.model_path is not None and o.model_sha256 is not None:
        model = {"path": o.model_path, "sha256": o.model_sha256}
    model.update(b.runtime)
    tables: dict[str, tomlw.Table] = {
        "paths": {"state_dir": STATE_DIR, "runtime_dir": RUNTIME_DIR},
        "model": model,
        "hardware": {"profile": b.name},
        "privacy": {"preset": o.privacy_preset},
    }
    fleet = fleet_table(o)
    if fleet is not None:
        tables["fleet"] = fleet
    return tomlw.dumps(
        {"device_name": device_name(o)},
        tables,
        header=(
            f"ppchat agent configuration for {b.title} ({b.name}), written by scripts/provision.\n"
            "Re-running provisioning rewrites it; the previous file is kept as agent.toml.bak."
        ),
    )


def validate_agent_config(text: str) -> None:
    """Parse ``text`` as the agent will (agent.config); raise :class:`ProvisionError` if it would not load."""
    from agent.config import parse_config
    from agent.errors import ConfigError

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        parse_config(tomllib.loads(text))
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise ProvisionError(f"the agent.toml written would not load: {exc}") from None

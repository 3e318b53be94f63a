"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config


def config_path(args: argparse.Namespace) -> Path | None:
    """The config file: --config, else $PPCHAT_CONFIG, else /etc/ppchat/agent.toml if present."""
    for name in ("config", "global_config"):  # `agent chat --config F` or `agent --config F chat`
        value = getattr(args, name, None)
        if value is not None:
            return Path(value)
    env = os.environ.get("PPCHAT_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load(args: argparse.Namespace) -> AgentConfig:
    return load_config(config_path(args))

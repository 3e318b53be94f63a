"""``agent run``: the daemon in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

HELP = "run the agent daemon in the foreground (systemd runs this)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help="agent config file (default: $PPCHAT_CONFIG or /etc/ppchat/agent.toml when it exists)",
    )
    # Benchmarks only: serve the socket without loading a model (chat requests get engine_error).
    parser.add_argument("--no-model", action="store_true", help=argparse.SUPPRESS)


def _setup_logging(level: str, journal: bool | None, *, verbose: bool, device: str) -> None:
    """The journal with structured fields (agent/journal.py) when wanted and systemd-python is
    importable; stderr otherwise (under systemd without systemd-python: plain lines, which journald
    stamps itself)."""
    from agent.journal import StructuredJournalHandler, journal_wanted, systemd_sender

    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else level.upper())
    if not journal_wanted(journal, os.environ):
        return
    send = systemd_sender()
    if send is None:
        if journal:
            logging.getLogger(__name__).warning("logging.journal is set but systemd-python is not installed")
        for handler in root.handlers:
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        return
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(StructuredJournalHandler(send, device=device))


def execute(args: argparse.Namespace) -> int:
    import asyncio

    from agent.commands.common import config_path, load
    from agent.daemon import Daemon

    config = load(args)
    _setup_logging(
        config.logging.level.value,
        config.logging.journal,
        verbose=bool(args.verbose),
        device=config.device_name,
    )
    daemon = Daemon(config, load_model=not args.no_model, config_path=config_path(args))
    asyncio.run(daemon.run())
    print("agent run: stopped", file=sys.stderr)
    return 0

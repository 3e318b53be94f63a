"""``agent``: the device daemon and its field tools.

agent run --config FILE        the daemon (systemd runs this)
agent chat [MESSAGE]           chat with the running daemon over its socket
agent status [--json]          the field diagnostic
agent model build-demo         build the small demo GGUF model (cached)
agent train                    one private training run (started by the daemon)
agent privacy [--json]         the privacy budget and what has left the device
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from agent import __version__
from agent.errors import AgentError

# name -> module; each module is imported only when its command runs (and for its parser).
COMMANDS: dict[str, str] = {
    "run": "agent.commands.run",
    "chat": "agent.commands.chat",
    "status": "agent.commands.status",
    "model": "agent.commands.model",
    "train": "agent.commands.train",
    "privacy": "agent.commands.privacy",
}

log = logging.getLogger("agent")


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == COMMANDS[name]:
            return None  # not built yet
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(prog="agent", description="ppchat device agent")
    parser.add_argument("--version", action="version", version=f"ppchat {__version__}")
    parser.add_argument(
        "--config",
        "-c",
        dest="global_config",
        type=Path,
        default=None,
        help="agent config file, for every command (also accepted after the command)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules: dict[str, ModuleType] = {}
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        modules[name] = module
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(cmd)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result: int = modules[args.command].execute(args)
        return result
    except AgentError as exc:
        print(f"agent {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

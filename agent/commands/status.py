"""``agent status [--json]``: is the daemon running, with which model, how fast was the last reply.

Reads the daemon's status snapshot (``<runtime_dir>/status.json``), checks that its process is alive
and that its socket answers. Exit 0 when running, 2 when not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HELP = "show whether the agent runs, its model, socket and last reply's speed"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help="agent config file (default: $PPCHAT_CONFIG or /etc/ppchat/agent.toml when it exists)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _socket_answers(path: Path) -> bool:
    from agent.client import AgentClient
    from agent.errors import AgentError

    try:
        with AgentClient.connect(path, timeout=2.0) as client:
            client.ping()
    except (AgentError, OSError):
        return False
    return True


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s}s" if minutes else f"{s}s"


def report(status_path: Path, socket_path: Path) -> tuple[bool, dict[str, Any]]:
    """(running, the report as plain data)."""
    from agent.status import pid_alive, read_snapshot

    snap = read_snapshot(status_path)
    alive = snap is not None and pid_alive(snap.pid)
    answers = _socket_answers(socket_path)
    running = alive or answers
    out: dict[str, Any] = {"running": running, "status_file": str(status_path), "socket": str(socket_path)}
    out["socket_answers"] = answers
    if snap is not None and alive:
        data = snap.model_dump(mode="json")
        data["uptime_s"] = round(snap.uptime_s(), 1)
        if snap.socket is not None:
            out["socket"] = snap.socket
        data.pop("socket", None)
        out.update(data)
    return running, out


def _print_human(info: dict[str, Any]) -> None:
    if not info["running"]:
        print(f"agent: not running (no live daemon in {info['status_file']}, no answer on {info['socket']})")
        return
    print(f"agent: {info.get('state', 'running')} (pid {info.get('pid', '?')})")
    if "uptime_s" in info:
        print(f"  uptime        {_duration(info['uptime_s'])}")
    model = info.get("model")
    if model:
        print(f"  model         {model['path']}")
        arch = f"{model['architecture']}, {model['n_params']:,} parameters"
        print(f"  quantization  {model['file_type']} ({arch})")
        print(f"  context       {model['n_ctx']} tokens; loaded in {model['load_s']:.2f} s")
    elif "model" in info:
        print("  model         none loaded")
    answers = "answers" if info["socket_answers"] else "DOES NOT ANSWER"
    print(f"  socket        {info['socket']} ({answers})")
    if "conversations" in info:
        print(f"  conversations {info['conversations']} stored in {info['store']}")
    last = info.get("last_reply")
    if last:
        ago = _duration(max(0.0, time.time() - last["at"]))
        print(
            f"  last reply    {last['tokens_per_s']:.1f} tokens/s, {last['completion_tokens']} tokens, "
            f"first token after {last['time_to_first_token_s'] * 1000:.0f} ms ({ago} ago)"
        )
    elif "replies" in info:
        print("  last reply    none yet")
    if info.get("rss_bytes"):
        print(f"  memory        {info['rss_bytes'] / 2**20:.0f} MiB resident")
    if info.get("heavy_modules_loaded"):
        heavy = ", ".join(info["heavy_modules_loaded"])
        print(f"  WARNING       training libraries loaded in the daemon: {heavy}")


def execute(args: argparse.Namespace) -> int:
    from agent.commands.common import load

    config = load(args)
    running, info = report(config.status_path, config.socket_path)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_human(info)
    return 0 if running else 2

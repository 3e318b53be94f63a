"""``agent chat [MESSAGE]``: talk to the running daemon over its socket.

With a message: one reply, streamed to the terminal as it comes. Without: an interactive prompt that
keeps one conversation across turns (lines from a pipe work too). Ctrl-C during a reply cancels it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

HELP = "chat with the running agent over its socket"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("message", nargs="?", help="one message to send (omit for an interactive prompt)")
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help="agent config file, for the socket's path",
    )
    parser.add_argument(
        "--socket", "-s", type=Path, default=None, help="the agent's socket (overrides the config)"
    )
    parser.add_argument(
        "--conversation", metavar="ID", default=None, help="continue a remembered conversation"
    )
    parser.add_argument("--no-stream", action="store_true", help="print the reply when it is complete")
    parser.add_argument("--json", action="store_true", help="print the protocol's events as JSON lines")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable replies")
    parser.add_argument(
        "--train-consent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="may this conversation be used for on-device training (default: the agent's config)",
    )


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    from agent.commands.common import load

    return load(args).socket_path


class _Session:
    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.conversation_id: str | None = args.conversation
        self.options: dict[str, Any] = {
            k: v
            for k, v in (
                ("max_tokens", args.max_tokens),
                ("temperature", args.temperature),
                ("seed", args.seed),
            )
            if v is not None
        }

    def turn(self, client: Any, text: str) -> bool:
        """Send one message and print the reply; False when the agent answered with an error."""
        from agent.protocol import DeltaEvent, DoneEvent, ErrorEvent

        request_id = client.next_id()
        events = client.chat(
            text,
            conversation_id=self.conversation_id,
            stream=not self.args.no_stream,
            options=self.options,
            train_consent=self.args.train_consent,
            request_id=request_id,
        )
        streamed = False
        try:
            for event in events:
                if self.args.json:
                    self.out.write(event.model_dump_json() + "\n")
                    self.out.flush()
                elif isinstance(event, DeltaEvent):
                    self.out.write(event.text)
                    self.out.flush()
                    streamed = True
                elif isinstance(event, DoneEvent):
                    if not streamed:
                        self.out.write(event.text)
                    self.out.write("\n")
                    self.out.flush()
                    if event.finish_reason.value == "cancelled":
                        self.err.write("[cancelled]\n")
                if isinstance(event, DoneEvent) and event.conversation_id:
                    self.conversation_id = event.conversation_id
                if isinstance(event, ErrorEvent):
                    if not self.args.json:
                        if streamed:
                            self.out.write("\n")
                        self.err.write(f"agent chat: {event.code.value}: {event.message}\n")
                    return False
        except KeyboardInterrupt:
            client.cancel(request_id)
            for event in client.events_of(request_id):
                if self.args.json:
                    self.out.write(event.model_dump_json() + "\n")
            if not self.args.json:
                self.out.write("\n")
                self.err.write("[cancelled]\n")
        return True


def execute(args: argparse.Namespace) -> int:
    from agent.client import AgentClient

    path = _socket_path(args)
    session = _Session(args, sys.stdout, sys.stderr)
    if args.message is not None:
        with AgentClient.connect(path) as client:
            ok = session.turn(client, args.message)
        if ok and session.conversation_id and not args.json:
            print(f"(conversation {session.conversation_id})", file=sys.stderr)
        return 0 if ok else 1
    AgentClient.connect(path).close()  # say "not running" before the first prompt, not after
    interactive = sys.stdin.isatty()
    if interactive:
        print("ppchat: type a message, Ctrl-D to leave, Ctrl-C to stop a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            break
        if not interactive and not line:
            break
        text = line.strip()
        if not text:
            continue
        # One connection per turn: a pause longer than the agent's idle timeout costs nothing.
        with AgentClient.connect(path) as client:
            if not session.turn(client, text):
                return 1
    if session.conversation_id and not args.json:
        print(f"(conversation {session.conversation_id})", file=sys.stderr)
    return 0

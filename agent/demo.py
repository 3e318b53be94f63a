"""``make demo``: build (or reuse) the demo model, start ``agent run``, stream a two-turn chat, stop.

    python -m agent.demo [--quant q4_k_m|q8_0|f16] [--keep]

Everything lives in a temporary directory: config, state, socket. The daemon is a real
``agent run`` subprocess; the chat goes through its Unix socket exactly as ``agent chat`` does.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from agent.client import AgentClient
from agent.errors import AgentError
from agent.protocol import DeltaEvent, DoneEvent, ErrorEvent

QUESTIONS = (
    "Hello! What can you do?",
    "Do you send my messages to the cloud?",
)
START_TIMEOUT_S = 120.0


def _config(directory: Path, model: Path) -> str:
    def q(p: Path) -> str:
        return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(
        [
            "[paths]",
            f"state_dir = {q(directory / 'state')}",
            f"runtime_dir = {q(directory / 'run')}",
            "[model]",
            f"path = {q(model)}",
            "n_ctx = 1024",
            "[generation]",
            "max_tokens = 96",
            "temperature = 0.2",
            "",
        ]
    )


def _wait_ready(proc: subprocess.Popen[bytes], socket_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: agent run exited early with code {proc.returncode}")
        if socket_path.exists():
            try:
                with AgentClient.connect(socket_path, timeout=5.0) as client:
                    client.ping()
                return
            except (AgentError, OSError):
                pass
        time.sleep(0.05)
    raise SystemExit(f"demo: the agent did not answer on {socket_path} within {START_TIMEOUT_S:.0f} s")


def _converse(socket_path: Path) -> None:
    conversation: str | None = None
    with AgentClient.connect(socket_path, timeout=120.0) as client:
        for question in QUESTIONS:
            print(f"\nyou> {question}\nppchat> ", end="", flush=True)
            for event in client.chat(question, conversation_id=conversation, options={"seed": 7}):
                if isinstance(event, DeltaEvent):
                    print(event.text, end="", flush=True)
                elif isinstance(event, DoneEvent):
                    conversation = event.conversation_id
                    t = event.timings
                    print(
                        f"\n    [{event.usage.completion_tokens} tokens, {t.tokens_per_s:.0f} tokens/s, "
                        f"first token after {t.time_to_first_token_s * 1000:.0f} ms, "
                        f"{event.usage.cached_tokens}/{event.usage.prompt_tokens} prompt tokens reused, "
                        f"{event.finish_reason.value}]",
                        flush=True,
                    )
                elif isinstance(event, ErrorEvent):
                    raise SystemExit(f"demo: the agent answered {event.code.value}: {event.message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.demo", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quant", choices=("q4_k_m", "q8_0", "f16"), default="q4_k_m")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, store)")
    args = parser.parse_args(argv)

    from agent.model.demo import ensure_demo_model

    model = ensure_demo_model()
    gguf = Path(getattr(model, args.quant))
    print(f"demo: model {gguf} ({args.quant.upper()})", flush=True)

    directory = Path(tempfile.mkdtemp(prefix="ppchat-demo-"))
    config = directory / "agent.toml"
    config.write_text(_config(directory, gguf))
    socket_path = directory / "run" / "agent.sock"
    log_path = directory / "agent.log"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    print(f"demo: agent run --config {config} (pid {proc.pid}, log {log_path})", flush=True)
    code: int | None = None
    try:
        started = time.monotonic()
        _wait_ready(proc, socket_path)
        print(f"demo: listening on {socket_path} after {time.monotonic() - started:.1f} s", flush=True)
        _converse(socket_path)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if code != 0:
            sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
    print(f"\ndemo: SIGTERM -> agent run exited with {code}; socket removed: {not socket_path.exists()}")
    if not args.keep:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    else:
        print(f"demo: kept {directory}")
    return 0 if code == 0 and not socket_path.exists() else 1


if __name__ == "__main__":
    raise SystemExit(main())

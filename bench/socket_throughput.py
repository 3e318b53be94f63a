"""Tokens per second streamed through the agent's socket ÷ raw llama-cpp-python, same GGUF and settings.

A real ``agent run`` (subprocess) streams replies over its Unix socket to a client in this process;
the baseline is ``llama_cpp.Llama.generate`` in this process on the same model file, context size,
batch size and thread count, from the same prompt tokens, detokenizing each token as a streaming
caller would. Both sample with the same settings (temperature 5, no top-k/top-p, no repetition
penalty: the tiny demo model then rarely ends its turn, so every reply runs to ``max_tokens`` and
both sides decode the same number of tokens at the same context positions). Rounds alternate (raw,
agent, raw, agent, ...) and the median of the per-round ratios is reported.

Speed is decoding speed as :attr:`agent.generation.GenerationResult.tokens_per_s` defines it:
(tokens - 1) / (time of the last token - time of the first), seen by the client for the agent.

    python -m bench.socket_throughput [--model PATH] [--threads N] [--rounds 7] [--max-tokens 256]

Target: ratio >= 0.98.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.client import AgentClient
from agent.config import ModelConfig
from agent.errors import AgentError
from agent.generation import ChatMessage, Role
from agent.protocol import DeltaEvent, DoneEvent, ErrorEvent

TARGET = 0.98
QUESTION = "Tell me about yourself and what you can do on this device."


def default_model_path() -> Path:
    from agent.model.demo import ensure_demo_model

    return Path(ensure_demo_model().q4_k_m)


TEMPERATURE = 5.0
SEED = 11
MIN_TOKENS = 64
"""Rounds whose reply ended sooner are drawn again with another seed (too short to time well)."""


def raw_run(llama: Any, prompt: Sequence[int], *, max_tokens: int, seed: int) -> tuple[int, float]:
    """(tokens, decoding tokens/s) of one raw llama-cpp-python generation, same sampling as the agent."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    llama.reset()
    llama.set_seed(seed)
    first = end = 0.0
    n = 0
    for token in llama.generate(
        list(prompt), top_k=0, top_p=1.0, min_p=0.0, temp=TEMPERATURE, repeat_penalty=1.0, reset=True
    ):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llama.detokenize([token])
        n += 1
        end = time.perf_counter()
        if n == 1:
            first = end
        if n >= max_tokens:
            break
    return n, (n - 1) / (end - first) if n > 1 and end > first else 0.0


def agent_run(
    client: AgentClient, messages: Sequence[ChatMessage], *, max_tokens: int, seed: int
) -> tuple[int, float]:
    """(completion tokens, decoding tokens/s seen by the client) of one streamed reply."""
    first: float | None = None
    end = 0.0
    request = [{"role": m.role.value, "content": m.content} for m in messages]
    options = {
        "temperature": TEMPERATURE,
        "top_k": 0,
        "top_p": 1.0,
        "repeat_penalty": 1.0,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    for event in client.chat(messages=request, options=options):
        now = time.perf_counter()
        if isinstance(event, DeltaEvent):
            if first is None:
                first = now
            end = now
        elif isinstance(event, DoneEvent):
            n = event.usage.completion_tokens
            if first is None or n <= 1 or end <= first:
                return n, 0.0
            # The last delta carries the last token; the done event follows it at once.
            return n, (n - 1) / (end - first)
        elif isinstance(event, ErrorEvent):
            raise SystemExit(f"bench: the agent answered {event.code.value}: {event.message}")
    raise SystemExit("bench: the stream ended without done")


def _toml(path: Path, directory: Path, config: ModelConfig) -> None:
    def q(p: Path) -> str:
        return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'

    path.write_text(
        "\n".join(
            [
                "[paths]",
                f"state_dir = {q(directory / 'state')}",
                f"runtime_dir = {q(directory / 'run')}",
                "[model]",
                f"path = {q(Path(str(config.path)))}",
                f"n_ctx = {config.n_ctx}",
                f"n_batch = {config.n_batch}",
                f"n_threads = {config.n_threads}",
                f"n_threads_batch = {config.n_threads_batch}",
                "[logging]",
                'level = "warning"',
                "",
            ]
        )
    )


def _start_daemon(config_path: Path, socket_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: agent run exited with {proc.returncode}:\n{log_path.read_text()}")
        if socket_path.exists():
            try:
                with AgentClient.connect(socket_path, timeout=5.0) as c:
                    c.ping()
                return proc
            except (AgentError, OSError):
                pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("bench: the agent did not start")


@dataclass(frozen=True)
class Measured:
    model: str
    threads: int
    raw: float
    agent: float
    ratio: float

    @property
    def overhead_us(self) -> float:
        """What the socket path adds per token, in microseconds."""
        return (1.0 / self.agent - 1.0 / self.raw) * 1e6 if self.agent and self.raw else float("nan")


def measure(model: Path, *, threads: int, n_ctx: int, rounds: int, max_tokens: int) -> Measured | None:
    """Alternating rounds, raw and through the socket, on ``model``; None if the daemon failed."""
    import llama_cpp

    from agent.engine.llama_backend import LlamaEngine

    config = ModelConfig(path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=256)
    messages = [
        ChatMessage(role=Role.SYSTEM, content=config.system_prompt),
        ChatMessage(role=Role.USER, content=QUESTION),
    ]
    # The engine's exact prompt tokens and settings, so that the raw baseline does the same work.
    engine = LlamaEngine.load(config)
    settings, prompt = engine.settings, engine.prompt_tokens(messages)
    import asyncio

    asyncio.run(engine.close())

    directory = Path(tempfile.mkdtemp(prefix="ppchat-bench-"))
    config_path = directory / "agent.toml"
    _toml(config_path, directory, config)
    socket_path = directory / "run" / "agent.sock"
    proc = _start_daemon(config_path, socket_path, directory / "agent.log")
    raw = llama_cpp.Llama(
        model_path=str(settings.path),
        n_ctx=settings.n_ctx,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_batch,
        n_threads=settings.n_threads,
        n_threads_batch=settings.n_threads_batch,
        n_gpu_layers=settings.n_gpu_layers,
        use_mmap=settings.use_mmap,
        verbose=False,
    )
    raw_rates: list[float] = []
    agent_rates: list[float] = []
    ratios: list[float] = []
    min_tokens = min(MIN_TOKENS, max_tokens)
    try:
        with AgentClient.connect(socket_path, timeout=300.0) as client:
            raw_run(raw, prompt, max_tokens=max_tokens, seed=SEED)  # warm-up, both sides
            agent_run(client, messages, max_tokens=max_tokens, seed=SEED)
            seed = SEED
            for i in range(rounds):
                # The agent first; the raw run then decodes as many tokens (its sampler's random
                # stream differs, and the model may end its turn at a different point).
                while True:
                    seed += 1
                    n, a = agent_run(client, messages, max_tokens=max_tokens, seed=seed)
                    if n >= min_tokens:
                        break
                rn, r = raw_run(raw, prompt, max_tokens=n, seed=seed)
                raw_rates.append(r)
                agent_rates.append(a)
                ratios.append(a / r if r else 0.0)
                print(
                    f"  round {i + 1}: raw {r:8.1f} tok/s ({rn} tokens)   "
                    f"socket {a:8.1f} tok/s ({n} tokens)   ratio {ratios[-1]:.3f}",
                    flush=True,
                )
    finally:
        raw.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        shutil.rmtree(directory, ignore_errors=True)
    if code != 0:
        print(f"bench: agent run exited with {code}", file=sys.stderr)
        return None
    return Measured(
        model=settings.path.name,
        threads=threads,
        raw=statistics.median(raw_rates),
        agent=statistics.median(agent_rates),
        ratio=statistics.median(ratios),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="socket tokens/s ÷ raw llama-cpp-python tokens/s")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="one GGUF file to measure (default: the demo model, then the 0.5B-shaped bench model)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)"
    )
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    import psutil

    threads = args.threads or psutil.cpu_count(logical=False) or 1
    if args.model is not None:
        runs = [(args.model, args.rounds, args.max_tokens)]
    else:
        from bench._sized_model import ensure_sized_model

        # The demo model for reference (its tokens cost ~0.2 ms: the agent's per-token work shows
        # up 250x magnified), then a model with a board's real per-token cost, which is judged.
        runs = [(default_model_path(), args.rounds, args.max_tokens), (ensure_sized_model(), 7, 64)]
    results: list[Measured] = []
    for model, rounds, max_tokens in runs:
        print(f"{model.name}:", flush=True)
        measured = measure(model, threads=threads, n_ctx=args.n_ctx, rounds=rounds, max_tokens=max_tokens)
        if measured is None:
            return 2
        results.append(measured)
    for m in results:
        print(
            f"{m.model}, threads {m.threads}: raw llama-cpp-python {m.raw:.1f} tokens/s, agent socket "
            f"{m.agent:.1f} tokens/s (medians); ratio {m.ratio:.3f}; the socket path adds "
            f"{m.overhead_us:.0f} us per token"
        )
    judged = results[-1]
    ok = judged.ratio >= TARGET
    print(
        f"socket_throughput ratio {judged.ratio:.3f} on {judged.model} (target >= {TARGET}) "
        f"{'OK' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Time to first token of turn 6 with prefix reuse ÷ the same turn fully re-evaluated.

Both are measured side by side in one process on the same engine: for each repetition the first five
turns are replayed (so the engine holds their KV state, as it would in a live conversation), turn 6 is
timed, then the engine's saved states are dropped and turn 6 is timed again from scratch.

    python -m bench.prefix_reuse [--model PATH] [--reps 9] [--threads 1]

The ratio is of the best of N runs of each (as ``timeit`` does: the least disturbed run); the
medians are printed too. One thread by default: the ratio then measures evaluation work, not how the
OS schedules a thread pool on a shared machine (with every core busy, each graph's thread barriers
cost milliseconds whatever the prompt length, which pulls the ratio towards 1).

Target: ratio <= 0.25 (exit status 1 when missed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import ModelConfig
from agent.engine.llama_backend import LlamaEngine
from agent.generation import ChatMessage, GenerationParams, GenerationResult, Role, TokenDelta

TARGET = 0.25
SYSTEM = "You are ppchat, a helpful assistant running privately on this device."
QUESTIONS = (
    "Hello, who are you?",
    "What can you do for me on this device?",
    "Do my conversations ever leave the device?",
    "How do you learn from what I say?",
    "What happens when the board is busy or hot?",
    "Can you summarise what we talked about so far?",
)
OTHER = "What is the weather like today?"


def default_model_path() -> Path:
    """The demo model's Q4_K_M file, built on first use."""
    from agent.model.demo import ensure_demo_model

    return Path(ensure_demo_model().q4_k_m)


async def turn(
    engine: LlamaEngine, messages: Sequence[ChatMessage], params: GenerationParams
) -> GenerationResult:
    async for event in engine.stream_chat(messages, params, fairness_key="bench"):
        if not isinstance(event, TokenDelta):
            return event
    raise RuntimeError("stream ended without a result")


@dataclass
class Figures:
    reused: list[float] = field(default_factory=list)
    """Turn 6 right after turn 5: the live KV cache is extended."""
    restored: list[float] = field(default_factory=list)
    """Turn 6 after another conversation ran in between: turn 5's state comes back from the LRU."""
    full: list[float] = field(default_factory=list)
    """Turn 6 evaluated from scratch."""
    prompt_tokens: int = 0
    cached_tokens: int = 0


async def five_turns(engine: LlamaEngine, params: GenerationParams) -> list[ChatMessage]:
    await engine.clear_prefix_cache()
    history = [ChatMessage(role=Role.SYSTEM, content=SYSTEM)]
    for question in QUESTIONS[:-1]:
        history.append(ChatMessage(role=Role.USER, content=question))
        answer = await turn(engine, history, params)
        history.append(ChatMessage(role=Role.ASSISTANT, content=answer.text))
    return [*history, ChatMessage(role=Role.USER, content=QUESTIONS[-1])]


async def measure(engine: LlamaEngine, *, reps: int, max_tokens: int) -> Figures:
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    other = [ChatMessage(role=Role.SYSTEM, content=SYSTEM), ChatMessage(role=Role.USER, content=OTHER)]
    out = Figures()
    for _ in range(reps):
        sixth = await five_turns(engine, params)
        hot = await turn(engine, sixth, params)
        await engine.clear_prefix_cache()
        cold = await turn(engine, sixth, params)
        await five_turns(engine, params)
        await turn(engine, other, params)
        restored = await turn(engine, sixth, params)
        if cold.cached_tokens != 0 or hot.cached_tokens == 0 or restored.cached_tokens != hot.cached_tokens:
            raise RuntimeError(
                f"unexpected cache use: reused {hot.cached_tokens}, restored {restored.cached_tokens}, "
                f"fresh {cold.cached_tokens}"
            )
        out.reused.append(hot.time_to_first_token_s)
        out.restored.append(restored.time_to_first_token_s)
        out.full.append(cold.time_to_first_token_s)
        out.prompt_tokens, out.cached_tokens = hot.prompt_tokens, hot.cached_tokens
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_reuse", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: the demo model, Q4_K_M)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    path = args.model or default_model_path()
    config = ModelConfig(path=path, n_ctx=args.n_ctx, n_threads=args.threads)

    async def run() -> Figures:
        engine = await LlamaEngine.open(config)
        try:
            await measure(engine, reps=1, max_tokens=args.max_tokens)  # warm-up
            return await measure(engine, reps=args.reps, max_tokens=args.max_tokens)
        finally:
            await engine.close()

    figures = asyncio.run(run())
    best = {name: min(getattr(figures, name)) for name in ("reused", "restored", "full")}
    median = {name: statistics.median(getattr(figures, name)) for name in ("reused", "restored", "full")}
    ratio = best["reused"] / best["full"]
    print(f"model: {path} (threads {args.threads}, n_ctx {args.n_ctx})")
    print(f"turn 6 prompt: {figures.prompt_tokens} tokens, {figures.cached_tokens} reused from the KV cache")
    for name in ("reused", "restored", "full"):
        print(
            f"  time to first token, {name:>8}: best of {args.reps} {best[name] * 1e3:6.1f} ms, "
            f"median {median[name] * 1e3:6.1f} ms"
        )
    print(
        f"restored from the LRU after another conversation ÷ full: {best['restored'] / best['full']:.3f} "
        f"(medians: reused {median['reused'] / median['full']:.3f}, "
        f"restored {median['restored'] / median['full']:.3f})"
    )
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"prefix_reuse ratio = {ratio:.3f} (target <= {TARGET}): {verdict}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

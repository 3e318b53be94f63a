"""The llama.cpp engine on the real demo model: streaming, sampling, cancel, fairness, prefix reuse,
context overflow, loading errors. Adapters are in test_engine_adapters.py."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ModelConfig
from agent.engine.llama_backend import ChatStream, LlamaEngine
from agent.errors import ContextOverflow, EngineBusy, ModelError
from agent.generation import (
    ChatMessage,
    FinishReason,
    GenerationParams,
    GenerationResult,
    InferenceBackend,
    Role,
    TokenDelta,
)

SYSTEM = ChatMessage(
    role=Role.SYSTEM, content="You are ppchat, a helpful assistant running privately on this device."
)
GREEDY = GenerationParams(max_tokens=24, temperature=0.0)


def user(text: str) -> ChatMessage:
    return ChatMessage(role=Role.USER, content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role=Role.ASSISTANT, content=text)


def model_config(path: Path, **overrides: Any) -> ModelConfig:
    settings: dict[str, Any] = {
        "path": path,
        "n_ctx": 1024,
        "n_batch": 512,
        "n_threads": 2,
        "prefix_cache_mb": 64,
    }
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.fixture(scope="module")
def model_path(demo_model: Any) -> Path:
    return Path(demo_model.q8_0)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine.load(model_config(model_path))
    yield eng
    asyncio.run(eng.close())


async def collect(stream: ChatStream) -> tuple[list[str], GenerationResult]:
    deltas: list[str] = []
    async for event in stream:
        if isinstance(event, TokenDelta):
            deltas.append(event.text)
        else:
            return deltas, event
    raise AssertionError("the stream ended without a result")


async def reply(
    engine: LlamaEngine, messages: list[ChatMessage], params: GenerationParams = GREEDY, key: str = "t"
) -> GenerationResult:
    return (await collect(engine.stream_chat(messages, params, fairness_key=key)))[1]


class FlipAfter:
    """A cancel signal that reads False ``n`` times, then True; counts how often it was asked."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.n


class Gate:
    """A cancel signal that blocks the worker on its ``block_at``-th check until released."""

    def __init__(self, block_at: int, *, answer: bool = False) -> None:
        self.block_at = block_at
        self.answer = answer
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls == self.block_at:
            self.entered.set()
            assert self.release.wait(60)
            return self.answer
        return self.calls > self.block_at and self.answer


def test_engine_is_an_inference_backend(engine: LlamaEngine) -> None:
    backend: InferenceBackend = engine
    info = backend.info
    assert info.file_type == "Q8_0"
    assert info.architecture == "llama"
    assert info.n_ctx == 1024 and info.n_ctx_train > 0
    assert info.n_params > 0 and info.load_s > 0
    assert info.chat_template


def test_message_text_that_spells_a_special_token_stays_text(engine: LlamaEngine) -> None:
    rendered = engine.render_prompt([user("x")])
    assert "<|end|>" in rendered  # the demo template's end-of-turn marker, a control token
    plain = len(engine.prompt_tokens([user("")]))
    assert len(engine.prompt_tokens([user("<|end|>")])) > plain + 1  # several text tokens, not one control


async def test_streams_deltas_then_one_result(engine: LlamaEngine) -> None:
    messages = [SYSTEM, user("What can you do?")]
    deltas, result = await collect(engine.stream_chat(messages, GREEDY, fairness_key="t"))
    assert deltas and all(d for d in deltas)
    assert result.text == "".join(deltas)
    assert result.prompt_tokens == engine.count_tokens(messages)
    assert 0 < result.completion_tokens <= GREEDY.max_tokens
    assert result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert 0 < result.time_to_first_token_s <= result.total_s


async def test_same_seed_same_reply_and_greedy_is_deterministic(engine: LlamaEngine) -> None:
    messages = [SYSTEM, user("Tell me about the device.")]
    sampled = GenerationParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    first = await reply(engine, messages, sampled)
    second = await reply(engine, messages, sampled)
    assert first.text == second.text and first.completion_tokens == second.completion_tokens
    assert (await reply(engine, messages)).text == (await reply(engine, messages)).text


async def test_max_tokens(engine: LlamaEngine) -> None:
    result = await reply(
        engine, [SYSTEM, user("Explain what you do all day.")], GenerationParams(max_tokens=3, temperature=0)
    )
    assert result.completion_tokens <= 3
    assert (result.finish_reason is FinishReason.LENGTH) == (result.completion_tokens == 3)


async def test_stop_string_ends_the_reply_and_is_never_emitted(engine: LlamaEngine) -> None:
    messages = [SYSTEM, user("What can you do?")]
    full = (await reply(engine, messages, GenerationParams(max_tokens=40, temperature=0))).text
    assert len(full) > 8
    stop = full[4:7]
    expected = full[: full.find(stop)]
    deltas, result = await collect(
        engine.stream_chat(
            messages, GenerationParams(max_tokens=40, temperature=0, stop=(stop,)), fairness_key="t"
        )
    )
    assert result.finish_reason is FinishReason.STOP
    assert result.text == "".join(deltas) == expected


async def test_cancel_signal_stops_within_one_token(engine: LlamaEngine) -> None:
    # The engine checks cancel once before starting, once per prompt batch (one here), then once after
    # each generated token: flipping on the 5th check means exactly 3 tokens, and no check after that.
    cancel = FlipAfter(4)
    messages = [SYSTEM, user("Tell me everything about the device, in detail.")]
    deltas, result = await collect(
        engine.stream_chat(
            messages, GenerationParams(max_tokens=200, temperature=0), fairness_key="t", cancel=cancel
        )
    )
    assert result.finish_reason is FinishReason.CANCELLED
    assert result.completion_tokens == 3
    assert cancel.calls == 5
    assert result.text == "".join(deltas)


@pytest.mark.parametrize("how", ["aclose", "task-cancel"])
async def test_consumer_going_away_stops_within_one_token(engine: LlamaEngine, how: str) -> None:
    messages = [SYSTEM, user("Tell me everything about the device, in detail.")]
    gate = Gate(block_at=3)  # blocks the worker right after the first generated token
    stream = engine.stream_chat(
        messages, GenerationParams(max_tokens=200, temperature=0), fairness_key="t", cancel=gate
    )

    async def consume() -> None:
        async for _ in stream:
            pass

    task = asyncio.create_task(consume()) if how == "task-cancel" else None
    assert await asyncio.to_thread(gate.entered.wait, 60)
    if task is not None:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await stream.aclose()
    gate.release.set()
    stats = await engine.stats()  # runs on the worker after the abandoned reply has stopped
    # The first token was decoded, the second sampled and then the abandonment seen: not decoded.
    assert stats.live_tokens == engine.count_tokens(messages) + 1
    assert gate.calls == 3


async def test_two_conversations_both_finish_in_fair_order(engine: LlamaEngine) -> None:
    gate = Gate(block_at=1)  # holds the worker at the start of the first request
    params = GenerationParams(max_tokens=4, temperature=0)
    blocker = engine.stream_chat([SYSTEM, user("Hello")], params, fairness_key="x", cancel=gate)
    assert await asyncio.to_thread(gate.entered.wait, 60)
    streams = {
        "a1": engine.stream_chat([SYSTEM, user("What time is it?")], params, fairness_key="a"),
        "a2": engine.stream_chat([SYSTEM, user("What can you do?")], params, fairness_key="a"),
        "a3": engine.stream_chat([SYSTEM, user("Are you private?")], params, fairness_key="a"),
        "b1": engine.stream_chat([SYSTEM, user("Hello there")], params, fairness_key="b"),
    }
    order: list[str] = []

    async def run(name: str, stream: ChatStream) -> GenerationResult:
        _, result = await collect(stream)
        order.append(name)
        return result

    tasks = [asyncio.create_task(run("x", blocker))] + [
        asyncio.create_task(run(n, s)) for n, s in streams.items()
    ]
    gate.release.set()
    results = await asyncio.gather(*tasks)
    assert order == ["x", "a1", "b1", "a2", "a3"]
    assert all(r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for r in results)
    assert all(r.completion_tokens > 0 for r in results)


async def test_multi_turn_reuses_the_prefix_and_replies_as_a_fresh_engine(engine: LlamaEngine) -> None:
    await engine.clear_prefix_cache()
    turn1 = [SYSTEM, user("Hello, who are you?")]
    r1 = await reply(engine, turn1)
    turn2 = [*turn1, assistant(r1.text), user("What can you do for me?")]
    other = [SYSTEM, user("Is my data private?")]
    r_other = await reply(engine, other, key="other")  # another conversation in between
    r2 = await reply(engine, turn2)
    assert r2.cached_tokens >= r1.prompt_tokens - 1 > 0
    await engine.clear_prefix_cache()
    fresh = await reply(engine, turn2)
    assert fresh.cached_tokens == 0
    assert fresh.text == r2.text
    # ... and the other conversation's state was kept too
    r_other2 = await reply(engine, [*other, assistant(r_other.text), user("Thanks")], key="other")
    assert r_other2.cached_tokens > 0
    stats = await engine.stats()
    assert 0 < stats.prefix_cache_bytes <= stats.prefix_cache_capacity_bytes


@pytest.fixture(scope="module")
def small_engine(model_path: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine.load(model_config(model_path, n_ctx=192, n_batch=64), max_queued=2)
    yield eng
    asyncio.run(eng.close())


async def test_context_overflow_drops_oldest_turns_keeping_the_system_prompt(
    small_engine: LlamaEngine,
) -> None:
    history: list[ChatMessage] = [SYSTEM]
    for i in range(12):
        history += [
            user(f"Question number {i}: what can you do on this device today?"),
            assistant(f"Answer {i}: " + "I can help. " * 4),
        ]
    messages = [*history, user("And what time is it?")]
    params = GenerationParams(max_tokens=32, temperature=0)
    n_ctx = small_engine.info.n_ctx  # llama.cpp may round the configured size up
    assert small_engine.count_tokens(messages) + 32 > n_ctx
    result = await reply(small_engine, messages, params)
    assert result.prompt_tokens + 32 <= n_ctx
    # what was kept: the system prompt plus the newest turns that fit
    kept = next(
        k
        for k in range(1, len(messages))
        if small_engine.count_tokens([SYSTEM, *messages[k:]]) == result.prompt_tokens
    )
    assert messages[kept].role is Role.USER
    assert small_engine.count_tokens([SYSTEM, *messages[kept - 2 :]]) + 32 > n_ctx


async def test_a_last_message_too_long_for_the_context_is_refused(small_engine: LlamaEngine) -> None:
    stream = small_engine.stream_chat([SYSTEM, user("device " * 400)], GREEDY, fairness_key="t")
    with pytest.raises(ContextOverflow):
        await collect(stream)


async def test_full_queue_is_refused_and_close_cancels_what_waits(model_path: Path) -> None:
    eng = await LlamaEngine.open(model_config(model_path, n_ctx=256), max_queued=2)
    gate = Gate(block_at=1)
    running = eng.stream_chat([SYSTEM, user("Hello")], GREEDY, fairness_key="a", cancel=gate)
    assert await asyncio.to_thread(gate.entered.wait, 60)
    queued = [eng.stream_chat([SYSTEM, user("Hi")], GREEDY, fairness_key=k) for k in ("b", "c")]
    with pytest.raises(EngineBusy):
        await collect(eng.stream_chat([SYSTEM, user("Hi")], GREEDY, fairness_key="d"))
    close = asyncio.create_task(eng.close())
    await asyncio.sleep(0.05)
    gate.release.set()
    await close
    for stream in [running, *queued]:
        _, result = await collect(stream)
        assert result.finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineBusy):
        await collect(eng.stream_chat([SYSTEM, user("Hi")], GREEDY, fairness_key="a"))


async def test_config_chat_template_overrides_the_gguf(model_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    eng = await LlamaEngine.open(model_config(model_path, n_ctx=128, chat_template=template))
    try:
        assert eng.info.chat_template == template
        assert eng.render_prompt([SYSTEM, user("Hi")]).endswith(
            f"system: {SYSTEM.content}\nuser: Hi\nassistant:"
        )
    finally:
        await eng.close()


def test_sha256_is_checked(model_path: Path) -> None:
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    with pytest.raises(ModelError, match="SHA-256"):
        LlamaEngine.load(model_config(model_path, sha256="0" * 64))
    eng = LlamaEngine.load(model_config(model_path, sha256=digest, n_ctx=128))
    assert eng.info.path == model_path
    asyncio.run(eng.close())


@pytest.mark.parametrize("kind", ["missing", "directory", "not-gguf", "truncated"])
def test_bad_model_file_is_a_model_error_naming_the_path(model_path: Path, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "model.gguf"
    if kind == "directory":
        bad.mkdir()
    elif kind == "not-gguf":
        bad.write_bytes(b"this is not a model" * 100)
    elif kind == "truncated":
        with model_path.open("rb") as src, bad.open("wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.truncate(model_path.stat().st_size // 2)
    with pytest.raises(ModelError, match=str(bad)):
        LlamaEngine.load(model_config(bad))

"""The llama.cpp inference engine: one model, one worker thread, many conversations.

:class:`LlamaEngine` implements :class:`agent.generation.InferenceBackend`. A single worker thread
(:mod:`agent.engine.worker`) owns the llama.cpp model and context and runs every blocking call (load,
prompt evaluation, decoding, KV state saves, adapter swaps, free); the asyncio side only queues work
(:mod:`agent.engine.jobs`) and reads results.

- Requests wait in a bounded :class:`~agent.engine.fair_queue.FairQueue` and are served one at a time,
  round-robin over their ``fairness_key``; a full queue raises :class:`agent.errors.EngineBusy`.
- Prompts are rendered with the GGUF's own chat template (:mod:`agent.engine.chat_template`) and fitted
  to the context window (:func:`agent.engine.context_window.fit_messages`).
- Multi-turn prefix reuse: the KV cache of the last prompt stays live; when a request diverges from it
  (another conversation), the live state is saved into a RAM-bounded LRU
  (:class:`~agent.engine.prefix_cache.PrefixCache`, ``model.prefix_cache_mb``) and the saved state with
  the longest common prefix is restored, so only the new suffix is evaluated.
- Cancellation (the request's ``cancel``, or the consumer closing or abandoning the stream) is checked
  between tokens: at most one more token is decoded after it is seen.
- LoRA adapters (GGUF) are attached, swapped and detached at runtime with llama.cpp's adapter API
  between requests; the model is never reloaded and stays mmapped.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

from agent.config import ModelConfig
from agent.engine.fair_queue import FairQueue, QueueClosed, QueueFull
from agent.engine.jobs import CallJob, ChatJob, ChatStream, Job, cancelled_result
from agent.engine.worker import EngineSettings, EngineStats, Worker
from agent.errors import AdapterError, AgentError, EngineBusy, EngineError, ModelError
from agent.generation import Cancellation, ChatMessage, GenerationParams, ModelInfo

__all__ = ["DEFAULT_MAX_QUEUED", "ChatStream", "EngineSettings", "EngineStats", "LlamaEngine"]

T = TypeVar("T")

DEFAULT_MAX_QUEUED = 64


class LlamaEngine:
    """The llama.cpp backend (see the module docstring). Build it with :meth:`load` or :meth:`open`."""

    def __init__(self, worker: Worker, queue: FairQueue[Job]) -> None:
        self._worker = worker
        self._queue = queue
        self._closed = False
        assert worker.info is not None
        self._info = worker.info

    @classmethod
    def load(
        cls,
        config: ModelConfig,
        *,
        default_threads: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> LlamaEngine:
        """Load the model (blocking: seconds). ``default_threads`` applies when ``config.n_threads`` is unset
        (the board profile's choice); ``max_queued`` bounds the requests waiting for the model."""
        if config.path is None:
            raise ModelError("model.path is not set")
        threads = config.n_threads or default_threads or max(1, os.cpu_count() or 1)
        settings = EngineSettings(
            path=Path(config.path),
            n_ctx=config.n_ctx,
            n_batch=min(config.n_batch, config.n_ctx),
            n_threads=threads,
            n_threads_batch=config.n_threads_batch or threads,
            n_gpu_layers=config.n_gpu_layers,
            use_mmap=config.use_mmap,
        )
        queue: FairQueue[Job] = FairQueue(max_items=max_queued)
        worker = Worker(config, settings, queue, config.chat_template)
        worker.start()
        return cls(worker, queue)

    @classmethod
    async def open(
        cls,
        config: ModelConfig,
        *,
        default_threads: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> LlamaEngine:
        """:meth:`load` without blocking the event loop."""
        return await asyncio.to_thread(
            cls.load, config, default_threads=default_threads, max_queued=max_queued
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def settings(self) -> EngineSettings:
        return self._worker.settings

    @property
    def closed(self) -> bool:
        return self._closed

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        fairness_key: str,
        cancel: Cancellation | None = None,
    ) -> ChatStream:
        """Queue a reply now; iterate the stream for its deltas and result.

        Errors (a full queue, a closed engine, a prompt that does not fit) are raised by the first
        ``__anext__``. ``cancel`` is read on the worker thread: once before the request starts, once per
        prompt batch, and once after every generated token, so a cancelled reply decodes no further
        token; closing or abandoning the stream (or cancelling the task reading it) does the same.
        """
        job = ChatJob(
            messages=tuple(messages),
            params=params,
            fairness_key=fairness_key,
            cancel=cancel,
            submitted=time.perf_counter(),
        )
        error: AgentError | None = None
        if not messages:
            error = EngineError("no messages to answer")
        elif self._closed or self._worker.failure is not None:
            error = EngineBusy("the engine is closed")
        else:
            try:
                self._queue.put(fairness_key, job)
            except QueueFull:
                error = EngineBusy(f"the engine's queue is full ({len(self._queue)} requests waiting)")
            except QueueClosed:
                error = EngineBusy("the engine is closed")
        return ChatStream(self._queue, job, error)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens for ``messages`` as the engine would format them (thread-safe; a few ms at most)."""
        return len(self._worker.prompt_tokens(messages))

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the chat template makes of ``messages``."""
        return self._worker.render(messages)

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The exact prompt tokens the engine evaluates for ``messages`` (with BOS if the model wants it)."""
        return self._worker.prompt_tokens(messages)

    async def _call(self, fn: Callable[[Worker], T]) -> T:
        if self._closed:
            raise EngineBusy("the engine is closed")
        job = CallJob(fn)
        try:
            self._queue.put_priority(job)
        except QueueClosed:
            raise EngineBusy("the engine is closed") from None
        return cast(T, await asyncio.wrap_future(job.future))

    async def set_adapters(self, adapters: Sequence[tuple[Path, float]]) -> None:
        """Make exactly ``adapters`` (GGUF LoRA files with scales) active, between two requests.

        An adapter that does not load raises :class:`AdapterError` and leaves the previous set active.
        Adapters no longer used are freed; saved KV prefixes are dropped (they depend on the weights).
        """
        wanted: list[tuple[Path, float]] = []
        for path, scale in adapters:
            if not math.isfinite(scale):
                raise AdapterError(f"{path}: adapter scale must be finite, not {scale}")
            wanted.append((Path(path), float(scale)))
        await self._call(lambda w: w.set_adapters(wanted))

    @property
    def adapters(self) -> tuple[tuple[Path, float], ...]:
        return self._worker.adapters

    async def logits(self, messages: Sequence[ChatMessage]) -> list[float]:
        """The next-token logits after the formatted prompt (diagnostics and tests)."""
        return await self._call(lambda w: w.logits(messages))

    async def stats(self) -> EngineStats:
        return await self._call(lambda w: w.stats())

    async def clear_prefix_cache(self) -> None:
        """Forget every saved KV state (benchmarks use this to measure a full re-evaluation)."""
        await self._call(lambda w: w.clear_prefix_cache())

    async def close(self) -> None:
        """Cancel the reply in progress and everything queued, stop the worker and free the model."""
        if self._closed:
            return
        self._closed = True
        closed = EngineBusy("the engine is closed")
        for job in self._queue.close():
            if isinstance(job, CallJob):
                job.future.set_exception(closed)
            else:
                job.channel.send(cancelled_result(job))
        current = self._worker.current
        if current is not None:
            current.abandoned.set()
        await asyncio.to_thread(self._worker.join)

"""The engine's worker thread: it owns the llama.cpp model and context and runs every blocking call.

Requests are taken from the fair queue one at a time. For each, the prompt is rendered and fitted to the
context, the longest available KV prefix is made live (the live state, or a saved one from the
RAM-bounded LRU, see :meth:`Worker.reuse_prefix`), the rest of the prompt evaluated, and tokens sampled,
decoded and streamed until end of generation, a stop string, ``max_tokens``, a full context or
cancellation. Adapter swaps and diagnostics run as :class:`~agent.engine.jobs.CallJob` between requests.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import ModelConfig
from agent.engine.context_window import fit_messages
from agent.engine.fair_queue import FairQueue, QueueClosed
from agent.engine.jobs import CallJob, ChatJob, Job, cancelled_result
from agent.engine.native import (
    FILE_TYPE_NAMES,
    ContextSettings,
    NativeContext,
    NativeError,
    NativeModel,
    NativeSampler,
    logits_of_last,
)
from agent.engine.prefix_cache import PrefixCache, common_prefix_len
from agent.engine.prompt import PromptFormat
from agent.engine.text import StopMatcher, Utf8Assembler
from agent.errors import AdapterError, AgentError, EngineError, ModelError
from agent.generation import ChatMessage, FinishReason, GenerationResult, ModelInfo, TokenDelta

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 1 << 20
_VOCAB_TYPE_SPM = 1
# Prefix reuse tuning: restore a saved state only when it saves at least this many tokens of
# evaluation; save the live state before it is overwritten only when that loses at least this many.
_MIN_RESTORE_GAIN = 8
_MIN_STASH_LOSS = 8
_TOKEN_MEMO_SIZE = 16


@dataclass(frozen=True)
class EngineSettings:
    """The llama.cpp settings the engine runs with (for status output and side-by-side benchmarks)."""

    path: Path
    n_ctx: int
    n_batch: int
    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int
    use_mmap: bool


@dataclass(frozen=True)
class EngineStats:
    prefix_cache_entries: int
    prefix_cache_bytes: int
    prefix_cache_capacity_bytes: int
    live_tokens: int
    queued: int
    adapters: tuple[tuple[Path, float], ...]


class Worker:
    """Owns the llama.cpp model and context; every method runs on the worker thread."""

    def __init__(
        self, config: ModelConfig, settings: EngineSettings, queue: FairQueue[Job], chat_template: str | None
    ) -> None:
        self._config = config
        self.settings = settings
        self._queue = queue
        self._template_override = chat_template
        self.model: NativeModel | None = None
        self.ctx: NativeContext | None = None
        self.prompt: PromptFormat | None = None
        self.info: ModelInfo | None = None
        self._token_memo: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._memo_lock = threading.Lock()
        self._live: list[int] = []
        self._truncatable = True
        self._cache: PrefixCache[Any] = PrefixCache(capacity_bytes=config.prefix_cache_mb * 1024 * 1024)
        self._adapters: list[tuple[Path, float, Any, tuple[int, int]]] = []
        self.current: ChatJob | None = None
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="llama-engine", daemon=True)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()

    # lifecycle
    def start(self) -> None:
        self._thread.start()
        self._ready.result()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - handed to the loading thread, which raises it
            self._free()
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                try:
                    job = self._queue.get()
                except QueueClosed:
                    break
                if job is None:
                    continue
                if isinstance(job, CallJob):
                    self._run_call(job)
                else:
                    self.current = job
                    self._run_chat(job)
                    self.current = None
        except BaseException as exc:
            # A bug, not a llama.cpp failure: stop serving, tell everyone waiting, let the thread die loudly.
            self.failure = exc
            failed = EngineError(f"the inference worker stopped: {type(exc).__name__}: {exc}")
            for left in [*self._queue.close(), *([self.current] if self.current else [])]:
                if isinstance(left, CallJob):
                    left.future.set_exception(failed)
                else:
                    left.channel.send(failed)
            raise
        finally:
            self._free()

    def _load(self) -> None:
        t0 = time.perf_counter()
        path = self.settings.path
        check_model_file(path, self._config.sha256)
        try:
            self.model = NativeModel(
                path, n_gpu_layers=self.settings.n_gpu_layers, use_mmap=self.settings.use_mmap
            )
            self.ctx = NativeContext(
                self.model,
                ContextSettings(
                    n_ctx=self.settings.n_ctx,
                    n_batch=self.settings.n_batch,
                    n_threads=self.settings.n_threads,
                    n_threads_batch=self.settings.n_threads_batch,
                ),
            )
        except NativeError as exc:
            raise ModelError(f"{path}: {exc}") from None
        model = self.model
        source = self._template_override or model.chat_template()
        if not source:
            raise ModelError(
                f"{path}: the GGUF has no tokenizer.chat_template; set model.chat_template in the config"
            )
        self.prompt = PromptFormat(model, source)
        self._truncatable = model.supports_prefix_truncation()
        ftype = model.meta("general.file_type")
        try:
            ftype_num = int(ftype) if ftype is not None else model.file_type()
        except ValueError:
            ftype_num = model.file_type()
        self.info = ModelInfo(
            path=path,
            file_type=FILE_TYPE_NAMES.get(ftype_num, f"type {ftype_num}"),
            architecture=model.meta("general.architecture") or "unknown",
            n_params=model.n_params(),
            n_ctx=self.ctx.n_ctx,
            n_ctx_train=model.n_ctx_train(),
            load_s=time.perf_counter() - t0,
            chat_template=source,
        )
        log.info(
            "loaded %s (%s, %s, %d params) in %.2f s; n_ctx=%d threads=%d",
            path,
            self.info.architecture,
            self.info.file_type,
            self.info.n_params,
            self.info.load_s,
            self.info.n_ctx,
            self.settings.n_threads,
        )

    def _free(self) -> None:
        self._cache.clear()
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        for _, _, handle, _ in self._adapters:
            NativeModel.free_adapter(handle)
        self._adapters.clear()
        if self.model is not None:
            self.model.close()
            self.model = None

    # prompts (also called off the worker by count_tokens: template and vocabulary reads only)
    def render(self, messages: Sequence[ChatMessage]) -> str:
        if self.prompt is None:
            raise EngineError("the engine is closed")
        return self.prompt.render(messages)

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        model = self.model
        if model is None:
            raise EngineError("the engine is closed")
        text = self.render(messages)
        with self._memo_lock:  # callers count tokens, then ask for a reply: tokenize once
            memo = self._token_memo.get(text)
            if memo is not None:
                self._token_memo.move_to_end(text)
                return list(memo)
        assert self.prompt is not None
        tokens = self.prompt.tokens(text)
        with self._memo_lock:
            self._token_memo[text] = tuple(tokens)
            while len(self._token_memo) > _TOKEN_MEMO_SIZE:
                self._token_memo.popitem(last=False)
        return tokens

    # chat
    def _run_chat(self, job: ChatJob) -> None:
        if job.stopped():
            job.channel.send(cancelled_result(job))
            return
        try:
            result = self._generate(job)
        except NativeError as exc:
            self._reset_kv()
            job.channel.send(EngineError(f"generation failed: {exc}"))
            return
        except AgentError as exc:
            job.channel.send(exc)
            return
        job.channel.send(result)

    def _generate(self, job: ChatJob) -> GenerationResult:
        model, ctx = self.model, self.ctx
        assert model is not None and ctx is not None
        params = job.params
        memo: dict[int, list[int]] = {}

        def count(msgs: Sequence[ChatMessage]) -> int:
            tokens = self.prompt_tokens(msgs)
            memo[len(msgs)] = tokens
            return len(tokens)

        kept, _ = fit_messages(job.messages, count, n_ctx=ctx.n_ctx, max_tokens=params.max_tokens)
        prompt = memo[len(kept)]
        cached = self.reuse_prefix(prompt)

        pos = cached
        while pos < len(prompt):
            if job.stopped():
                return self._finish(
                    job,
                    finish=FinishReason.CANCELLED,
                    prompt=prompt,
                    cached=cached,
                    n_gen=0,
                    text="",
                    first_token_at=None,
                )
            chunk = prompt[pos : pos + ctx.n_batch]
            ctx.decode(chunk, start_pos=pos)
            pos += len(chunk)
            self._live.extend(chunk)

        sampler = NativeSampler(
            model,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repeat_penalty=params.repeat_penalty,
            seed=params.seed,
        )
        utf8 = Utf8Assembler()
        stops = StopMatcher(params.stop)
        strip_leading_space = model.vocab_type == _VOCAB_TYPE_SPM
        emitted: list[str] = []
        first_token_at: float | None = None
        n_gen = 0
        finish = FinishReason.STOP
        stopped_by_string = False
        try:
            while True:
                token = sampler.sample(ctx)
                n_gen += 1
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if model.is_eog(token):
                    break
                text = utf8.push(model.piece(token))
                if text and strip_leading_space:
                    strip_leading_space = False
                    if text.startswith(" "):
                        text = text[1:]
                safe, stopped_by_string = stops.push(text) if text else ("", False)
                if safe:
                    emitted.append(safe)
                    if not job.channel.send(TokenDelta(safe)):
                        job.abandoned.set()
                if stopped_by_string:
                    break
                if n_gen >= params.max_tokens:
                    finish = FinishReason.LENGTH
                    break
                if pos >= ctx.n_ctx:
                    finish = FinishReason.CONTEXT
                    break
                if job.stopped():
                    finish = FinishReason.CANCELLED
                    break
                ctx.decode((token,), start_pos=pos)
                pos += 1
                self._live.append(token)
        finally:
            sampler.close()
        if finish is not FinishReason.CANCELLED and not stopped_by_string:
            tail, stopped_by_string = stops.push(utf8.flush())
            if not stopped_by_string:
                tail += stops.flush()
            if tail:
                emitted.append(tail)
                job.channel.send(TokenDelta(tail))
        return self._finish(
            job,
            finish=finish,
            prompt=prompt,
            cached=cached,
            n_gen=n_gen,
            text="".join(emitted),
            first_token_at=first_token_at,
        )

    @staticmethod
    def _finish(
        job: ChatJob,
        *,
        finish: FinishReason,
        prompt: Sequence[int],
        cached: int,
        n_gen: int,
        text: str,
        first_token_at: float | None,
    ) -> GenerationResult:
        now = time.perf_counter()
        return GenerationResult(
            finish_reason=finish,
            text=text,
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            completion_tokens=n_gen,
            time_to_first_token_s=(first_token_at or now) - job.submitted,
            total_s=now - job.submitted,
        )

    # prefix reuse
    def reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Make the KV cache hold the longest available prefix of ``prompt``; returns its length."""
        ctx = self.ctx
        assert ctx is not None
        if not self._truncatable:
            self._reset_kv()
            return 0
        n_live = common_prefix_len(self._live, prompt)
        match = self._cache.best_match(prompt) if self._cache.capacity_bytes else None
        if match is not None and match[1] >= n_live + _MIN_RESTORE_GAIN:
            entry, n_match = match
            self._stash_live(n_live)
            try:
                ctx.restore_sequence(entry.payload)
                self._live = list(entry.tokens)
                n_live = n_match
            except NativeError as exc:
                log.warning("could not restore a saved KV state: %s", exc)
                self._reset_kv()
                n_live = 0
        else:
            self._stash_live(n_live)
        n_keep = min(n_live, len(prompt) - 1)
        if n_keep < len(self._live):
            if not ctx.truncate(n_keep):
                ctx.clear()
                n_keep = 0
            del self._live[n_keep:]
        return n_keep

    def _stash_live(self, n_kept: int) -> None:
        """Save the live KV state before most of it is overwritten by another conversation."""
        live = self._live
        if not self._cache.capacity_bytes or len(live) - n_kept < _MIN_STASH_LOSS or live in self._cache:
            return
        assert self.ctx is not None
        try:
            buf = self.ctx.save_sequence()
        except NativeError as exc:  # the conversation only loses its saved prefix
            log.warning("could not save a KV state: %s", exc)
            return
        self._cache.put(live, buf, nbytes=len(buf))

    def _reset_kv(self) -> None:
        if self.ctx is not None:
            self.ctx.clear()
        self._live = []

    # calls run between requests
    def _run_call(self, job: CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            value = job.fn(self)
        except NativeError as exc:
            self._reset_kv()  # the KV cache may hold a half-evaluated prompt
            job.future.set_exception(EngineError(str(exc)))
        except AgentError as exc:
            job.future.set_exception(exc)
        except BaseException as exc:
            job.future.set_exception(
                EngineError(f"the inference worker stopped: {type(exc).__name__}: {exc}")
            )
            raise
        else:
            job.future.set_result(value)

    def set_adapters(self, wanted: Sequence[tuple[Path, float]]) -> None:
        model, ctx = self.model, self.ctx
        assert model is not None and ctx is not None
        current = {(p, ident): handle for p, _, handle, ident in self._adapters}
        fresh: list[Any] = []
        new: list[tuple[Path, float, Any, tuple[int, int]]] = []
        try:
            for path, scale in wanted:
                try:
                    st = path.stat()
                except OSError as exc:
                    raise AdapterError(f"{path}: cannot read the adapter: {exc.strerror}") from None
                ident = (st.st_mtime_ns, st.st_size)
                handle = current.get((path, ident))
                if handle is None or any(h is handle for _, _, h, _ in new):
                    try:
                        handle = model.load_adapter(path)
                    except NativeError as exc:
                        raise AdapterError(f"{path}: {exc}") from None
                    fresh.append(handle)
                new.append((path, scale, handle, ident))
            try:
                ctx.set_adapters([(h, s) for _, s, h, _ in new])
            except NativeError as exc:
                raise AdapterError(f"llama.cpp refused the adapters: {exc}") from None
        except BaseException:
            for handle in fresh:
                NativeModel.free_adapter(handle)
            raise
        keep = {id(h) for _, _, h, _ in new}
        for _, _, handle, _ in self._adapters:
            if id(handle) not in keep:
                NativeModel.free_adapter(handle)
        self._adapters = new
        # Saved KV states were computed with the old weights.
        self._cache.clear()
        self._reset_kv()
        log.info("adapters now: %s", [(str(p), s) for p, s, _, _ in new] or "none")

    @property
    def adapters(self) -> tuple[tuple[Path, float], ...]:
        return tuple((p, s) for p, s, _, _ in self._adapters)

    def logits(self, messages: Sequence[ChatMessage]) -> list[float]:
        """Logits after the formatted prompt, evaluated from scratch (no prefix reuse)."""
        model, ctx = self.model, self.ctx
        assert model is not None and ctx is not None
        prompt = self.prompt_tokens(messages)
        self._reset_kv()
        for pos in range(0, len(prompt), ctx.n_batch):
            ctx.decode(prompt[pos : pos + ctx.n_batch], start_pos=pos)
        out = logits_of_last(ctx, model.n_vocab)
        self._reset_kv()
        return out

    def stats(self) -> EngineStats:
        return EngineStats(
            prefix_cache_entries=len(self._cache),
            prefix_cache_bytes=self._cache.size_bytes,
            prefix_cache_capacity_bytes=self._cache.capacity_bytes,
            live_tokens=len(self._live),
            queued=len(self._queue),
            adapters=self.adapters,
        )

    def clear_prefix_cache(self) -> None:
        self._cache.clear()
        self._reset_kv()


def check_model_file(path: Path, sha256: str | None) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            if magic != _GGUF_MAGIC:
                raise ModelError(f"{path}: not a GGUF file")
            if sha256 is not None:
                f.seek(0)
                digest = hashlib.sha256()
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
                if digest.hexdigest() != sha256:
                    raise ModelError(
                        f"{path}: SHA-256 is {digest.hexdigest()}, the configuration expects {sha256}"
                    )
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except IsADirectoryError:
        raise ModelError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model: {exc.strerror}") from None

"""A small typed layer over llama-cpp-python's low-level bindings (the only module importing llama_cpp).

Everything here is blocking and must run on the engine's worker thread, except :meth:`NativeModel.tokenize`
and :meth:`NativeModel.piece`, which only read the vocabulary. Failures come out as :class:`NativeError`
with the most recent llama.cpp error lines; :mod:`agent.engine.llama_backend` translates them into the
agent's exception tree.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

log = logging.getLogger("agent.engine.llama")

# GGUF ``general.file_type`` values (llama.h ``enum llama_ftype``) and their usual names.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}

_TOKEN_ATTR_UNKNOWN = 1 << 0
_TOKEN_ATTR_CONTROL = 1 << 3
_TOKEN_ATTR_USER_DEFINED = 1 << 4
# ggml.h ``enum ggml_log_level``: NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous line).
_GGML_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


class NativeError(Exception):
    """A llama.cpp call failed; the message carries llama.cpp's own recent error lines."""


# --- logging: llama.cpp's log lines go to Python logging; recent warnings/errors explain failures ----

_recent_problems: deque[str] = deque(maxlen=8)
_log_state = {"level": logging.INFO}
_init_lock = threading.Lock()
_backend = {"initialised": False}


def _on_llama_log(level: int, text: bytes | None, _user_data: Any) -> None:
    py_level = _log_state["level"] if level == 5 else _GGML_LEVELS.get(level, logging.DEBUG)
    _log_state["level"] = py_level
    if not text:
        return
    line = text.decode("utf-8", errors="replace").rstrip("\n")
    if not line.strip():
        return
    if py_level >= logging.WARNING:
        _recent_problems.append(line.strip())
    # llama.cpp's informational chatter (model dump, buffer sizes) is debug detail for us.
    log.log(py_level if py_level >= logging.WARNING else logging.DEBUG, "%s", line)


_LOG_CALLBACK = llama_cpp.llama_log_callback(_on_llama_log)


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its log to Python logging."""
    with _init_lock:
        if _backend["initialised"]:
            return
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend["initialised"] = True


def _mark() -> int:
    """Start collecting llama.cpp's problem lines for the call that follows (one worker per engine)."""
    _recent_problems.clear()
    return 0


def _explain(what: str, _mark_: int) -> NativeError:
    lines = [
        line for line in _recent_problems if line.lower().startswith(("llama", "gguf", "error", "failed"))
    ]
    detail = "; ".join((lines or list(_recent_problems))[-3:])
    return NativeError(f"{what}: {detail}" if detail else what)


# --- the model, its vocabulary and metadata ---------------------------------------------------------


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int
    n_batch: int
    n_threads: int
    n_threads_batch: int


class NativeModel:
    """A loaded GGUF model (weights mmapped unless told otherwise, or none with ``vocab_only``) and its
    vocabulary."""

    def __init__(self, path: Path, *, n_gpu_layers: int, use_mmap: bool, vocab_only: bool = False) -> None:
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only  # the vocabulary and metadata, no weights (the trainer's tokenizer)
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        mark = _mark()
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            raise _explain("llama.cpp could not load the model", mark)
        self._model: Any = model
        self._vocab: Any = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab: int = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos: int = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos: int = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.vocab_type: int = int(llama_cpp.llama_vocab_type(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}

    @property
    def handle(self) -> Any:
        if self._model is None:
            raise NativeError("the model is closed")
        return self._model

    # metadata
    def meta(self, key: str) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(llama_cpp.llama_model_meta_val_str(self.handle, key.encode("utf-8"), buf, size))
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def n_params(self) -> int:
        return int(llama_cpp.llama_model_n_params(self.handle))

    def n_ctx_train(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.handle))

    def file_type(self) -> int:
        return int(llama_cpp.llama_model_ftype(self.handle))

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.handle, buf, 256)
        return buf.value.decode("utf-8", errors="replace")

    def supports_prefix_truncation(self) -> bool:
        """Whether a KV sequence can be cut at any position (not so for recurrent or sliding-window)."""
        m = self.handle
        recurrent = bool(llama_cpp.llama_model_is_recurrent(m)) or bool(llama_cpp.llama_model_is_hybrid(m))
        return not recurrent and int(llama_cpp.llama_model_n_swa(m)) == 0

    # vocabulary
    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...), memoised: one less foreign call per token."""
        cached = self._eog.get(token)
        if cached is None:
            cached = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return cached

    def special_token_texts(self) -> list[str]:
        """Texts of unknown, control and user-defined tokens (what ``parse_special`` turns into tokens)."""
        out: list[str] = []
        for tok in range(self.n_vocab):
            attr = int(llama_cpp.llama_vocab_get_attr(self._vocab, tok))
            if attr & (_TOKEN_ATTR_UNKNOWN | _TOKEN_ATTR_CONTROL | _TOKEN_ATTR_USER_DEFINED):
                text = self.token_text(tok)
                if len(text) > 1:
                    out.append(text)
        return out

    def tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        """Tokens of ``text`` without BOS/EOS added (vocabulary read only: safe off the worker)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            arr = (llama_cpp.llama_token * cap)()
            n = int(llama_cpp.llama_tokenize(self._vocab, data, len(data), arr, cap, False, parse_special))
            if n >= 0:
                return list(arr[:n])
            if -n <= cap:
                raise NativeError(f"tokenization failed ({n})")
            cap = -n

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False))
            if n >= 0:
                out = buf.raw[:n]
                self._pieces[token] = out
                return out
            size = -n + 1

    # adapters
    def load_adapter(self, path: Path) -> Any:
        mark = _mark()
        adapter = llama_cpp.llama_adapter_lora_init(self.handle, str(path).encode("utf-8"))
        if not adapter:
            raise _explain("llama.cpp could not load the adapter", mark)
        return adapter

    @staticmethod
    def free_adapter(adapter: Any) -> None:
        llama_cpp.llama_adapter_lora_free(adapter)

    def close(self) -> None:
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            self._vocab = None


class NativeContext:
    """One llama.cpp context (KV cache for sequence 0) with its batch; worker thread only."""

    SEQ = 0

    def __init__(self, model: NativeModel, settings: ContextSettings) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = settings.n_batch
        params.n_ubatch = settings.n_batch
        params.n_seq_max = 1
        params.n_threads = settings.n_threads
        params.n_threads_batch = settings.n_threads_batch
        params.no_perf = True
        mark = _mark()
        ctx = llama_cpp.llama_init_from_model(model.handle, params)
        if not ctx:
            raise _explain("llama.cpp could not create a context", mark)
        self._ctx: Any = ctx
        self._model = model
        self.n_ctx: int = int(llama_cpp.llama_n_ctx(ctx))
        self.n_batch = settings.n_batch
        self._batch: Any = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._mem: Any = llama_cpp.llama_get_memory(ctx)

    @property
    def handle(self) -> Any:
        if self._ctx is None:
            raise NativeError("the context is closed")
        return self._ctx

    def decode(self, tokens: Sequence[int], *, start_pos: int) -> None:
        """Evaluate ``tokens`` (at most ``n_batch``) at positions from ``start_pos``; logits for the last."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"batch of {n} tokens (1..{self.n_batch})")
        b = self._batch
        b.n_tokens = n
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = self.SEQ
            b.logits[i] = False
        b.logits[n - 1] = True
        mark = _mark()
        rc = int(llama_cpp.llama_decode(self.handle, b))
        if rc != 0:
            raise _explain(f"llama_decode returned {rc}", mark)

    def truncate(self, n_keep: int) -> bool:
        """Drop KV entries from position ``n_keep`` on; False when the memory cannot do that."""
        return bool(llama_cpp.llama_memory_seq_rm(self._mem, self.SEQ, n_keep, -1))

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    def save_sequence(self) -> ctypes.Array[ctypes.c_uint8]:
        size = int(llama_cpp.llama_state_seq_get_size(self.handle, self.SEQ))
        buf = (ctypes.c_uint8 * size)()
        n = int(llama_cpp.llama_state_seq_get_data(self.handle, buf, size, self.SEQ))
        if n != size:
            raise NativeError(f"saving the KV state copied {n} of {size} bytes")
        return buf

    def restore_sequence(self, buf: ctypes.Array[ctypes.c_uint8]) -> None:
        self.clear()
        n = int(llama_cpp.llama_state_seq_set_data(self.handle, buf, len(buf), self.SEQ))
        if n == 0:
            self.clear()
            raise NativeError("restoring a saved KV state failed")

    def set_adapters(self, adapters: Sequence[tuple[Any, float]]) -> None:
        n = len(adapters)
        if n == 0:
            rc = int(llama_cpp.llama_set_adapters_lora(self.handle, None, 0, None))
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*(a for a, _ in adapters))
            scales = (ctypes.c_float * n)(*(s for _, s in adapters))
            rc = int(llama_cpp.llama_set_adapters_lora(self.handle, handles, n, scales))
        if rc != 0:
            raise NativeError(f"llama_set_adapters_lora returned {rc}")

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class NativeSampler:
    """A llama.cpp sampler chain for one reply."""

    def __init__(
        self,
        model: NativeModel,
        *,
        temperature: float,
        top_p: float,
        top_k: int,
        repeat_penalty: float,
        seed: int | None,
        penalty_last_n: int = 64,
    ) -> None:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain: Any = chain
        add = llama_cpp.llama_sampler_chain_add
        if repeat_penalty > 0.0 and repeat_penalty != 1.0:
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    model.n_vocab, penalty_last_n, repeat_penalty, 0.0, 0.0
                ),
            )
        if temperature <= 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            add(
                chain,
                llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed),
            )

    def sample(self, ctx: NativeContext) -> int:
        """Sample (and accept) a token from the last decoded position's logits."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx.handle, -1))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def logits_of_last(ctx: NativeContext, n_vocab: int) -> list[float]:
    """A copy of the logits of the last decoded position (for tests and diagnostics)."""
    ptr = llama_cpp.llama_get_logits_ith(ctx.handle, -1)
    return [float(ptr[i]) for i in range(n_vocab)]

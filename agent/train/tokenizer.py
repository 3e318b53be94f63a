"""The inference engine's own tokenization, for training: llama.cpp's vocabulary and the GGUF's chat
template, so that the model is trained on exactly the tokens it later sees in chat.

It mirrors :mod:`agent.engine.llama_backend`'s prompt path: messages whose text spells a special token
are broken up with a word joiner (so they stay text), the conversation is rendered with the GGUF's
``tokenizer.chat_template`` (or the configured override) in Jinja's immutable sandbox
(:class:`agent.engine.chat_template.ChatTemplate`), tokenized by llama.cpp with special tokens parsed,
and BOS is prepended when the vocabulary asks for it and the template did not emit it.

The model is loaded vocabulary-only (no weights). llama.cpp is blocking; the trainer is a plain
process, so that is fine here.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.engine.chat_template import ChatTemplate
from agent.errors import ModelError
from agent.generation import ChatMessage

_TOKEN_ATTR_CONTROL = 1 << 3
_TOKEN_ATTR_USER_DEFINED = 1 << 4
_WORD_JOINER = "\u2060"


class LlamaVocab:
    """A GGUF's vocabulary, loaded by llama.cpp with ``vocab_only``."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        from agent.engine.native import init_backend

        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            raise ModelError(f"{path}: llama.cpp could not load the vocabulary")
        self._llama_cpp: Any = llama_cpp
        self._model: Any = model
        self._vocab: Any = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def special_token_texts(self) -> list[str]:
        out = []
        for tok in range(self.n_vocab):
            attr = int(self._llama_cpp.llama_vocab_get_attr(self._vocab, tok))
            if attr & (_TOKEN_ATTR_CONTROL | _TOKEN_ATTR_USER_DEFINED):
                text = self.token_text(tok)
                if len(text) > 1:
                    out.append(text)
        return out

    def chat_template(self) -> str | None:
        raw = self._llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def tokenize(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Tokens of ``text`` without BOS/EOS added."""
        llama_cpp = self._llama_cpp
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            arr = (llama_cpp.llama_token * cap)()
            n = int(llama_cpp.llama_tokenize(self._vocab, data, len(data), arr, cap, False, parse_special))
            if n >= 0:
                return list(arr[:n])
            if -n <= cap:
                raise ModelError(f"tokenization failed ({n})")
            cap = -n

    def piece(self, token: int) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False))
            if n >= 0:
                return buf.raw[:n]
            size = -n + 1

    def close(self) -> None:
        if self._model is not None:
            self._llama_cpp.llama_model_free(self._model)
            self._model = None


class ChatTokenizer:
    """Renders and tokenizes conversations the way the chat engine does."""

    def __init__(self, vocab: LlamaVocab, *, template_override: str | None = None) -> None:
        source = template_override or vocab.chat_template()
        if not source:
            raise ModelError("the GGUF has no tokenizer.chat_template; set model.chat_template in the config")
        self.vocab = vocab
        self.template = ChatTemplate(
            source, bos_token=vocab.token_text(vocab.bos), eos_token=vocab.token_text(vocab.eos)
        )
        specials = sorted(set(vocab.special_token_texts()), key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None

    def sanitize(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        pattern = self._special_re
        if pattern is None:
            return list(messages)
        out = []
        for m in messages:
            if pattern.search(m.content):
                content = pattern.sub(lambda mo: mo.group(0)[0] + _WORD_JOINER + mo.group(0)[1:], m.content)
                out.append(ChatMessage(role=m.role, content=content))
            else:
                out.append(m)
        return out

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def tokens(self, text: str) -> list[int]:
        """``text`` tokenized as the engine tokenizes a prompt (BOS added when the vocabulary wants it)."""
        tokens = self.vocab.tokenize(text, parse_special=True)
        v = self.vocab
        if v.add_bos and v.bos >= 0 and (not tokens or tokens[0] != v.bos):
            tokens.insert(0, v.bos)
        return tokens

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """What the engine feeds llama.cpp for a reply to ``messages``."""
        return self.tokens(self.render(self.sanitize(messages), add_generation_prompt=True))

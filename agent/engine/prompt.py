"""How a conversation becomes prompt tokens: one path for chat and for training.

The engine feeds llama.cpp exactly these tokens, and the trainer trains on exactly these tokens, so
that a LoRA adapter learns the inputs it later sees. Message text that spells a special token (e.g.
``</s>``) is broken up with a word joiner so that it stays text; the conversation is rendered with the
GGUF's ``tokenizer.chat_template`` (or the configured override) in Jinja's immutable sandbox
(:class:`~agent.engine.chat_template.ChatTemplate`); llama.cpp tokenizes it with special tokens
parsed; BOS is prepended when the vocabulary asks for it and the template did not emit it.

Only vocabulary reads happen here (no decoding), so it is safe off the engine's worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from agent.engine.chat_template import ChatTemplate
from agent.generation import ChatMessage

_WORD_JOINER = "\u2060"


class Vocabulary(Protocol):
    """What the prompt path reads of a model (:class:`agent.engine.native.NativeModel` has it)."""

    bos: int
    eos: int
    add_bos: bool

    def token_text(self, token: int) -> str: ...

    def special_token_texts(self) -> list[str]: ...

    def tokenize(self, text: str, *, parse_special: bool) -> list[int]: ...


class PromptFormat:
    """A vocabulary and a chat template: sanitize, render, tokenize."""

    def __init__(self, vocab: Vocabulary, template_source: str) -> None:
        self.vocab = vocab
        self.template = ChatTemplate(
            template_source, bos_token=vocab.token_text(vocab.bos), eos_token=vocab.token_text(vocab.eos)
        )
        specials = sorted(set(vocab.special_token_texts()), key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None

    def sanitize(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """Message text that spells a special token is broken up so that it stays text."""
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

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The sanitized conversation through the chat template."""
        return self.render_sanitized(self.sanitize(messages), add_generation_prompt=add_generation_prompt)

    def render_sanitized(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
        """Messages already passed through :meth:`sanitize` (once) through the chat template: for callers
        that render many prefixes of one conversation (the trainer's assistant-token spans)."""
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def tokens(self, text: str) -> list[int]:
        """``text`` tokenized as a prompt (BOS added when the vocabulary wants it and it is missing)."""
        tokens = self.vocab.tokenize(text, parse_special=True)
        v = self.vocab
        if v.add_bos and v.bos >= 0 and (not tokens or tokens[0] != v.bos):
            tokens.insert(0, v.bos)
        return tokens

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """What the engine feeds llama.cpp for a reply to ``messages``."""
        return self.tokens(self.render(messages, add_generation_prompt=True))

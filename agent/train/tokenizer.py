"""The inference engine's own tokenization, for training: llama.cpp's vocabulary and the GGUF's chat
template, through the engine's prompt path (:mod:`agent.engine.prompt`), so that the model is trained
on exactly the tokens it later sees in chat.

The model is loaded vocabulary-only (no weights). llama.cpp is blocking; the trainer is a plain
process, so that is fine here.
"""

from __future__ import annotations

from pathlib import Path

from agent.engine.native import NativeError, NativeModel
from agent.engine.prompt import PromptFormat
from agent.errors import ModelError


class LlamaVocab(NativeModel):
    """A GGUF's vocabulary and metadata, loaded by llama.cpp with ``vocab_only`` (no weights)."""

    def __init__(self, path: Path) -> None:
        try:
            super().__init__(Path(path), n_gpu_layers=0, use_mmap=True, vocab_only=True)
        except NativeError as exc:
            raise ModelError(f"{path}: llama.cpp could not load the vocabulary ({exc})") from None


class ChatTokenizer(PromptFormat):
    """Renders and tokenizes conversations the way the chat engine does."""

    def __init__(self, vocab: NativeModel, *, template_override: str | None = None) -> None:
        source = template_override or vocab.chat_template()
        if not source:
            raise ModelError("the GGUF has no tokenizer.chat_template; set model.chat_template in the config")
        super().__init__(vocab, source)
        self.vocab: NativeModel = vocab

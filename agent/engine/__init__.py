"""The inference engine: llama.cpp behind :class:`agent.generation.InferenceBackend`.

Modules: ``llama_backend`` (the public engine), ``worker`` (its thread), ``jobs`` (queued work and the
reply stream), ``native`` (the only llama_cpp import), and the pure parts ``chat_template``,
``context_window``, ``prefix_cache``, ``fair_queue``, ``text``.
Importing this package does not load llama.cpp; ``agent.engine.llama_backend`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.engine.llama_backend import ChatStream, EngineSettings, EngineStats, LlamaEngine

__all__ = ["ChatStream", "EngineSettings", "EngineStats", "LlamaEngine"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from agent.engine import llama_backend

        return getattr(llama_backend, name)
    raise AttributeError(name)

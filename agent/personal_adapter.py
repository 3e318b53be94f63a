"""The personal adapter in the running engine: attached at start, hot-swapped after each completed
personal training run, beside whatever else is attached (the fleet's global adapter).

The trainer writes ``<state_dir>/adapters/personal.gguf`` atomically, so the file is always whole;
the engine reloads it when its size or mtime changed. A file llama.cpp refuses leaves the adapters
that were attached in place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from agent.errors import AdapterError

log = logging.getLogger(__name__)

PERSONAL_FILE = "personal.gguf"


class AdapterHost(Protocol):
    """What the swap needs of the engine (``LlamaEngine`` has both)."""

    @property
    def adapters(self) -> tuple[tuple[Path, float], ...]: ...

    async def set_adapters(self, adapters: list[tuple[Path, float]]) -> None: ...


def personal_adapter_path(adapters_dir: Path) -> Path:
    return adapters_dir / PERSONAL_FILE


async def swap_in_personal(host: AdapterHost, path: Path, *, scale: float = 1.0) -> bool:
    """Attach (or reload) the personal adapter at ``path``, keeping every other adapter.
    Returns False, with the previous adapters kept, when the file is missing or refused."""
    if not path.exists():
        return False
    target = path.resolve()
    others = [(p, s) for p, s in host.adapters if Path(p).resolve() != target]
    try:
        await host.set_adapters([*others, (path, scale)])
    except AdapterError as exc:
        log.error("the personal adapter %s does not load; keeping the previous adapters: %s", path, exc)
        return False
    log.info("personal adapter %s attached", path)
    return True

"""Training checkpoints: safetensors tensors + a JSON state, written atomically, never pickled.

A checkpoint directory holds ``state.json`` and the tensor file it names
(``weights-<step>.safetensors``). The tensors are written first, then ``state.json`` (both atomically,
fsynced), then older tensor files are removed; a crash at any point leaves a consistent checkpoint
(the previous or the new one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError
from agent.train.kinds import AdapterKind
from fleet.files import write_atomic

STATE_FILE = "state.json"
MAX_STATE_BYTES = 1 << 20


class CheckpointError(AgentError):
    """A checkpoint cannot be read or written (the run starts afresh, its charge stands)."""


class CheckpointState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    version: Literal[1] = 1
    run_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    adapter: AdapterKind
    round_id: int | None = None
    ffa_seed: int | None = None
    fingerprint: str
    """What must match to resume: model, LoRA shape, init (see trainer)."""
    steps_done: int = Field(ge=0)
    planned_steps: int = Field(ge=1)
    charged_at: float
    holdout_before: float | None = None
    train_loss_first: float | None = None
    weights_file: str = Field(pattern=r"^weights-[0-9]{8}\.safetensors$")


def save_checkpoint(
    directory: Path, state: CheckpointState, tensors: Mapping[str, NDArray[np.float32]]
) -> None:
    from safetensors.numpy import save

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"weights-{state.steps_done:08d}.safetensors"
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    try:
        write_atomic(directory / name, data, mode=0o600)
        final = state.model_copy(update={"weights_file": name})
        write_atomic(directory / STATE_FILE, final.model_dump_json(indent=1).encode() + b"\n", mode=0o600)
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint in {directory}: {exc}") from None
    for old in directory.glob("weights-*.safetensors"):
        if old.name != name:
            with contextlib.suppress(OSError):
                old.unlink()


def load_checkpoint(directory: Path) -> tuple[CheckpointState, dict[str, NDArray[np.float32]]] | None:
    """The checkpoint in ``directory``, or ``None`` if there is none."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = directory / STATE_FILE
    try:
        raw = path.read_bytes()[: MAX_STATE_BYTES + 1]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        state = CheckpointState.model_validate_json(raw)
        tensors = load((directory / state.weights_file).read_bytes())
    except (ValidationError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"the checkpoint in {directory} is unusable: {exc}") from None
    return state, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def clear_checkpoint(directory: Path) -> None:
    """Remove a checkpoint (after its run finished)."""
    with contextlib.suppress(FileNotFoundError):
        (directory / STATE_FILE).unlink()
    for old in directory.glob("weights-*.safetensors"):
        with contextlib.suppress(OSError):
            old.unlink()

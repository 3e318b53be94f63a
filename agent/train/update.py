"""The fleet update a training run hands to the fleet client: the change of the B matrices.

``agent train --adapter fleet`` writes it; the fleet client reads it, clips it to the round's norm
bound, sparsifies, seals and sends it (fleet/codec.py, fleet/sealing.py). It never holds examples,
tokens or per-example gradients: only the DP-trained B matrices' change (post-processing of a DP
result), with what the ledger charged for it.

File format: one :mod:`fleet.framing` frame (JSON header + float32 tensors, :mod:`fleet.tensors`),
written atomically. Tensor names are the base GGUF weight names with ``.lora_b``
(``blk.0.attn_q.weight.lora_b``), shape ``(out, rank)`` in GGUF orientation (for llama's q/k, rows
permuted as llama.cpp stores them), exactly what goes into the adapter GGUF. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import PrivacyError
from fleet.errors import FleetError
from fleet.files import write_atomic
from fleet.framing import Limits, pack, unpack
from fleet.tensors import DEFAULT_TENSOR_LIMITS, TensorDType, TensorInfo, pack_dense, unpack_dense

UPDATE_LIMITS = Limits(max_header=1 << 20, max_payload=256 * 1024 * 1024)
B_SUFFIX = ".lora_b"


class FleetDeltaHeader(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["fleet_delta"] = "fleet_delta"
    v: Literal[1] = 1
    round_id: int = Field(ge=1)
    run_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    ffa_seed: int = Field(ge=0)
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0.0)
    target_modules: tuple[str, ...]
    architecture: str
    base_model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    init_from: str | None = None
    """What B started from: ``zeros`` or the global release's B (its file name)."""
    epsilon: float = Field(ge=0.0)
    """The run's own ε at ``delta`` (already charged in the ledger)."""
    delta: float = Field(gt=0.0, lt=1.0)
    sample_count: int = Field(ge=1)
    steps: int = Field(ge=0)
    tensors: tuple[TensorInfo, ...]


def write_fleet_delta(
    path: Path, header: FleetDeltaHeader, arrays: Mapping[str, NDArray[np.floating]]
) -> FleetDeltaHeader:
    """Write the delta ``arrays`` with ``header`` (its ``tensors`` are replaced) atomically."""
    for name in arrays:
        if not name.endswith(B_SUFFIX):
            raise ValueError(f"fleet delta tensor {name!r} is not a B matrix ({B_SUFFIX})")
    infos, data = pack_dense(dict(arrays), dtype=TensorDType.FLOAT32)
    full = header.model_copy(update={"tensors": tuple(infos)})
    write_atomic(path, pack(full.model_dump(mode="json"), data, limits=UPDATE_LIMITS), mode=0o600)
    return full


def read_fleet_delta(path: Path) -> tuple[FleetDeltaHeader, dict[str, NDArray[np.float32]]]:
    """Read and check a fleet delta file."""
    try:
        raw = Path(path).read_bytes()
        frame = unpack(raw, limits=UPDATE_LIMITS)
        header = FleetDeltaHeader.model_validate(frame.header)
        arrays = unpack_dense(header.tensors, frame.payload, limits=DEFAULT_TENSOR_LIMITS)
    except OSError as exc:
        raise PrivacyError(f"cannot read the fleet update {path}: {exc}") from None
    except (FleetError, ValidationError) as exc:
        raise PrivacyError(f"the fleet update {path} is invalid: {exc}") from None
    return header, arrays

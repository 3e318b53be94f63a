"""The device's error-feedback residual, persisted atomically in a fleet frame (no pickle, no npz).

File layout: one :mod:`fleet.framing` frame whose header is ``{"kind": "residual", "v": 1, "key": ...,
"tensors": [...]}`` and whose payload is the float32 tensors (:mod:`fleet.tensors`). ``key`` names what
the residual belongs to (for example the base model hash, LoRA rank, targets and frozen-A seed): a
residual saved under another key is stale and :func:`load_residual` returns ``None`` for it.

Save the new residual only once the update it came with is durably queued for sending; if the device
crashes in between, the old residual is kept and the round's update is simply not sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fleet.errors import ResidualError, WireError
from fleet.files import write_atomic
from fleet.framing import Limits, pack, read_frame
from fleet.tensors import (
    DEFAULT_TENSOR_LIMITS,
    FloatArray,
    Layout,
    TensorDType,
    TensorInfo,
    TensorLimits,
    pack_dense,
    unpack_dense,
)

RESIDUAL_VERSION: Final = 1
ResidualKey = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]


class ResidualHeader(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["residual"] = "residual"
    v: Literal[1] = RESIDUAL_VERSION
    key: ResidualKey
    tensors: tuple[TensorInfo, ...] = Field(min_length=1)


def save_residual(path: Path, residual: Mapping[str, NDArray[np.floating]], *, key: str) -> None:
    """Atomically write ``residual`` (float32) under ``key``."""
    try:
        infos, payload = pack_dense(residual, dtype=TensorDType.FLOAT32)
        header = ResidualHeader(key=key, tensors=infos)
    except (WireError, ValidationError) as exc:
        raise ResidualError(f"cannot save the residual: {exc}") from None
    write_atomic(
        Path(path), pack(header.model_dump(mode="json"), payload, limits=_limits(DEFAULT_TENSOR_LIMITS))
    )


def _limits(tensors: TensorLimits) -> Limits:
    return Limits(max_header=1 << 20, max_payload=min(0xFFFFFFFF, 4 * tensors.max_total_elements))


def load_residual(
    path: Path,
    *,
    key: str,
    expected: Layout | None = None,
    limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
) -> dict[str, FloatArray] | None:
    """Read the residual saved under ``key``: ``None`` if there is none or it has another key.

    Raises :class:`ResidualError` if the file is corrupt or its tensors differ from ``expected``.
    """
    try:
        with Path(path).open("rb") as fh:
            frame = read_frame(fh, limits=_limits(limits))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ResidualError(f"cannot read the residual {path}: {exc}") from None
    except WireError as exc:
        raise ResidualError(f"the residual file {path} is corrupt: {exc}") from None
    try:
        header = ResidualHeader.model_validate(frame.header)
    except ValidationError as exc:
        raise ResidualError(
            f"the residual file {path} has an invalid header: {exc.error_count()} errors"
        ) from None
    if header.key != key:
        return None
    try:
        return unpack_dense(header.tensors, frame.payload, limits=limits, expected=expected)
    except WireError as exc:
        raise ResidualError(f"the residual file {path} does not fit: {exc}") from None

"""FFA-LoRA's frozen A matrices, derived from the round's seed: the same bytes on every device.

FFA-LoRA (Sun et al., ICLR 2024) freezes every LoRA A matrix at its random initialisation and trains
only B. When every device of a round uses the *same* A, averaging the devices' B matrices is exactly
averaging their weight updates ``B·A`` (averaging A and B separately is not), and an update is half
the size.

So A must be reproducible bit for bit on any machine (x86 coordinator, ARM boards), any numpy or torch
version. It is therefore not drawn from a library RNG (whose streams may change between versions) but
from SHAKE-256, an extendable-output hash in Python's standard library. The generator, version 1:

    key    = b"ppchat/ffa-lora-a/v1" || 0x00 || seed (8 bytes, big-endian, unsigned)
             || 0x00 || name (UTF-8) || 0x00 || rank (4 bytes BE) || in_features (4 bytes BE)
    stream = SHAKE-256(key), the first 4 * rank * in_features bytes
    u[i]   = (uint32 little-endian word i of stream + 0.5) / 2**32          (in (0, 1))
    A      = float32((2 * u - 1) / sqrt(in_features)), row-major, shape (rank, in_features)

``name`` is the base weight's GGUF tensor name (``blk.0.attn_q.weight``), which is what the adapter
GGUF and the fleet messages use. The distribution, uniform on ``±1/sqrt(in_features)``, is the
Kaiming-uniform initialisation (``a = sqrt(5)``) that torch's ``nn.Linear`` and peft give LoRA's A.
This module needs only numpy, so the coordinator and the daemon can rebuild an adapter from a seed.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numpy.typing import NDArray

FFA_GENERATOR_VERSION = 1
_DOMAIN = b"ppchat/ffa-lora-a/v1"
MAX_ELEMENTS = 1 << 28


def frozen_a(*, seed: int, name: str, rank: int, in_features: int) -> NDArray[np.float32]:
    """The frozen A matrix (``rank`` x ``in_features``, float32) of the module ``name`` for ``seed``."""
    if not 0 <= seed < 2**64:
        raise ValueError("seed must fit in 64 unsigned bits")
    if rank < 1 or in_features < 1:
        raise ValueError("rank and in_features must be positive")
    n = rank * in_features
    if n > MAX_ELEMENTS:
        raise ValueError(f"A would have {n} elements (limit {MAX_ELEMENTS})")
    key = b"".join(
        (
            _DOMAIN,
            b"\x00",
            seed.to_bytes(8, "big"),
            b"\x00",
            name.encode("utf-8"),
            b"\x00",
            rank.to_bytes(4, "big"),
            in_features.to_bytes(4, "big"),
        )
    )
    stream = hashlib.shake_256(key).digest(4 * n)
    words = np.frombuffer(stream, dtype="<u4").astype(np.float64)
    u = (words + 0.5) / 2.0**32
    a = (2.0 * u - 1.0) / math.sqrt(in_features)
    return a.astype(np.float32).reshape(rank, in_features)

"""Several federated rounds through the device's codec path versus dense FedAvg, on the same data.

    python -m bench.round_codec [--rounds 200] [--devices 8]

Each device holds its own (heterogeneous) least-squares data for a set of B-shaped matrices (the
demo adapter's layout: q and v B matrices of 4 blocks, rank 4) and runs a few local gradient steps
from the global matrices each round; its update is the change. Both arms clip every update to the
same L2 norm bound. The codec arm then does exactly what the fleet client does (fleet.codec.encode
at top-k 5 % with the durable error-feedback residual, int8, then fleet.sealing.seal_update) and the
server decodes and averages; the dense arm averages the clipped float32 updates.

Prints: sealed bytes / dense float32 bytes per update, and the validation loss after the last round,
codec over dense (target: <= 1.05, i.e. at most 5 % worse). A synthetic task, so it isolates the
codec's effect on convergence from DP noise and from the model.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

import numpy as np
from numpy.typing import NDArray

from fleet.codec import CodecParams, Quantization, decode, encode
from fleet.keys import Identity, Role
from fleet.messages import UpdateHeader
from fleet.sealing import new_nonce, seal_update

LOSS_TARGET = 1.05
SHAPES = {
    f"blk.{b}.attn_{m}.weight.lora_b": (256 if m == "q" else 64, 4) for b in range(4) for m in ("q", "v")
}
Arrays = dict[str, NDArray[np.float64]]


def make_devices(
    n: int, *, samples: int, truth: Arrays, rng: np.random.Generator
) -> list[tuple[Arrays, Arrays]]:
    devices = []
    for _ in range(n):
        x = {k: rng.standard_normal((samples, s[1])) * rng.uniform(0.5, 1.5) for k, s in SHAPES.items()}
        shift = {k: truth[k] + 0.3 * rng.standard_normal(s) for k, s in SHAPES.items()}  # heterogeneity
        y = {k: x[k] @ shift[k].T + 0.1 * rng.standard_normal((samples, SHAPES[k][0])) for k in SHAPES}
        devices.append((x, y))
    return devices


def loss(w: Arrays, data: list[tuple[Arrays, Arrays]]) -> float:
    total = 0.0
    for x, y in data:
        total += sum(float(np.mean((x[k] @ w[k].T - y[k]) ** 2)) for k in SHAPES)
    return total / len(data)


def local_update(w: Arrays, x: Arrays, y: Arrays, *, steps: int, lr: float) -> Arrays:
    cur = {k: v.copy() for k, v in w.items()}
    for _ in range(steps):
        for k in SHAPES:
            grad = 2.0 * (x[k] @ cur[k].T - y[k]).T @ x[k] / len(x[k])
            cur[k] -= lr * grad
    return {k: cur[k] - w[k] for k in SHAPES}


def clip(update: Arrays, bound: float) -> Arrays:
    norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in update.values())))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--norm-bound", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    truth = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    devices = make_devices(args.devices, samples=64, truth=truth, rng=rng)
    validation = make_devices(4, samples=64, truth=truth, rng=np.random.default_rng(1))
    coordinator = Identity.generate(Role.COORDINATOR)
    ids = [Identity.generate(Role.DEVICE) for _ in devices]
    dense_w: Arrays = {k: np.zeros(s) for k, s in SHAPES.items()}
    codec_w: Arrays = {k: np.zeros(s) for k, s in SHAPES.items()}
    residuals: list[dict[str, NDArray[np.float32]] | None] = [None] * len(devices)
    sealed_sizes: list[int] = []
    dense_bytes = sum(int(np.prod(s)) * 4 for s in SHAPES.values())
    for round_id in range(1, args.rounds + 1):
        dense_sum = {k: np.zeros(s) for k, s in SHAPES.items()}
        codec_sum = {k: np.zeros(s) for k, s in SHAPES.items()}
        for i, (x, y) in enumerate(devices):
            dense_up = clip(local_update(dense_w, x, y, steps=3, lr=args.lr), args.norm_bound)
            for k in SHAPES:
                dense_sum[k] += dense_up[k]
            codec_up = clip(local_update(codec_w, x, y, steps=3, lr=args.lr), args.norm_bound)
            enc = encode(
                {k: v.astype(np.float32) for k, v in codec_up.items()},
                residuals[i],
                norm_bound=args.norm_bound,
                topk_fraction=args.topk,
                quantization=Quantization.INT8,
            )
            residuals[i] = enc.residual
            header = UpdateHeader(
                round_id=round_id,
                device_id=ids[i].id,
                nonce=new_nonce(),
                sample_count=64,
                norm_bound=args.norm_bound,
                epsilon=1.0,
                delta=1e-5,
                codec=CodecParams(quantization=Quantization.INT8, topk_fraction=args.topk),
                sent_at=datetime.now(timezone.utc),
            )
            sealed_sizes.append(
                len(seal_update(header, enc.data, device=ids[i], coordinator=coordinator.public))
            )
            got = decode(enc.data)
            for k in SHAPES:
                codec_sum[k] += got[k]
        for k in SHAPES:
            dense_w[k] += dense_sum[k] / len(devices)
            codec_w[k] += codec_sum[k] / len(devices)
    initial = loss({k: np.zeros(s) for k, s in SHAPES.items()}, validation)
    dense_loss, codec_loss = loss(dense_w, validation), loss(codec_w, validation)
    size_ratio = dense_bytes / float(np.mean(sealed_sizes))
    loss_ratio = codec_loss / dense_loss
    print(
        f"dense update {dense_bytes} B, sealed top-{args.topk:.0%} int8 update {np.mean(sealed_sizes):.0f} B"
    )
    n_values = sum(int(np.prod(s)) for s in SHAPES.values())
    print(f"size: {size_ratio:.1f}x smaller (a tiny layout, {n_values} values; bench.codec has a 0.5B one)")
    print(
        f"validation loss after {args.rounds} rounds: start {initial:.3f}, dense {dense_loss:.4f}, ", end=""
    )
    print(f"codec {codec_loss:.4f}")
    print(f"codec / dense loss: {loss_ratio:.4f} (target <= {LOSS_TARGET})")
    return 0 if loss_ratio <= LOSS_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

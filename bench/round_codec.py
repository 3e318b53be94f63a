"""Several federated rounds through the device's codec path versus dense FedAvg, on the same data.

    python -m bench.round_codec [--setting TOPK:ROUNDS ...] [--devices 8]

Each device holds its own (heterogeneous) least-squares data for a set of B-shaped matrices (the
demo adapter's layout: q and v B matrices of 4 blocks, rank 4) and runs a few local gradient steps
from the global matrices each round; its update is the change. Both arms clip every update to the
same L2 norm bound. The codec arm then does exactly what the fleet client does (fleet.codec.encode
with the durable error-feedback residual, int8, then fleet.sealing.seal_update) and the server
decodes and averages; the dense arm averages the clipped float32 updates.

Two settings by default: top-k 5 % (the coordinator's default) over 200 rounds, and top-k 1 % (the
setting that makes a 0.5B-class model's update >= 100x smaller) over 1,000 rounds, since a device
then sends a fifth of the values per round. For each: the sealed size ratio (here and for a
0.5B-class model's layout), the validation loss after the last round, codec over dense (target:
<= 1.05, i.e. at most 5 % worse), and the round from which it stayed within the target. A synthetic
task, so it isolates the codec's effect on convergence from DP noise and from the model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Outcome:
    topk: float
    rounds: int
    initial: float
    dense_loss: float
    codec_loss: float
    sealed_bytes: float
    dense_bytes: int
    first_within: int | None
    """The first round after which codec / dense loss stayed <= the target to the end."""

    @property
    def loss_ratio(self) -> float:
        return self.codec_loss / self.dense_loss


def run(*, topk: float, rounds: int, devices: int, norm_bound: float, lr: float) -> Outcome:
    rng = np.random.default_rng(0)
    truth = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    data = make_devices(devices, samples=64, truth=truth, rng=rng)
    validation = make_devices(4, samples=64, truth=truth, rng=np.random.default_rng(1))
    coordinator = Identity.generate(Role.COORDINATOR)
    ids = [Identity.generate(Role.DEVICE) for _ in data]
    dense_w: Arrays = {k: np.zeros(s) for k, s in SHAPES.items()}
    codec_w: Arrays = {k: np.zeros(s) for k, s in SHAPES.items()}
    residuals: list[dict[str, NDArray[np.float32]] | None] = [None] * len(data)
    sealed_sizes: list[int] = []
    first_within: int | None = None
    for round_id in range(1, rounds + 1):
        dense_sum = {k: np.zeros(s) for k, s in SHAPES.items()}
        codec_sum = {k: np.zeros(s) for k, s in SHAPES.items()}
        for i, (x, y) in enumerate(data):
            dense_up = clip(local_update(dense_w, x, y, steps=3, lr=lr), norm_bound)
            for k in SHAPES:
                dense_sum[k] += dense_up[k]
            codec_up = clip(local_update(codec_w, x, y, steps=3, lr=lr), norm_bound)
            enc = encode(
                {k: v.astype(np.float32) for k, v in codec_up.items()},
                residuals[i],
                norm_bound=norm_bound,
                topk_fraction=topk,
                quantization=Quantization.INT8,
            )
            residuals[i] = enc.residual
            header = UpdateHeader(
                round_id=round_id,
                device_id=ids[i].id,
                nonce=new_nonce(),
                sample_count=64,
                norm_bound=norm_bound,
                epsilon=1.0,
                delta=1e-5,
                codec=CodecParams(quantization=Quantization.INT8, topk_fraction=topk),
                sent_at=datetime.now(timezone.utc),
            )
            sealed_sizes.append(
                len(seal_update(header, enc.data, device=ids[i], coordinator=coordinator.public))
            )
            got = decode(enc.data)
            for k in SHAPES:
                codec_sum[k] += got[k]
        for k in SHAPES:
            dense_w[k] += dense_sum[k] / len(data)
            codec_w[k] += codec_sum[k] / len(data)
        within = loss(codec_w, validation) <= LOSS_TARGET * loss(dense_w, validation)
        if within and first_within is None:
            first_within = round_id
        elif not within:
            first_within = None
    return Outcome(
        topk=topk,
        rounds=rounds,
        initial=loss({k: np.zeros(s) for k, s in SHAPES.items()}, validation),
        dense_loss=loss(dense_w, validation),
        codec_loss=loss(codec_w, validation),
        sealed_bytes=float(np.mean(sealed_sizes)),
        dense_bytes=sum(int(np.prod(s)) * 4 for s in SHAPES.values()),
        first_within=first_within,
    )


def realistic_size_ratio(topk: float) -> float:
    """Dense float32 bytes / sealed bytes of a 0.5B-class model's update at this top-k (bench.codec)."""
    from bench.codec import QWEN_05B, sealed_update, synthetic_update

    update = synthetic_update(QWEN_05B.layout(), np.random.default_rng(0))
    dense = sum(a.nbytes for a in update.values())
    coordinator, device = Identity.generate(Role.COORDINATOR), Identity.generate(Role.DEVICE)
    return dense / len(sealed_update(device, coordinator, update, Quantization.INT8, topk=topk))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setting",
        action="append",
        metavar="TOPK:ROUNDS",
        help="top-k fraction and rounds (repeatable; default 0.05:200 and 0.01:1000)",
    )
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--norm-bound", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    settings = [
        (float(t), int(r)) for t, r in (x.split(":") for x in args.setting or ["0.05:200", "0.01:1000"])
    ]
    n_values = sum(int(np.prod(s)) for s in SHAPES.values())
    print(
        f"{args.devices} heterogeneous devices, {n_values} B-matrix values, int8, "
        f"norm bound {args.norm_bound}"
    )
    met = True
    for topk, rounds in settings:
        o = run(topk=topk, rounds=rounds, devices=args.devices, norm_bound=args.norm_bound, lr=args.lr)
        ok = o.loss_ratio <= LOSS_TARGET
        met = met and ok
        within = f"within target from round {o.first_within}" if o.first_within else "not within target"
        print(f"\ntop-k {topk:.0%}, {rounds} rounds:")
        print(
            f"  sealed update {o.sealed_bytes:.0f} B vs dense {o.dense_bytes} B here "
            f"({o.dense_bytes / o.sealed_bytes:.1f}x); a 0.5B-class model's update: "
            f"{realistic_size_ratio(topk):.0f}x smaller (target >= 100x)"
        )
        print(
            f"  validation loss: start {o.initial:.3f}, dense FedAvg {o.dense_loss:.4f}, "
            f"codec {o.codec_loss:.4f}; codec / dense {o.loss_ratio:.4f} "
            f"(target <= {LOSS_TARGET}; {within})"
        )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

"""The fleet update codec: how small a sealed update is, and how fast the coordinator opens them.

    python -m bench.codec [--seconds 3]

1. Size: bytes of a sealed update (codec, signature, box, framing, header: everything published)
   versus the dense float32 update, at top-k 1 %, for the demo model's rank-8 q/v B matrices and
   for a 0.5B-class model (Qwen2.5-0.5B shapes: 24 layers, hidden 896, 2 KV heads of 64).
   Target: >= 100x smaller for a realistic model.
2. Throughput: sealed updates parsed, signature-verified, replay-checked, decrypted and decoded to
   dense arrays per CPU second on one core (aggregation itself is measured by the coordinator's
   bench). CPU time, not wall time, so that other load on the machine does not skew it.
   Target: >= 1,000/s.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from fleet.codec import CodecParams, Quantization, decode, encode
from fleet.errors import UnknownDevice
from fleet.keys import Identity, PublicKeys, Role
from fleet.messages import UpdateHeader
from fleet.sealing import ReplayGuard, UpdateOpener, new_nonce, seal_update

SIZE_TARGET = 100.0
THROUGHPUT_TARGET = 1000.0
TOPK = 0.01
NOW = datetime.now(timezone.utc)


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    kv_dim: int
    rank: int = 8

    def layout(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for i in range(self.layers):
            prefix = f"base_model.model.model.layers.{i}.self_attn"
            out[f"{prefix}.q_proj.lora_B.weight"] = (self.hidden, self.rank)
            out[f"{prefix}.v_proj.lora_B.weight"] = (self.kv_dim, self.rank)
        return out


DEMO = Model("demo model (4 layers, hidden 256)", layers=4, hidden=256, kv_dim=128)
QWEN_05B = Model("0.5B model (24 layers, hidden 896)", layers=24, hidden=896, kv_dim=128)


class _Registry:
    def __init__(self, devices: list[Identity]) -> None:
        self._keys = {d.id: d.public for d in devices}

    def device_keys(self, device_id: str) -> PublicKeys:
        try:
            return self._keys[device_id]
        except KeyError:
            raise UnknownDevice(device_id) from None


class _Clock:
    def now(self) -> datetime:
        return NOW


def synthetic_update(layout: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    # B-matrix deltas after a few DP-SGD steps: small, dense, roughly Gaussian with uneven rows.
    return {
        name: (rng.standard_normal(shape) * rng.uniform(0.2, 1.0, size=(shape[0], 1)) * 1e-3).astype(
            np.float32
        )
        for name, shape in layout.items()
    }


def sealed_update(
    device: Identity,
    coordinator: Identity,
    update: dict[str, np.ndarray],
    quantization: Quantization,
    round_id: int = 1,
    *,
    topk: float = TOPK,
) -> bytes:
    encoded = encode(update, norm_bound=1.0, topk_fraction=topk, quantization=quantization)
    header = UpdateHeader(
        round_id=round_id,
        device_id=device.id,
        nonce=new_nonce(),
        sample_count=500,
        norm_bound=1.0,
        epsilon=0.8,
        delta=1e-5,
        codec=CodecParams(quantization=quantization, topk_fraction=topk),
        sent_at=NOW,
    )
    return seal_update(header, encoded.data, device=device, coordinator=coordinator.public)


def size_ratios(coordinator: Identity, device: Identity) -> list[tuple[str, Quantization, int, int]]:
    rng = np.random.default_rng(0)
    rows = []
    for model in (DEMO, QWEN_05B):
        update = synthetic_update(model.layout(), rng)
        dense = sum(a.nbytes for a in update.values())
        for quantization in Quantization:
            rows.append(
                (
                    model.name,
                    quantization,
                    dense,
                    len(sealed_update(device, coordinator, update, quantization)),
                )
            )
    return rows


def throughput(coordinator: Identity, model: Model, *, seconds: float, devices: int = 64) -> float:
    rng = np.random.default_rng(1)
    identities = [Identity.generate(Role.DEVICE) for _ in range(devices)]
    layout = model.layout()
    sealed = [
        (identity.id, sealed_update(identity, coordinator, synthetic_update(layout, rng), Quantization.INT8))
        for identity in identities
    ]
    opener = UpdateOpener(coordinator, _Registry(identities))
    opened = 0
    # CPU time of this (single-threaded) process: one core's work, robust on a shared machine.
    start = time.process_time()
    deadline = start + seconds
    while time.process_time() < deadline:
        guard = ReplayGuard(clock=_Clock())  # a fresh round per pass over the devices
        guard.open_round(1, deadline=NOW + timedelta(hours=1))
        for device_id, data in sealed:
            update = opener.open(data, device_id=device_id)
            guard.check(update.header)
            decode(update.encoded, expected=layout)
            guard.record(update.header)
            opened += 1
    return opened / (time.process_time() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per throughput measurement")
    args = parser.parse_args(argv)
    coordinator = Identity.generate(Role.COORDINATOR)
    device = Identity.generate(Role.DEVICE)

    print(f"sealed update size vs dense float32, top-k {TOPK:.0%} (target >= {SIZE_TARGET:.0f}x smaller):")
    ok = True
    for name, quantization, dense, sealed in size_ratios(coordinator, device):
        ratio = dense / sealed
        if name == QWEN_05B.name:  # the target is for a realistic model; the demo model is a toy
            ok &= ratio >= SIZE_TARGET
            verdict = "meets target" if ratio >= SIZE_TARGET else "MISSES target"
        else:
            verdict = "(toy size: fixed overhead dominates)"
        print(
            f"  {name:38s} {quantization.value:5s} dense {dense:>9,d} B  sealed {sealed:>7,d} B  "
            f"{ratio:6.1f}x  {verdict}"
        )

    print(
        f"coordinator: sealed updates opened (verify, replay check, decrypt, decode) per second, one core "
        f"(target >= {THROUGHPUT_TARGET:,.0f}/s):"
    )
    for model in (DEMO, QWEN_05B):
        rate = throughput(coordinator, model, seconds=args.seconds)
        ok &= rate >= THROUGHPUT_TARGET
        verdict = "meets target" if rate >= THROUGHPUT_TARGET else "MISSES target"
        print(f"  {model.name:38s} {rate:>9,.0f}/s  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

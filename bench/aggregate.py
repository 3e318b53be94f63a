"""Coordinator throughput: sealed updates verified, decrypted, decoded and aggregated per second.

    python -m bench.aggregate [--devices 1000] [--topk 0.05]

Pinned to one core. Demo-sized updates: the demo model's rank-8 LoRA B matrices on q_proj and v_proj
(4 layers, hidden 256, 2 KV heads of 64: 12,288 values), clipped, top-k sparsified, int8-quantized,
zstd-compressed and sealed by N enrolled devices, as a round would receive them. Two figures:

1. **pipeline**: parse + verify signature + decrypt + decode to dense float32 + aggregate (FedAvg with
   capped weights), without storage: what one core can open and average.
2. **service path**: :meth:`RoundManager.receive` for each update in batches of 256 per SQLite
   transaction (as the service commits them), with every check (replay, deadline, layout, norm,
   sparsity) and the store write, then :meth:`RoundManager.close` (aggregate, sign and store the
   release).

Target: >= 1,000 updates/s for both.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from coordinator.aggregate import AggregationSettings, ClientUpdate, aggregate
from coordinator.config import RoundDefaults
from coordinator.rounds import RoundManager, RoundPlan
from coordinator.service import MAX_BATCH
from coordinator.store import RoundState, Store
from fleet.codec import decode, encode
from fleet.errors import UnknownDevice
from fleet.keys import Identity, PublicKeys, Role
from fleet.messages import RoundSpec, UpdateHeader
from fleet.sealing import UpdateOpener, new_nonce, seal_update

TARGET = 1000.0
LAYERS, HIDDEN, KV_DIM, RANK = 4, 256, 128, 8


class FixedClock:
    def __init__(self) -> None:
        self.current = datetime.now(timezone.utc)

    def now(self) -> datetime:
        return self.current


class _Registry:
    def __init__(self, devices: list[Identity]) -> None:
        self._keys = {d.id: d.public for d in devices}

    def device_keys(self, device_id: str) -> PublicKeys:
        try:
            return self._keys[device_id]
        except KeyError:
            raise UnknownDevice(device_id) from None


def demo_layout() -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for i in range(LAYERS):
        prefix = f"base_model.model.model.layers.{i}.self_attn"
        out[f"{prefix}.q_proj.lora_B.weight"] = (HIDDEN, RANK)
        out[f"{prefix}.v_proj.lora_B.weight"] = (KV_DIM, RANK)
    return out


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        return f"pinned to CPU {core}"
    return "not pinned (no sched_setaffinity)"


def seal_all(spec: RoundSpec, devices: list[Identity], coordinator: Identity) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    layout = demo_layout()
    out = []
    for device in devices:
        delta = {
            name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in layout.items()
        }
        encoded = encode(
            delta,
            norm_bound=spec.norm_bound,
            topk_fraction=spec.codec.topk_fraction,
            quantization=spec.codec.quantization,
        )
        header = UpdateHeader(
            round_id=spec.round_id,
            device_id=device.id,
            nonce=new_nonce(),
            sample_count=int(rng.integers(20, 200)),
            norm_bound=spec.norm_bound,
            epsilon=1.0,
            delta=1e-5,
            codec=spec.codec,
            sent_at=spec.announced_at,
        )
        out.append(
            (device.id, seal_update(header, encoded.data, device=device, coordinator=coordinator.public))
        )
    return out


@dataclass(frozen=True)
class Rate:
    """Updates per CPU second (the process's own CPU time: fair on a shared machine) and per wall second."""

    count: int
    cpu_s: float
    wall_s: float

    @property
    def per_cpu_s(self) -> float:
        return self.count / self.cpu_s

    @property
    def per_wall_s(self) -> float:
        return self.count / self.wall_s


class _Timer:
    def __enter__(self) -> _Timer:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def pipeline_rate(sealed: list[tuple[str, bytes]], coordinator: Identity, devices: list[Identity]) -> Rate:
    opener = UpdateOpener(coordinator, _Registry(devices))
    settings = AggregationSettings()
    with _Timer() as timer:
        updates = []
        for device_id, blob in sealed:
            opened = opener.open(blob, device_id=device_id)
            updates.append(ClientUpdate(delta=decode(opened.encoded), num_samples=opened.header.sample_count))
        aggregate(updates, settings=settings)
    return Rate(len(sealed), timer.cpu, timer.wall)


def service_rate(
    sealed: list[tuple[str, bytes]], store: Store, rounds: RoundManager, round_id: int
) -> tuple[Rate, float]:
    with _Timer() as timer:
        for i in range(0, len(sealed), MAX_BATCH):
            with store.transaction():
                for device_id, blob in sealed[i : i + MAX_BATCH]:
                    rounds.receive(blob, topic_device=device_id)
        with _Timer() as closing:
            outcome = rounds.close(round_id)
    if outcome.state is not RoundState.RELEASED:
        raise SystemExit(f"the round did not release: {outcome.detail}")
    return Rate(len(sealed), timer.cpu, timer.wall), closing.wall


def enroll_all(store: Store, devices: list[Identity], *, now: float = 0.0) -> None:
    """Enroll ``devices`` straight into the coordinator's store, in one transaction."""
    with store.transaction():
        for i, device in enumerate(devices):
            store.add_device(
                device.id,
                name=f"bench-{i}",
                signing_pk=device.public.signing,
                encryption_pk=device.public.encryption,
                now=now,
            )


def open_round(
    store: Store,
    coordinator: Identity,
    devices: list[Identity],
    *,
    clock: FixedClock,
    defaults: RoundDefaults,
    base_model_sha256: str,
    ffa_seed: int,
) -> tuple[RoundManager, RoundSpec]:
    """Enroll ``devices`` straight into ``store`` and open a round on it, as the service would."""
    enroll_all(store, devices)
    rounds = RoundManager(
        store,
        coordinator,
        clock=clock,
        aggregation=AggregationSettings(),
        max_update_bytes=defaults.max_update_bytes,
    )
    spec = rounds.start_round(
        RoundPlan.from_defaults(defaults, base_model_sha256=base_model_sha256, ffa_seed=ffa_seed)
    )
    rounds.sync()
    return rounds, spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--topk", type=float, default=RoundDefaults().topk_fraction)
    args = parser.parse_args(argv)
    pinned = pin_one_core()

    coordinator = Identity.generate(Role.COORDINATOR)
    devices = [Identity.generate(Role.DEVICE) for _ in range(args.devices)]
    clock = FixedClock()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "coordinator.sqlite3")
        defaults = RoundDefaults(
            min_devices=1,
            target_devices=args.devices,
            deadline_s=3600,
            topk_fraction=args.topk,
            lora_rank=RANK,
        )
        rounds, spec = open_round(
            store,
            coordinator,
            devices,
            clock=clock,
            defaults=defaults,
            base_model_sha256="0" * 64,
            ffa_seed=1,
        )
        sealed = seal_all(spec, devices, coordinator)
        size = sum(len(b) for _, b in sealed) / len(sealed)
        pipeline = pipeline_rate(sealed, coordinator, devices)
        service, close_s = service_rate(sealed, store, rounds, spec.round_id)
        store.close()

    values = sum(int(np.prod(s)) for s in demo_layout().values())
    print(f"coordinator throughput, one core ({pinned}), {args.devices} devices")
    print(
        f"  update: {values} B-matrix values, top-k {args.topk:g}, int8, sealed {size:.0f} bytes on average"
    )
    print("  updates per CPU second (per wall second on this possibly shared machine):")
    print(
        f"    pipeline (verify + decrypt + decode + aggregate): {pipeline.per_cpu_s:7.0f}/s "
        f"({pipeline.per_wall_s:.0f}/s wall)"
    )
    print(
        f"    service path (+ checks, SQLite, release):        {service.per_cpu_s:7.0f}/s "
        f"({service.per_wall_s:.0f}/s wall; closing the round took {close_s * 1000:.0f} ms)"
    )
    print(
        f"  target: >= {TARGET:.0f} updates/s; ratio to target: pipeline {pipeline.per_cpu_s / TARGET:.2f}x, "
        f"service path {service.per_cpu_s / TARGET:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

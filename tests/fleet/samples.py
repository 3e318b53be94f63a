"""Sample messages, updates and small real collaborators (a registry, a clock) for the fleet tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np

from fleet.codec import CodecParams
from fleet.errors import UnknownDevice
from fleet.keys import Identity, PublicKeys
from fleet.messages import (
    DeviceState,
    DeviceStatus,
    EnrollmentReply,
    EnrollmentRequest,
    LoraSpec,
    Message,
    PrivacyTarget,
    Release,
    RoundSpec,
    Telemetry,
    UpdateHeader,
)
from fleet.sealing import new_nonce

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
BASE_SHA = "ab" * 32


class Registry:
    """A dict of enrolled devices (the coordinator's store plays this part in production)."""

    def __init__(self, *devices: PublicKeys) -> None:
        self.devices = {keys.id: keys for keys in devices}

    def device_keys(self, device_id: str) -> PublicKeys:
        try:
            return self.devices[device_id]
        except KeyError:
            raise UnknownDevice(device_id) from None


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


def round_spec(round_id: int = 1) -> RoundSpec:
    return RoundSpec(
        round_id=round_id,
        announced_at=T0,
        deadline=T0 + timedelta(minutes=30),
        min_devices=2,
        target_devices=3,
        local_epochs=1,
        learning_rate=1e-3,
        lora=LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj"), ffa_seed=1234),
        norm_bound=1.0,
        privacy=PrivacyTarget(epsilon=1.0, delta=1e-5),
        base_model_sha256=BASE_SHA,
    )


def update_header(identity: Identity, round_id: int = 1, nonce: str | None = None) -> UpdateHeader:
    return UpdateHeader(
        round_id=round_id,
        device_id=identity.id,
        nonce=nonce or new_nonce(),
        sample_count=42,
        norm_bound=1.0,
        epsilon=0.5,
        delta=1e-5,
        codec=CodecParams(topk_fraction=0.05),
        sent_at=T0 + timedelta(minutes=1),
    )


def small_update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_B": rng.standard_normal((16, 4)).astype(np.float32),
        "layers.0.v_proj.lora_B": rng.standard_normal((8, 4)).astype(np.float32),
    }


def sample_messages(device: Identity, coordinator: Identity) -> list[Message]:
    return [
        round_spec(),
        update_header(device),
        Release.build(
            small_update(),
            version=3,
            round_id=2,
            created_at=T0,
            base_model_sha256=BASE_SHA,
            lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), ffa_seed=7),
        ),
        DeviceStatus(device_id=device.id, state=DeviceState.TRAINING, at=T0, adapter_version=3, round_id=2),
        Telemetry(
            device_id=device.id, at=T0, uptime_s=12.5, cpu_percent=40.0, temperature_c=51.0, board="rpi5"
        ),
        EnrollmentRequest(
            device_id=device.id,
            signing_key=device.public.signing.hex(),
            encryption_key=device.public.encryption.hex(),
            token_id="abcdefgh1234",
            proof="00" * 32,
            requested_at=T0,
        ),
        EnrollmentReply(
            device_id=device.id,
            accepted=True,
            name="kitchen",
            coordinator_signing_key=coordinator.public.signing.hex(),
            coordinator_encryption_key=coordinator.public.encryption.hex(),
            replied_at=T0,
        ),
    ]

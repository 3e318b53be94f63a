"""Releases and the stored server optimizer state."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from coordinator.aggregate import AggregationSettings, ClientUpdate, ServerOptimizer, ServerState, aggregate
from coordinator.errors import AggregationError, ReleaseError
from coordinator.releases import build_release, decode_state, encode_state, fits, open_release
from fleet.codec import CodecParams
from fleet.keys import Identity, Role
from fleet.messages import LoraSpec, PrivacyTarget, RoundSpec

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _spec(seed: int = 1) -> RoundSpec:
    return RoundSpec(
        round_id=3,
        announced_at=NOW,
        deadline=NOW.replace(hour=1),
        min_devices=1,
        target_devices=2,
        local_epochs=1,
        learning_rate=0.01,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj",), ffa_seed=seed),
        norm_bound=1.0,
        codec=CodecParams(),
        privacy=PrivacyTarget(epsilon=1.0, delta=1e-5),
        base_model_sha256="ef" * 32,
    )


def test_release_is_signed_and_fits_its_round() -> None:
    identity = Identity.generate(Role.COORDINATOR)
    tensors = {"l0.q_proj.lora_B": np.arange(8, dtype=np.float32).reshape(2, 4)}
    signed = build_release(tensors, version=2, spec=_spec(), created_at=NOW, identity=identity)
    assert len(signed.signature) == 64
    release = open_release(signed.frame, signer=identity.public)
    assert release.version == 2 and release.round_id == 3
    np.testing.assert_array_equal(release.arrays()["l0.q_proj.lora_B"], tensors["l0.q_proj.lora_B"])
    assert fits(release, _spec()) and not fits(release, _spec(seed=2))
    with pytest.raises(ReleaseError):
        open_release(signed.frame, signer=Identity.generate(Role.COORDINATOR).public)
    with pytest.raises(ReleaseError):
        build_release(
            {"bad name!": tensors["l0.q_proj.lora_B"]},
            version=3,
            spec=_spec(),
            created_at=NOW,
            identity=identity,
        )


@pytest.mark.parametrize("optimizer", list(ServerOptimizer))
def test_server_state_round_trips(optimizer: ServerOptimizer) -> None:
    update = ClientUpdate(
        delta={"a": np.ones((2, 3), np.float32), "b": np.full(4, -2, np.float32)}, num_samples=1
    )
    state = aggregate([update], settings=AggregationSettings(optimizer=optimizer)).state
    restored = decode_state(encode_state(state))
    assert restored.optimizer is optimizer and restored.step == 1
    for slot, tensors in state.slots.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(restored.slots[slot][name], value)


def test_corrupt_state_is_an_aggregation_error() -> None:
    blob = encode_state(ServerState(optimizer=ServerOptimizer.FEDAVG, step=2))
    with pytest.raises(AggregationError):
        decode_state(blob[:-1] + b"x")
    with pytest.raises(AggregationError):
        decode_state(b"not a frame")

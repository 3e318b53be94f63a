"""Global fleet adapters on the device: rebuild a release's GGUF LoRA, keep the previous for rollback.

A release (:class:`fleet.messages.Release`) carries only the global B matrices and the frozen-A seed;
A is derived again here (:func:`agent.train.ffa.frozen_a`, the same bytes as in training), its input
size read from the base GGUF. numpy and gguf only: no torch in the daemon.

Files: ``<state_dir>/adapters/global/<version>.gguf`` (written atomically by
:func:`agent.train.export.write_lora_gguf`), the current and the previous one kept. The fleet client's
small state (enrollment, last round handled, adapter versions) is one JSON file in
``<state_dir>/fleet/state.json``, written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AdapterError
from agent.train.export import LoraAdapterFile, LoraPair, write_lora_gguf
from agent.train.ffa import frozen_a
from agent.train.update import B_SUFFIX, FleetDeltaHeader, write_fleet_delta
from fleet.files import write_atomic
from fleet.messages import Release

KEEP_VERSIONS = 2


@dataclass(frozen=True)
class BaseModelInfo:
    """What rebuilding an adapter needs from the base GGUF."""

    path: Path
    sha256: str
    architecture: str
    in_features: dict[str, int]
    """Base weight name (``blk.0.attn_q.weight``) to its input size (GGUF ``ne[0]``)."""


def file_sha256(path: Path, *, cache_dir: Path | None = None) -> str:
    """SHA-256 of ``path``, cached in ``cache_dir`` by size and modification time."""
    st = Path(path).stat()
    key = f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache = None if cache_dir is None else cache_dir / "base-sha256.json"
    if cache is not None:
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("key") == key and isinstance(data.get("sha256"), str):
                return str(data["sha256"])
        except (OSError, ValueError):
            pass
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(cache, json.dumps({"key": key, "sha256": value}).encode())
    return value


def read_base_model(path: Path, *, sha256: str | None = None, cache_dir: Path | None = None) -> BaseModelInfo:
    """Architecture and weight input sizes of the base GGUF (and its SHA-256)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read the base model {path}: {exc}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise AdapterError(f"{path} names no architecture")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    in_features = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}
    return BaseModelInfo(
        path=Path(path),
        sha256=sha256 or file_sha256(path, cache_dir=cache_dir),
        architecture=architecture,
        in_features=in_features,
    )


def adapter_from_release(release: Release, base: BaseModelInfo) -> LoraAdapterFile:
    """The GGUF LoRA of ``release``: its B matrices and the A derived from its seed."""
    if release.base_model_sha256 != base.sha256:
        raise AdapterError("the release is for another base model")
    rank = release.lora.rank
    pairs: dict[str, LoraPair] = {}
    for name, b in release.arrays().items():
        if not name.endswith(B_SUFFIX):
            raise AdapterError(f"release tensor {name!r} is not a B matrix")
        weight = name[: -len(B_SUFFIX)]
        n_in = base.in_features.get(weight)
        if n_in is None:
            raise AdapterError(f"release tensor {name!r} adapts {weight!r}, which the base model lacks")
        if b.ndim != 2 or b.shape[1] != rank:
            raise AdapterError(f"release tensor {name!r} has shape {b.shape}, rank {rank} expected")
        a = frozen_a(seed=release.lora.ffa_seed, name=weight, rank=rank, in_features=n_in)
        pairs[weight] = LoraPair(a=a, b=np.ascontiguousarray(b, dtype=np.float32))
    return LoraAdapterFile(
        architecture=base.architecture,
        alpha=release.lora.alpha,
        pairs=pairs,
        name=f"ppchat-global-v{release.version}",
    )


def install_release(release: Release, base: BaseModelInfo, directory: Path) -> Path:
    """Write ``<directory>/<version>.gguf`` atomically and the global B for the next round's
    ``agent train --init-b`` (``<directory>/<version>.b.ppcf``); return the GGUF's path."""
    adapter = adapter_from_release(release, base)
    path = directory / f"{release.version}.gguf"
    write_lora_gguf(path, adapter)
    write_fleet_delta(
        init_b_path(directory, release.version),
        FleetDeltaHeader(
            round_id=release.round_id or 1,
            run_id="0" * 32,
            ffa_seed=release.lora.ffa_seed,
            rank=release.lora.rank,
            alpha=release.lora.alpha,
            target_modules=tuple(release.lora.target_modules),
            architecture=base.architecture,
            base_model_sha256=release.base_model_sha256,
            init_from=f"release-v{release.version}",
            epsilon=0.0,
            delta=0.5,
            sample_count=1,
            steps=0,
            tensors=(),
        ),
        release.arrays(),
    )
    return path


def init_b_path(directory: Path, version: int) -> Path:
    return directory / f"{version}.b.ppcf"


def prune_versions(directory: Path, *, keep: set[int]) -> None:
    """Remove global adapters whose version is not in ``keep``."""
    for entry in directory.glob("*.gguf"):
        stem = entry.name.split(".", 1)[0]
        if stem.isdigit() and int(stem) not in keep:
            entry.unlink(missing_ok=True)
            init_b_path(directory, int(stem)).unlink(missing_ok=True)


# -- the fleet client's state ---------------------------------------------------------------------------


class FleetState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = 1
    enrolled: bool = False
    coordinator_id: str | None = None
    name: str | None = None
    last_round: int = Field(default=0, ge=0)
    """The newest round this device finished with (sent, or refused for good)."""
    adapter_version: int | None = None
    previous_version: int | None = None


def load_state(path: Path) -> FleetState:
    try:
        raw = path.read_bytes()[: 1 << 16]
    except FileNotFoundError:
        return FleetState()
    try:
        return FleetState.model_validate_json(raw)
    except ValidationError:
        return FleetState()  # a corrupt state file: start over (rounds and releases are re-checked)


def save_state(path: Path, state: FleetState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, state.model_dump_json(indent=1).encode() + b"\n", mode=0o600)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

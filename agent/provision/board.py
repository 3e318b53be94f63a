"""The board, as provisioning needs it: its profile, llama.cpp's build flags and torch's source.

This module needs pydantic (the profiles are pydantic models): it runs once the venv exists, or
from a development checkout's venv when an image is prepared elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.provision.errors import ProvisionError

JETSON_TORCH_INDEX = {"R36": "https://pypi.jetson-ai-lab.io/jp6/cu126"}
"""NVIDIA's Jetson AI Lab wheel index per L4T major release (JetPack 6 = L4T R36, CUDA 12.6)."""
ASSUMED_L4T = "R36"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
"""x86_64: PyPI's default torch wheel is the CUDA one (gigabytes); the CPU index has the small one."""
CUDA_GROUPS = ("video", "render")
CUDA_NVCC = "/usr/local/cuda/bin/nvcc"


@dataclass(frozen=True)
class Board:
    name: str
    title: str
    arch: str
    cuda: bool
    cmake_args: str
    """``CMAKE_ARGS`` for building llama-cpp-python on the board (hardware.profile.cmake_args)."""
    runtime: dict[str, int]
    """The agent's ``[model]`` settings from the profile (n_threads, n_gpu_layers, n_ctx, ...)."""
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]
    tegra_release: str | None
    memory_mb: int | None
    recommended_model: str | None
    notes: str

    @property
    def extra_groups(self) -> tuple[str, ...]:
        return CUDA_GROUPS if self.cuda else ()


@dataclass(frozen=True)
class TorchSource:
    index_url: str | None
    """None: PyPI."""
    why: str


def resolve_board(root: Path, board: str | None) -> Board:
    """``--board`` or detection under ``root`` (hardware.detect), with the flags for its memory."""
    from hardware.detect import detect
    from hardware.errors import ProfileError
    from hardware.profile import Accelerator, cmake_args

    try:
        found = detect(root, override=board)
    except ProfileError as exc:
        hint = "; an image's root has no /proc: pass --board" if root != Path("/") else ""
        raise ProvisionError(f"{exc}{hint}") from None
    profile, evidence = found.profile, found.evidence
    reasons = ("given with --board",) if board is not None else found.reasons
    rt = profile.runtime
    runtime = {"n_ctx": rt.n_ctx, "n_batch": rt.n_batch, "n_gpu_layers": rt.gpu_layers}
    if rt.threads is not None:
        runtime["n_threads"] = rt.threads
    if rt.threads_batch is not None:
        runtime["n_threads_batch"] = rt.threads_batch
    tier = profile.recommend_model(memory_mb=evidence.memory_mb)
    recommended = (
        f"{tier.params_b:g}B parameters, {tier.quantization.value}, n_ctx {tier.n_ctx}"
        if tier is not None
        else None
    )
    return Board(
        name=profile.name,
        title=profile.title,
        arch=profile.arch.value,
        cuda=profile.build.accelerator is Accelerator.CUDA,
        cmake_args=cmake_args(profile, memory_mb=evidence.memory_mb),
        runtime=runtime,
        reasons=reasons,
        warnings=found.warnings,
        tegra_release=evidence.tegra_release,
        memory_mb=evidence.memory_mb,
        recommended_model=recommended,
        notes=" ".join(x for x in (profile.build.note, profile.notes) if x),
    )


def torch_source(board: Board, override: str | None) -> TorchSource:
    """Where the trainer's torch comes from on ``board`` (``--torch-index-url`` wins)."""
    if override is not None:
        return TorchSource(override or None, "--torch-index-url")
    if board.cuda:
        release = (board.tegra_release or "").split(".")[0] or None
        if release is None:
            return TorchSource(
                JETSON_TORCH_INDEX[ASSUMED_L4T],
                f"NVIDIA's Jetson wheels; L4T release unknown here, JetPack 6 ({ASSUMED_L4T}) assumed",
            )
        if release not in JETSON_TORCH_INDEX:
            raise ProvisionError(
                f"no known torch wheel index for L4T {board.tegra_release} (JetPack 6 is R36): "
                "pass --torch-index-url"
            )
        return TorchSource(JETSON_TORCH_INDEX[release], f"NVIDIA's Jetson wheels for L4T {release} (CUDA)")
    if board.arch == "x86_64":
        return TorchSource(PYTORCH_CPU_INDEX, "PyTorch's CPU wheels (PyPI's x86_64 default is a CUDA build)")
    return TorchSource(None, "PyPI's aarch64 wheels (CPU)")

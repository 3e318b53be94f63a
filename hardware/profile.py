"""Board profiles: what each supported board is, how to build llama.cpp for it, how to run it.

The profiles are data (``hardware/profiles/*.toml``), loaded once into frozen models here. A profile
says how to recognise the board (:class:`MatchRules`, used by :mod:`hardware.detect`), the llama.cpp
CMake flags for a native build on it (:func:`cmake_args`, used by provisioning and by the
cross-build proof in ``scripts/cross-build-llama``), runtime settings (threads, GPU layers, context),
the largest model its memory holds comfortably, its thermal limits and where its power state is read.

Why the Pi 4 and Pi 5 flags differ: a binary built on a Pi 5 with ``GGML_NATIVE=ON`` (or any
``armv8.2-a`` target, which implies the LSE atomics) executes instructions a Pi 4's Cortex-A72 does
not have and dies with SIGILL at the first decode. Each board gets an explicit, non-native CPU
architecture so an image built for one board is honest about where it runs.
"""

from __future__ import annotations

import functools
import shlex
import sys
from enum import Enum
from importlib import resources
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hardware.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

PROFILE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_CMAKE_KEY_PATTERN = r"^[A-Z][A-Z0-9_]*$"

CMakeKey = Annotated[str, Field(pattern=_CMAKE_KEY_PATTERN)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Arch(str, Enum):
    """The CPU architecture as the kernel names it (``uname -m``)."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class Accelerator(str, Enum):
    NONE = "none"
    CUDA = "cuda"


class PowerSourceKind(str, Enum):
    """Where a board's power state is read (see :mod:`hardware.sensors.power`)."""

    POWER_SUPPLY = "power_supply"
    """``/sys/class/power_supply/*``: mains adapters, USB, batteries (laptops, UPS HATs)."""
    PI_FIRMWARE = "pi_firmware"
    """The Raspberry Pi firmware's ``get_throttled`` bits and the ``rpi_volt`` hwmon alarm."""
    JETSON_INA3221 = "jetson_ina3221"
    """The INA3221 rail monitors through hwmon (input voltage, current, over-current alarms)."""
    JTOP = "jtop"
    """jetson-stats, only when installed and its service runs (optional: AGPL)."""


class Quantization(str, Enum):
    Q4_0 = "Q4_0"
    Q4_K_M = "Q4_K_M"
    Q5_K_M = "Q5_K_M"
    Q8_0 = "Q8_0"
    F16 = "F16"


class MatchRules(_Frozen):
    """How detection recognises the board. Any matching rule counts; stronger rules weigh more."""

    compatible: tuple[str, ...] = ()
    """Exact entries of ``/proc/device-tree/compatible`` (NUL-separated there)."""
    model: tuple[str, ...] = ()
    """Substrings of ``/proc/device-tree/model``."""
    tegra_release: tuple[str, ...] = ()
    """L4T major releases from ``/etc/nv_tegra_release`` (``R32``, ``R35``, ``R36``)."""
    min_memory_mb: int | None = Field(default=None, ge=0)
    """A board match is refused below this much RAM (e.g. the 4 GB Orin Nano is not this profile)."""
    generic: bool = False
    """A fallback for any machine of the profile's architecture that no board profile matches."""


class BuildFlags(_Frozen):
    """llama.cpp CMake flags for a native build on the board (``CMAKE_ARGS`` for pip)."""

    cmake: dict[CMakeKey, str]
    cmake_low_memory: dict[CMakeKey, str] = {}
    """Added when the board has at most ``low_memory_mb`` of RAM (or its memory is unknown)."""
    low_memory_mb: int | None = Field(default=None, gt=0)
    accelerator: Accelerator = Accelerator.NONE
    requires_cpu_features: tuple[str, ...] = ()
    """``/proc/cpuinfo`` features the flags assume; detection warns when the CPU lacks one."""
    note: str = ""

    @model_validator(mode="after")
    def _check(self) -> BuildFlags:
        if bool(self.cmake_low_memory) != (self.low_memory_mb is not None):
            raise ValueError("cmake_low_memory and low_memory_mb go together")
        cuda = self.cmake.get("GGML_CUDA") == "ON"
        if cuda != (self.accelerator is Accelerator.CUDA):
            raise ValueError("GGML_CUDA=ON if and only if accelerator = 'cuda'")
        if cuda and "CMAKE_CUDA_ARCHITECTURES" not in self.cmake:
            raise ValueError("a CUDA build names its CMAKE_CUDA_ARCHITECTURES")
        return self


class RuntimeSettings(_Frozen):
    """llama.cpp settings for the chat engine on this board."""

    threads: int | None = Field(default=None, ge=1, le=256)
    """Generation threads; unset: the machine's physical cores."""
    threads_batch: int | None = Field(default=None, ge=1, le=256)
    gpu_layers: int = Field(default=0, ge=-1)
    """Layers offloaded to the GPU; -1: all."""
    n_ctx: int = Field(default=2048, ge=256, le=131072)
    n_batch: int = Field(default=256, ge=8, le=8192)


class ModelTier(_Frozen):
    """The largest model recommended for a board with at least ``min_memory_mb`` of RAM."""

    min_memory_mb: int = Field(ge=0)
    params_b: float = Field(gt=0, le=1000)
    """Parameters, in billions."""
    quantization: Quantization
    n_ctx: int = Field(ge=256, le=131072)


class ThermalLimits(_Frozen):
    soft_c: float = Field(gt=0, le=150)
    """The scheduler stops training at this temperature (and resumes below it minus a hysteresis)."""
    hard_c: float = Field(gt=0, le=150)
    """Where the board's firmware throttles or shuts down; nothing of ours should get near it."""
    ignore_zones: tuple[str, ...] = ()
    """Thermal zone types whose reading is not a real temperature (e.g. the Nano's ``PMIC-Die``)."""

    @model_validator(mode="after")
    def _check(self) -> ThermalLimits:
        if self.soft_c >= self.hard_c:
            raise ValueError("soft_c must be below hard_c")
        return self


class PowerSettings(_Frozen):
    sources: tuple[PowerSourceKind, ...] = Field(min_length=1)
    input_rails: tuple[str, ...] = ()
    """INA3221 rail labels that measure the board's input (Jetson)."""


class PowerMode(_Frozen):
    """An ``nvpmodel`` power mode of a Jetson board."""

    name: str
    watts: float | None = Field(default=None, gt=0)
    note: str = ""


class BoardProfile(_Frozen):
    name: str = Field(pattern=PROFILE_NAME_PATTERN)
    title: str
    arch: Arch
    match: MatchRules
    build: BuildFlags
    runtime: RuntimeSettings
    models: tuple[ModelTier, ...] = Field(min_length=1)
    thermal: ThermalLimits
    power: PowerSettings
    power_modes: tuple[PowerMode, ...] = ()
    notes: str = ""

    @model_validator(mode="after")
    def _check(self) -> BoardProfile:
        floors = [tier.min_memory_mb for tier in self.models]
        if floors != sorted(floors) or len(set(floors)) != len(floors):
            raise ValueError("models must be listed by strictly increasing min_memory_mb")
        return self

    def recommend_model(self, *, memory_mb: int | None) -> ModelTier | None:
        """The largest tier that fits ``memory_mb``; unknown memory: the smallest tier. None: too small."""
        if memory_mb is None:
            return self.models[0]
        fitting = [tier for tier in self.models if tier.min_memory_mb <= memory_mb]
        return fitting[-1] if fitting else None


def cmake_flags(profile: BoardProfile, *, memory_mb: int | None = None) -> dict[str, str]:
    """The profile's CMake cache entries for a board with ``memory_mb`` of RAM (None: unknown)."""
    flags = dict(profile.build.cmake)
    low = profile.build.low_memory_mb
    if low is not None and (memory_mb is None or memory_mb <= low):
        flags.update(profile.build.cmake_low_memory)
    return flags


def cmake_args(profile: BoardProfile, *, memory_mb: int | None = None) -> str:
    """The ``CMAKE_ARGS`` string for building llama.cpp (or llama-cpp-python) on the board."""
    return shlex.join(f"-D{key}={value}" for key, value in cmake_flags(profile, memory_mb=memory_mb).items())


def _parse_profile(filename: str, text: str) -> BoardProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"board profile {filename}: not valid TOML: {exc}") from None
    try:
        profile = BoardProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ProfileError(f"board profile {filename}: {problems}") from None
    if f"{profile.name}.toml" != filename:
        raise ProfileError(f"board profile {filename}: its name is {profile.name!r}, not the file's")
    return profile


@functools.cache
def load_profiles() -> tuple[BoardProfile, ...]:
    """Every shipped profile, board profiles first, generic fallbacks last (in file-name order)."""
    folder = resources.files("hardware").joinpath("profiles")
    profiles = [
        _parse_profile(entry.name, entry.read_text(encoding="utf-8"))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".toml")
    ]
    if not profiles:
        raise ProfileError("no board profiles shipped in hardware/profiles")
    return tuple(sorted(profiles, key=lambda p: p.match.generic))


def profile_names() -> tuple[str, ...]:
    return tuple(p.name for p in load_profiles())


def get_profile(name: str) -> BoardProfile:
    """The profile called ``name`` or :class:`ProfileError` listing the known names."""
    for profile in load_profiles():
        if profile.name == name:
            return profile
    raise ProfileError(f"unknown board profile {name!r}; known: {', '.join(profile_names())}")

from __future__ import annotations

import shlex

import pytest
from pydantic import ValidationError

from hardware.errors import ProfileError
from hardware.profile import (
    Accelerator,
    Arch,
    BoardProfile,
    PowerSourceKind,
    Quantization,
    cmake_args,
    cmake_flags,
    get_profile,
    load_profiles,
    profile_names,
)

BOARDS = {
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "jetson-orin-nx",
    "jetson-agx-orin",
    "jetson-nano",
    "generic-x86_64",
    "generic-arm64",
}


def test_every_board_has_a_profile_and_generics_come_last() -> None:
    names = profile_names()
    assert set(names) == BOARDS
    generic = [p.match.generic for p in load_profiles()]
    assert generic == sorted(generic)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("raspberry-pi-4", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"),
        ("raspberry-pi-5", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"),
        (
            "jetson-orin-nano",
            "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87 -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=OFF "
            "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16",
        ),
        (
            "jetson-agx-orin",
            "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87 -DGGML_NATIVE=OFF "
            "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16",
        ),
        ("jetson-nano", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"),
        ("generic-x86_64", "-DGGML_NATIVE=ON"),
        ("generic-arm64", "-DGGML_NATIVE=ON"),
    ],
)
def test_cmake_args(name: str, args: str) -> None:
    profile = get_profile(name)
    assert cmake_args(profile, memory_mb=32000) == args
    # The string is what pip's CMAKE_ARGS takes: it splits back into -D flags.
    assert all(part.startswith("-D") and "=" in part for part in shlex.split(args))


def test_orin_nx_turns_cuda_vmm_off_only_on_the_8gb_module() -> None:
    nx = get_profile("jetson-orin-nx")
    assert cmake_flags(nx, memory_mb=7600)["GGML_CUDA_NO_VMM"] == "ON"
    assert "GGML_CUDA_NO_VMM" not in cmake_flags(nx, memory_mb=15600)
    # Unknown memory takes the safe flag.
    assert cmake_flags(nx, memory_mb=None)["GGML_CUDA_NO_VMM"] == "ON"


@pytest.mark.parametrize(
    ("name", "threads", "gpu_layers", "n_ctx", "accelerator", "soft", "hard", "sources"),
    [
        ("raspberry-pi-4", 4, 0, 2048, Accelerator.NONE, 70.0, 80.0, {"pi_firmware", "power_supply"}),
        ("raspberry-pi-5", 4, 0, 4096, Accelerator.NONE, 75.0, 85.0, {"pi_firmware", "power_supply"}),
        (
            "jetson-orin-nano",
            4,
            -1,
            4096,
            Accelerator.CUDA,
            80.0,
            95.0,
            {"jetson_ina3221", "power_supply", "jtop"},
        ),
        (
            "jetson-orin-nx",
            None,
            -1,
            4096,
            Accelerator.CUDA,
            80.0,
            95.0,
            {"jetson_ina3221", "power_supply", "jtop"},
        ),
        (
            "jetson-agx-orin",
            None,
            -1,
            8192,
            Accelerator.CUDA,
            80.0,
            95.0,
            {"jetson_ina3221", "power_supply", "jtop"},
        ),
        ("jetson-nano", 4, 0, 2048, Accelerator.NONE, 70.0, 90.0, {"jetson_ina3221", "power_supply", "jtop"}),
        ("generic-x86_64", None, 0, 4096, Accelerator.NONE, 85.0, 95.0, {"power_supply"}),
        ("generic-arm64", None, 0, 2048, Accelerator.NONE, 80.0, 90.0, {"power_supply"}),
    ],
)
def test_runtime_thermal_and_power_settings(
    name: str,
    threads: int | None,
    gpu_layers: int,
    n_ctx: int,
    accelerator: Accelerator,
    soft: float,
    hard: float,
    sources: set[str],
) -> None:
    profile = get_profile(name)
    assert profile.runtime.threads == threads
    assert profile.runtime.gpu_layers == gpu_layers
    assert profile.runtime.n_ctx == n_ctx
    assert profile.build.accelerator is accelerator
    assert (profile.thermal.soft_c, profile.thermal.hard_c) == (soft, hard)
    assert {s.value for s in profile.power.sources} == sources
    assert PowerSourceKind.POWER_SUPPLY in profile.power.sources  # a battery shows up there on any board


def test_the_original_nano_is_cpu_only_and_says_why() -> None:
    nano = get_profile("jetson-nano")
    assert nano.build.accelerator is Accelerator.NONE
    assert "GGML_CUDA" not in nano.build.cmake
    assert "CUDA 10.2" in nano.build.note
    assert "PMIC-Die" in nano.thermal.ignore_zones


def test_orin_nano_knows_super_mode() -> None:
    names = [mode.name for mode in get_profile("jetson-orin-nano").power_modes]
    assert "MAXN_SUPER" in names


def test_arm_board_profiles_are_never_native() -> None:
    # An image built natively on one board crashes another: every ARM board names its CPU.
    for profile in load_profiles():
        if profile.arch is Arch.AARCH64 and not profile.match.generic:
            assert profile.build.cmake["GGML_NATIVE"] == "OFF", profile.name
            assert profile.build.cmake["GGML_CPU_ARM_ARCH"], profile.name


@pytest.mark.parametrize(
    ("name", "memory_mb", "params_b", "quant"),
    [
        ("raspberry-pi-4", 1800, 0.5, Quantization.Q4_K_M),
        ("raspberry-pi-4", 3800, 1.5, Quantization.Q4_K_M),
        ("raspberry-pi-5", 8000, 3.0, Quantization.Q4_K_M),
        ("raspberry-pi-5", 16000, 8.0, Quantization.Q4_K_M),
        ("jetson-orin-nano", 7600, 4.0, Quantization.Q4_K_M),
        ("jetson-agx-orin", 62000, 32.0, Quantization.Q4_K_M),
        ("generic-x86_64", 32000, 8.0, Quantization.Q8_0),
    ],
)
def test_recommended_model_fits_memory(
    name: str, memory_mb: int, params_b: float, quant: Quantization
) -> None:
    tier = get_profile(name).recommend_model(memory_mb=memory_mb)
    assert tier is not None
    assert (tier.params_b, tier.quantization) == (params_b, quant)


def test_recommendation_for_too_little_or_unknown_memory() -> None:
    pi4 = get_profile("raspberry-pi-4")
    assert pi4.recommend_model(memory_mb=900) is None
    assert pi4.recommend_model(memory_mb=None) == pi4.models[0]


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="raspberry-pi-5"):
        get_profile("raspberry-pi-9")


def _data(**changes: object) -> dict[str, object]:
    data = get_profile("raspberry-pi-5").model_dump(mode="json")
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"thermal": {"soft_c": 90.0, "hard_c": 85.0}}, "soft_c must be below hard_c"),
        ({"build": {"cmake": {"GGML_CUDA": "ON"}}}, "GGML_CUDA=ON"),
        ({"build": {"cmake": {"GGML_CUDA": "ON"}, "accelerator": "cuda"}}, "CMAKE_CUDA_ARCHITECTURES"),
        ({"build": {"cmake": {"bad-key": "x"}}}, "pattern"),
        ({"name": "Bad Name"}, "pattern"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_invalid_profile_data_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BoardProfile.model_validate(_data(**changes))


def test_models_must_be_in_increasing_memory_order() -> None:
    tiers = get_profile("raspberry-pi-5").model_dump(mode="json")["models"]
    with pytest.raises(ValidationError, match="increasing"):
        BoardProfile.model_validate(_data(models=list(reversed(tiers))))

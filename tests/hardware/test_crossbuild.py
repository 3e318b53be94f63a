"""The ARM profiles' flags, proven: cross-compiled llama.cpp under qemu on the Pi 4's and Pi 5's cores.

The matrix (slow; the builds are cached in ~/.cache/ppchat/cross, so re-runs take seconds):

    build \\ CPU        cortex-a72 (Pi 4)    cortex-a76 (Pi 5)
    raspberry-pi-4     generates            generates
    raspberry-pi-5     SIGILL               generates

That is why an image built for one board must not be cloned onto another.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest

from hardware import crossbuild
from hardware.crossbuild import CrossBuild, QemuRun, build_key, cross_flags, missing_tools
from hardware.errors import CrossBuildError
from hardware.profile import get_profile


def test_pi_flags_are_the_profiles_plus_a_portable_static_build() -> None:
    pi4 = cross_flags(get_profile("raspberry-pi-4"))
    pi5 = cross_flags(get_profile("raspberry-pi-5"))
    assert pi4["GGML_CPU_ARM_ARCH"] == "armv8-a"
    assert pi5["GGML_CPU_ARM_ARCH"] == "armv8.2-a+dotprod+fp16"
    for flags in (pi4, pi5):
        assert flags["GGML_NATIVE"] == "OFF"
        assert flags["CMAKE_EXE_LINKER_FLAGS"] == "-static"
        assert flags["GGML_OPENMP"] == "OFF"
        assert flags["LLAMA_OPENSSL"] == "OFF"
        assert (
            flags["LLAMA_BUILD_SERVER"] == flags["LLAMA_BUILD_TESTS"] == flags["LLAMA_BUILD_TOOLS"] == "OFF"
        )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("jetson-orin-nano", "build-jetson-check"),
        ("generic-arm64", "natively"),
        ("generic-x86_64", "not an aarch64"),
    ],
)
def test_profiles_that_do_not_cross_build(name: str, message: str) -> None:
    with pytest.raises(CrossBuildError, match=message):
        cross_flags(get_profile(name))


def test_build_key_follows_flags_sources_and_compiler() -> None:
    flags = cross_flags(get_profile("raspberry-pi-4"))
    key = build_key(flags, sdist_sha256="a" * 64, compiler="gcc 12")
    assert key == build_key(dict(flags), sdist_sha256="a" * 64, compiler="gcc 12")
    assert key != build_key(
        {**flags, "GGML_CPU_ARM_ARCH": "armv8.2-a"}, sdist_sha256="a" * 64, compiler="gcc 12"
    )
    assert key != build_key(flags, sdist_sha256="b" * 64, compiler="gcc 12")
    assert key != build_key(flags, sdist_sha256="a" * 64, compiler="gcc 13")


def test_qemu_run_reports_the_killing_signal() -> None:
    assert QemuRun(cpu="cortex-a72", returncode=-4, stdout="", stderr="").illegal_instruction
    ok = QemuRun(cpu="cortex-a76", returncode=0, stdout="Hello", stderr="")
    assert ok.signal is None and not ok.illegal_instruction
    assert QemuRun(cpu="cortex-a76", returncode=-11, stdout="", stderr="").signal is signal.SIGSEGV


def test_unknown_profile_is_a_cross_build_error() -> None:
    with pytest.raises(CrossBuildError, match="unknown board profile"):
        crossbuild.cross_build("raspberry-pi-9")


def test_cli_needs_a_profile_or_the_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        crossbuild.main(["/tmp/out"])
    assert exited.value.code == 2
    assert "name a profile" in capsys.readouterr().err


# ---- the qemu matrix ----------------------------------------------------------------------------------

MATRIX = [
    ("raspberry-pi-4", "cortex-a72", True),
    ("raspberry-pi-4", "cortex-a76", True),
    ("raspberry-pi-5", "cortex-a76", True),
    ("raspberry-pi-5", "cortex-a72", False),
]


@pytest.fixture(scope="module")
def pi_builds() -> dict[str, CrossBuild]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install {' '.join(crossbuild.DEBIAN_PACKAGES)}")
    return {name: crossbuild.cross_build(name, jobs=2) for name in crossbuild.MATRIX_PROFILES}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # cold builds: minutes per profile on 2 cores; cached: seconds
@pytest.mark.parametrize(("profile", "cpu", "runs"), MATRIX)
def test_qemu_matrix(
    pi_builds: dict[str, CrossBuild], demo_model: Any, profile: str, cpu: str, runs: bool
) -> None:
    model = Path(demo_model.q4_k_m)
    run = crossbuild.run_generation(pi_builds[profile].binary, model, cpu=cpu, n_predict=4, timeout_s=900)
    if runs:
        assert run.returncode == 0, run.stderr[-2000:]
        decoded = re.search(r"decoded (\d+) tokens", run.stderr)
        assert decoded is not None and int(decoded.group(1)) >= 1, run.stdout[-2000:]
    else:
        # The dotprod / LSE-atomics build loads the model, then dies at the first decode.
        assert run.illegal_instruction, f"expected SIGILL, got {run.returncode}: {run.stderr[-2000:]}"
        assert "llama_context" in run.stderr or "load" in run.stderr

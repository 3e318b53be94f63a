from __future__ import annotations

import json
from pathlib import Path

import pytest

from hardware.detect import detect, read_evidence
from hardware.errors import ProfileError
from hardware.profile import Arch
from tests.hardware import sysfs_trees as trees
from tests.hardware.sysfs_trees import write

A72 = "fp asimd evtstrm crc32 cpuid"
A78 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
A57 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        (trees.PI5_GOOD, "raspberry-pi-5"),
        (trees.PI5_WEAK, "raspberry-pi-5"),
        (trees.PI4_THROTTLED, "raspberry-pi-4"),
        (trees.ORIN_NANO, "jetson-orin-nano"),
        (trees.LAPTOP_BATTERY, "generic-x86_64"),
        (trees.X86_DESKTOP, "generic-x86_64"),
    ],
)
def test_detects_the_fixture_trees(name: str, profile: str) -> None:
    found = detect(trees.tree(name))
    assert found.profile.name == profile
    assert found.reasons
    assert found.warnings == ()
    assert not found.overridden


def test_evidence_is_what_the_files_say() -> None:
    evidence = read_evidence(trees.tree(trees.ORIN_NANO))
    assert evidence.model == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    assert evidence.compatible == (
        "nvidia,p3768-0000+p3767-0005-super",
        "nvidia,p3767-0005",
        "nvidia,tegra234",
    )
    assert evidence.tegra_release == "R36.4.3"
    assert evidence.arch is Arch.AARCH64
    assert "asimddp" in evidence.cpu_features
    assert evidence.cpu_count == 6
    assert evidence.memory_mb == 7619
    assert evidence.jetson_super
    found = detect(trees.tree(trees.ORIN_NANO))
    assert any("Super" in reason for reason in found.reasons)
    assert any("p3767-0005" in reason for reason in found.reasons)


def _board(
    root: Path,
    *,
    model: str | None,
    compatible: list[str],
    features: str,
    memory_kb: int,
    tegra: str | None = None,
) -> Path:
    if model is not None:
        write(root, "proc/device-tree/model", model.encode() + b"\0")
    if compatible:
        write(root, "proc/device-tree/compatible", b"".join(c.encode() + b"\0" for c in compatible))
    if tegra is not None:
        write(
            root,
            "etc/nv_tegra_release",
            f"# {tegra} (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref\n",
        )
    cpu = "".join(
        f"processor\t: {i}\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n\n"
        for i in range(4)
    )
    write(root, "proc/cpuinfo", cpu)
    write(root, "proc/meminfo", f"MemTotal:       {memory_kb} kB\nMemFree:  1000 kB\n")
    return root


# Device-tree contents as the boards report them.
CAPTURED = [
    (
        "Raspberry Pi 4 Model B Rev 1.5",
        ["raspberrypi,4-model-b", "brcm,bcm2711"],
        A72,
        8000000,
        None,
        "raspberry-pi-4",
    ),
    ("Raspberry Pi 400 Rev 1.0", ["raspberrypi,400", "brcm,bcm2711"], A72, 3900000, None, "raspberry-pi-4"),
    (
        "Raspberry Pi Compute Module 4 Rev 1.1",
        ["raspberrypi,4-compute-module", "brcm,bcm2711"],
        A72,
        1900000,
        None,
        "raspberry-pi-4",
    ),
    (
        "Raspberry Pi 5 Model B Rev 1.1",
        ["raspberrypi,5-model-b", "brcm,bcm2712"],
        A78,
        16300000,
        None,
        "raspberry-pi-5",
    ),
    (
        "Raspberry Pi Compute Module 5 Rev 1.0",
        ["raspberrypi,5-compute-module", "brcm,bcm2712"],
        A78,
        4000000,
        None,
        "raspberry-pi-5",
    ),
    (
        "NVIDIA Jetson Orin Nano Developer Kit",
        ["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"],
        A78,
        7800000,
        "R36",
        "jetson-orin-nano",
    ),
    (
        "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
        ["nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"],
        A78,
        15900000,
        "R36",
        "jetson-orin-nx",
    ),
    (
        "NVIDIA Jetson AGX Orin Developer Kit",
        ["nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"],
        A78,
        64000000,
        "R36",
        "jetson-agx-orin",
    ),
    (
        "NVIDIA Jetson Nano Developer Kit",
        ["nvidia,p3450-0000", "nvidia,tegra210"],
        A57,
        4000000,
        "R32",
        "jetson-nano",
    ),
    # The device tree alone, without the model file.
    (None, ["nvidia,p3768-0000+p3767-0003", "nvidia,tegra234"], A78, 7800000, None, "jetson-orin-nano"),
    # An ARM board nobody profiled: the generic fallback.
    (
        "Pine64 RockPro64 v2.1",
        ["pine64,rockpro64-v2.1", "rockchip,rk3399"],
        A72,
        4000000,
        None,
        "generic-arm64",
    ),
]


@pytest.mark.parametrize(("model", "compatible", "features", "memory_kb", "tegra", "expected"), CAPTURED)
def test_detects_captured_device_trees(
    tmp_path: Path,
    model: str | None,
    compatible: list[str],
    features: str,
    memory_kb: int,
    tegra: str | None,
    expected: str,
) -> None:
    root = _board(
        tmp_path, model=model, compatible=compatible, features=features, memory_kb=memory_kb, tegra=tegra
    )
    assert detect(root).profile.name == expected


def test_the_4gb_orin_nano_is_not_the_8gb_profile(tmp_path: Path) -> None:
    # P3767-0004 is not in the 8 GB profile's compatibles; check that the RAM floor holds on its own too.
    root = _board(
        tmp_path,
        model="NVIDIA Jetson Orin Nano Developer Kit",
        compatible=["nvidia,p3768-0000+p3767-0005", "nvidia,tegra234"],
        features=A78,
        memory_kb=3700000,
    )
    found = detect(root)
    assert found.profile.name == "generic-arm64"
    assert any("3613 MB of RAM" in w for w in found.warnings)


def test_the_l4t_release_alone_does_not_name_a_board(tmp_path: Path) -> None:
    root = _board(tmp_path, model=None, compatible=[], features=A78, memory_kb=8000000, tegra="R36")
    assert detect(root).profile.name == "generic-arm64"


def test_override_wins_and_reports_disagreement() -> None:
    found = detect(trees.tree(trees.PI4_THROTTLED), override="raspberry-pi-5")
    assert found.profile.name == "raspberry-pi-5"
    assert found.overridden
    joined = " ".join(found.warnings)
    # A Pi 5 build on this Pi 4 would die: the evidence says so.
    assert "asimddp" in joined and "SIGILL" in joined
    assert "looks like 'raspberry-pi-4'" in joined


def test_override_that_agrees_has_no_warnings() -> None:
    found = detect(trees.tree(trees.PI5_GOOD), override="raspberry-pi-5")
    assert found.warnings == ()


def test_override_across_architectures_is_flagged() -> None:
    found = detect(trees.tree(trees.X86_DESKTOP), override="raspberry-pi-4")
    assert any("is for aarch64" in w for w in found.warnings)


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ProfileError, match="unknown board profile"):
        detect(trees.tree(trees.PI5_GOOD), override="raspberry-pi-9")


def test_an_empty_tree_is_unknown_not_guessed(tmp_path: Path) -> None:
    evidence = read_evidence(tmp_path)
    assert (evidence.model, evidence.arch, evidence.memory_mb, evidence.tegra_release) == (
        None,
        None,
        None,
        None,
    )
    with pytest.raises(ProfileError, match=r"set hardware\.profile"):
        detect(tmp_path)


def test_this_machine_is_detected() -> None:
    found = detect()
    assert found.profile.name in {"generic-x86_64", "generic-arm64"} or not found.profile.match.generic
    assert found.evidence.memory_mb is not None and found.evidence.memory_mb > 0


def test_cli_reports_profile_and_sensors(capsys: pytest.CaptureFixture[str]) -> None:
    from hardware.__main__ import main

    assert main(["--root", str(trees.tree(trees.PI5_WEAK))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"] == "raspberry-pi-5"
    assert report["cmake_args"] == "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"
    assert report["sensors"]["power"]["under_voltage_now"] is True
    assert report["max_temperature_c"] == 61.3


def test_cli_fails_cleanly_without_a_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hardware.__main__ import main

    assert main(["--root", str(tmp_path)]) == 1
    assert "set hardware.profile" in capsys.readouterr().err

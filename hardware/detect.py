"""Which board is this? Detection from the device tree, L4T's release file and the CPU.

Read under a root path (``/`` on a board, a captured tree in tests):

- ``/proc/device-tree/model`` and ``/proc/device-tree/compatible`` (NUL-separated strings);
- ``/etc/nv_tegra_release`` (Jetson Linux: ``# R36 (release), REVISION: 4.3, ...``);
- ``/proc/cpuinfo`` (architecture and features: a Pi 4 has no ``asimddp``/``atomics``);
- ``/proc/meminfo`` (``MemTotal``, which picks the recommended model and the Orin NX's flags).

A board profile matches on a ``compatible`` entry (strongest) or a model substring; the L4T release
only supports a match. Nothing matched: the generic profile of the CPU's architecture. The config's
``hardware.profile`` overrides all of it, and a disagreement is reported as a warning.
"""

from __future__ import annotations

import fnmatch
import platform
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hardware.errors import ProfileError
from hardware.profile import Arch, BoardProfile, get_profile, load_profiles
from hardware.sysfs import read_strings, read_text, under

DEVICE_TREE_MODEL = "proc/device-tree/model"
DEVICE_TREE_COMPATIBLE = "proc/device-tree/compatible"
NV_TEGRA_RELEASE = "etc/nv_tegra_release"
CPUINFO = "proc/cpuinfo"
MEMINFO = "proc/meminfo"

_TEGRA_RE = re.compile(r"#\s*(R\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")
_MEMTOTAL_RE = re.compile(r"^MemTotal:\s+(\d+)\s*kB", re.MULTILINE)
_SCORE_COMPATIBLE = 4
_SCORE_MODEL = 2
_SCORE_TEGRA = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Evidence(_Frozen):
    """What detection read; None / empty where a file was absent or unreadable."""

    root: Path
    model: str | None = None
    compatible: tuple[str, ...] = ()
    tegra_release: str | None = None
    """``R36.4.3`` from ``/etc/nv_tegra_release``."""
    arch: Arch | None = None
    cpu_features: tuple[str, ...] = ()
    cpu_model: str | None = None
    cpu_count: int | None = None
    memory_mb: int | None = None
    jetson_super: bool = False
    """The device tree is a JetPack 6.2 "Super" one (MAXN SUPER power mode available)."""


class Detection(_Frozen):
    profile: BoardProfile
    evidence: Evidence
    reasons: tuple[str, ...]
    """Why this profile, in words (``compatible 'brcm,bcm2712' matches raspberry-pi-5``)."""
    warnings: tuple[str, ...] = ()
    overridden: bool = False


def read_evidence(root: Path = Path("/")) -> Evidence:
    """Everything detection looks at, read under ``root``."""
    model_text = read_text(under(root, DEVICE_TREE_MODEL))
    model = (model_text or "").rstrip("\0").strip() or None
    compatible = read_strings(under(root, DEVICE_TREE_COMPATIBLE))
    tegra = _tegra_release(read_text(under(root, NV_TEGRA_RELEASE)))
    arch, features, cpu_model, cpu_count = _cpuinfo(read_text(under(root, CPUINFO)))
    if arch is None and root == Path("/"):
        arch = _arch_from_name(platform.machine())
    memory_mb = _memory_mb(read_text(under(root, MEMINFO)))
    jetson_super = any(entry.endswith("-super") for entry in compatible) or (
        model is not None and "Jetson" in model and model.endswith("Super")
    )
    return Evidence(
        root=root,
        model=model,
        compatible=compatible,
        tegra_release=tegra,
        arch=arch,
        cpu_features=features,
        cpu_model=cpu_model,
        cpu_count=cpu_count,
        memory_mb=memory_mb,
        jetson_super=jetson_super,
    )


def detect(root: Path = Path("/"), *, override: str | None = None) -> Detection:
    """The board profile for the machine under ``root`` and the evidence used.

    ``override`` (the config's ``hardware.profile``) wins; an unknown name raises :class:`ProfileError`.
    """
    evidence = read_evidence(root)
    detected = _match(evidence)
    if override is not None:
        profile = get_profile(override)
        warnings = list(_feature_warnings(profile, evidence))
        if detected is not None and detected.profile.name != profile.name:
            warnings.append(
                f"hardware.profile is {profile.name!r} but the machine looks like "
                f"{detected.profile.name!r} ({'; '.join(detected.reasons)})"
            )
        if evidence.arch is not None and evidence.arch is not profile.arch:
            warnings.append(
                f"profile {profile.name!r} is for {profile.arch.value}, this CPU is {evidence.arch.value}"
            )
        return Detection(
            profile=profile,
            evidence=evidence,
            reasons=(f"set in the config (hardware.profile = {profile.name!r})",),
            warnings=tuple(warnings),
            overridden=True,
        )
    if detected is None:
        arch = evidence.arch.value if evidence.arch is not None else "unknown"
        raise ProfileError(
            f"no board profile fits this machine (CPU architecture {arch}); set hardware.profile"
        )
    return detected


def _match(evidence: Evidence) -> Detection | None:
    best: tuple[int, BoardProfile, list[str]] | None = None
    warnings: list[str] = []
    for profile in load_profiles():
        if profile.match.generic:
            continue
        if evidence.arch is not None and evidence.arch is not profile.arch:
            continue
        score, reasons = _score(profile, evidence)
        if score < _SCORE_MODEL:  # the L4T release alone does not name a board
            continue
        floor = profile.match.min_memory_mb
        if floor is not None and evidence.memory_mb is not None and evidence.memory_mb < floor:
            warnings.append(
                f"looks like {profile.title} ({'; '.join(reasons)}) but has {evidence.memory_mb} MB of RAM; "
                f"the profile needs {floor} MB"
            )
            continue
        if best is None or score > best[0]:
            best = (score, profile, reasons)
    if best is not None:
        _, profile, reasons = best
    else:
        generic = [p for p in load_profiles() if p.match.generic and p.arch is evidence.arch]
        if not generic:
            return None
        profile = generic[0]
        reasons = [f"no board profile matched; generic {profile.arch.value} fallback"]
    warnings.extend(_feature_warnings(profile, evidence))
    if evidence.jetson_super and profile.power_modes:
        reasons.append("the device tree is a Super one (MAXN_SUPER power mode)")
    return Detection(profile=profile, evidence=evidence, reasons=tuple(reasons), warnings=tuple(warnings))


def _score(profile: BoardProfile, evidence: Evidence) -> tuple[int, list[str]]:
    rules = profile.match
    score = 0
    reasons: list[str] = []
    for entry in evidence.compatible:
        if any(fnmatch.fnmatchcase(entry, pattern) for pattern in rules.compatible):
            score += _SCORE_COMPATIBLE
            reasons.append(f"compatible {entry!r} matches {profile.name}")
            break
    if evidence.model is not None:
        for needle in rules.model:
            if needle in evidence.model:
                score += _SCORE_MODEL
                reasons.append(f"model {evidence.model!r} contains {needle!r}")
                break
    if evidence.tegra_release is not None and evidence.tegra_release.split(".")[0] in rules.tegra_release:
        score += _SCORE_TEGRA
        reasons.append(f"L4T {evidence.tegra_release}")
    return score, reasons


def _feature_warnings(profile: BoardProfile, evidence: Evidence) -> list[str]:
    if not evidence.cpu_features:
        return []
    missing = [f for f in profile.build.requires_cpu_features if f not in evidence.cpu_features]
    if not missing:
        return []
    return [
        f"the CPU lacks {', '.join(missing)}: llama.cpp built with {profile.name}'s flags "
        "would die with SIGILL here"
    ]


def _tegra_release(text: str | None) -> str | None:
    if text is None:
        return None
    found = _TEGRA_RE.search(text)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def _arch_from_name(name: str) -> Arch | None:
    aliases = {"x86_64": Arch.X86_64, "amd64": Arch.X86_64, "aarch64": Arch.AARCH64, "arm64": Arch.AARCH64}
    return aliases.get(name.lower())


def _cpuinfo(text: str | None) -> tuple[Arch | None, tuple[str, ...], str | None, int | None]:
    if text is None:
        return None, (), None, None
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value.strip())
    if "flags" in fields:  # x86 spells its features "flags"
        arch: Arch | None = Arch.X86_64
        features = tuple(fields["flags"].split())
        cpu_model = fields.get("model name")
    elif "Features" in fields and fields.get("CPU architecture") == "8":
        arch = Arch.AARCH64
        features = tuple(fields["Features"].split())
        cpu_model = fields.get("Model") or fields.get("model name")
    else:
        arch, features, cpu_model = None, (), None
    return arch, features, cpu_model, processors or None


def _memory_mb(text: str | None) -> int | None:
    if text is None:
        return None
    found = _MEMTOTAL_RE.search(text)
    return int(found.group(1)) // 1024 if found else None

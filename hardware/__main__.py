"""``python -m hardware``: what this machine is detected as, and what its sensors read now."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hardware.detect import detect
from hardware.errors import ProfileError
from hardware.profile import cmake_args
from hardware.sensors import board_sensors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hardware", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/"), help="read /proc, /sys, /etc under this root")
    parser.add_argument("--profile", default=None, help="use this profile instead of detecting one")
    args = parser.parse_args(argv)
    try:
        found = detect(args.root, override=args.profile)
    except ProfileError as exc:
        print(f"hardware: {exc}", file=sys.stderr)
        return 1
    profile = found.profile
    snapshot = board_sensors(profile, root=args.root).snapshot()
    memory = found.evidence.memory_mb
    tier = profile.recommend_model(memory_mb=memory)
    report = {
        "profile": profile.name,
        "title": profile.title,
        "reasons": list(found.reasons),
        "warnings": list(found.warnings),
        "evidence": found.evidence.model_dump(mode="json", exclude={"cpu_features"}),
        "cmake_args": cmake_args(profile, memory_mb=memory),
        "recommended_model": None if tier is None else tier.model_dump(mode="json"),
        "sensors": snapshot.model_dump(mode="json"),
        "max_temperature_c": snapshot.temperature.max_c,
        "load_per_cpu": snapshot.system.load_per_cpu,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

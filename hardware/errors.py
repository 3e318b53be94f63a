"""The hardware package's exception tree.

    HardwareError          base of every error this package raises on purpose
    ├── ProfileError       a board profile is unknown or its data is invalid
    └── CrossBuildError    the llama.cpp cross-build (hardware.crossbuild) failed or lacks a tool

Sensors never raise for a missing or unreadable file: the value is reported as unknown (None).
"""

from __future__ import annotations


class HardwareError(Exception):
    """Base of the hardware package's errors."""


class ProfileError(HardwareError):
    pass


class CrossBuildError(HardwareError):
    pass

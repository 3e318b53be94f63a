"""Fixtures for the fleet protocol tests: identities and a registry."""

from __future__ import annotations

import pytest

from fleet.keys import Identity, Role
from tests.fleet.samples import Registry


@pytest.fixture(scope="session")
def coordinator() -> Identity:
    return Identity.generate(Role.COORDINATOR)


@pytest.fixture(scope="session")
def device() -> Identity:
    return Identity.generate(Role.DEVICE)


@pytest.fixture(scope="session")
def other_device() -> Identity:
    return Identity.generate(Role.DEVICE)


@pytest.fixture()
def registry(device: Identity, other_device: Identity) -> Registry:
    return Registry(device.public, other_device.public)

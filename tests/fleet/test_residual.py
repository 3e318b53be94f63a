from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.codec import encode
from fleet.errors import ResidualError
from fleet.residual import load_residual, save_residual
from tests.fleet.samples import small_update


def test_residual_round_trip(tmp_path: Path) -> None:
    encoded = encode(small_update(), norm_bound=0.5, topk_fraction=0.1)
    path = tmp_path / "state" / "residual.bin"
    save_residual(path, encoded.residual, key="model-abc/r8/seed1")
    layout = {name: a.shape for name, a in encoded.residual.items()}
    loaded = load_residual(path, key="model-abc/r8/seed1", expected=layout)
    assert loaded is not None
    for name, array in encoded.residual.items():
        np.testing.assert_array_equal(loaded[name], array)
    # The next round's encode accepts it.
    encode(small_update(1), loaded, norm_bound=0.5, topk_fraction=0.1)


def test_missing_or_stale_residuals_are_none(tmp_path: Path) -> None:
    path = tmp_path / "residual.bin"
    assert load_residual(path, key="k") is None
    save_residual(path, small_update(), key="old")
    assert load_residual(path, key="new") is None


def test_corrupt_residuals_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "residual.bin"
    save_residual(path, small_update(), key="k")
    data = path.read_bytes()
    for corrupt in (data[:-1], data + b"x", b"PK\x03\x04" + data[4:], data[:20]):
        path.write_bytes(corrupt)
        with pytest.raises(ResidualError):
            load_residual(path, key="k")
    path.write_bytes(data)
    with pytest.raises(ResidualError, match="does not fit"):
        load_residual(path, key="k", expected={"other": (2,)})


def test_unsaveable_residuals(tmp_path: Path) -> None:
    with pytest.raises(ResidualError):
        save_residual(tmp_path / "r", {"a": np.array([np.inf], np.float32)}, key="k")
    with pytest.raises(ResidualError):
        save_residual(tmp_path / "r", small_update(), key="has space")

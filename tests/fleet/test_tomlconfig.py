"""The config-file rules the agent and the coordinator share (fleet/tomlconfig.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from fleet.tomlconfig import ConfigFileError, read_toml, resolve_paths, validate


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_dir: Path = Path("/var/lib/x")
    limit: int = Field(default=1, ge=1)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner = Inner()
    name: str = "x"


def test_relative_paths_follow_the_file_and_others_are_left_alone(tmp_path: Path) -> None:
    data = {
        "a": {
            "path": "model.gguf",
            "state_dir": "/abs",
            "ca_file": "ca.pem",
            "key_path": "~/k",
            "name": "n_dir",
        },
        "url_dir_like": 3,
    }
    out = resolve_paths(data, tmp_path)
    assert out["a"]["path"] == str(tmp_path / "model.gguf")
    assert out["a"]["state_dir"] == "/abs"
    assert out["a"]["ca_file"] == str(tmp_path / "ca.pem")
    assert out["a"]["key_path"] == str(Path("~/k").expanduser())
    assert out["a"]["name"] == "n_dir" and out["url_dir_like"] == 3


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[a\n")
    with pytest.raises(ConfigFileError, match=r"bad\.toml: not valid TOML"):
        read_toml(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        read_toml(binary)


def test_validation_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"inner\.limit: .*greater than or equal to 1"):
        validate(Outer, {"inner": {"limit": 0}})
    with pytest.raises(ConfigFileError, match=r"inner\.surprise: Extra inputs"):
        validate(Outer, {"inner": {"surprise": 1}})
    got = validate(Outer, {"inner": {"state_dir": "state"}}, base_dir=tmp_path)
    assert got.inner.state_dir == tmp_path / "state"

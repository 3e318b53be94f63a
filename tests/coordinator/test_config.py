"""The coordinator's TOML config: defaults, validation naming the key, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.aggregate import ServerOptimizer
from coordinator.config import load_config, parse_config
from coordinator.errors import ConfigError


def test_defaults_and_derived_paths() -> None:
    config = parse_config({})
    assert config.broker.host == "127.0.0.1" and config.broker.port == 1883 and not config.broker.use_tls
    assert config.store_path.name == "coordinator.sqlite3"


def test_file_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    path = tmp_path / "c.toml"
    path.write_text(
        '[paths]\nstate_dir = "state"\n'
        '[broker]\nurl = "mqtts://broker.example:8884"\nusername = "coord"\npassword_file = "pw"\n'
        '[broker.tls]\nca_file = "ca.pem"\n'
        '[aggregation]\noptimizer = "fedadam"\nweight_cap = 0.3\n'
    )
    config = load_config(path)
    assert config.paths.state_dir == tmp_path / "state"
    assert config.broker.use_tls and config.broker.port == 8884 and config.broker.read_password() == "s3cret"
    assert config.broker.tls is not None and config.broker.tls.ca_file == tmp_path / "ca.pem"
    assert config.aggregation.optimizer is ServerOptimizer.FEDADAM


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"broker": {"url": "http://x"}}, "broker.url"),
        ({"broker": {"url": "mqtt://u:p@host:1883"}}, "broker.url"),
        ({"broker": {"password": "a", "password_file": "b"}}, "broker"),
        ({"broker": {"client_id": "x" * 40}}, "broker.client_id"),
        ({"rounds": {"min_devices": 5, "target_devices": 2}}, "rounds"),
        ({"aggregation": {"weight_cap": 0}}, "aggregation.weight_cap"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(data)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[paths\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)

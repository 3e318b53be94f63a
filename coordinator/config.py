"""The coordinator's configuration: one TOML file parsed once into frozen, validated models.

Unknown keys are errors and every error names its key (``broker.url: ...``). Relative paths are
resolved against the config file's directory. A missing file means the defaults (development).

Example ``/etc/ppchat/coordinator.toml``::

    [paths]
    state_dir = "/var/lib/ppchat-coordinator"

    [broker]
    url = "mqtts://broker.example.net:8883"
    client_id = "ppchat-coordinator"
    username = "coordinator"
    password_file = "/etc/ppchat/broker-password"
    [broker.tls]
    ca_file = "/etc/ppchat/ca.pem"

    [rounds]
    min_devices = 2
    target_devices = 10
    deadline_s = 3600

    [aggregation]
    optimizer = "fedavgm"
    weight_cap = 0.25
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coordinator.aggregate import AggregationSettings
from coordinator.errors import ConfigError
from fleet.tomlconfig import ConfigFileError, read_toml, validate

DEFAULT_CONFIG_PATH = Path("/etc/ppchat/coordinator.toml")
DEFAULT_STATE_DIR = Path("/var/lib/ppchat-coordinator")
CONFIG_ENV = "PPCHAT_COORDINATOR_CONFIG"


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PathsConfig(Section):
    state_dir: Path = DEFAULT_STATE_DIR
    """Keys (0600), the SQLite store and the embedded broker's files."""


class TlsConfig(Section):
    """TLS to the broker. Setting any of these (or an ``mqtts://`` URL) turns TLS on."""

    ca_file: Path | None = None
    """CA bundle that signs the broker's certificate; unset: the system's trust store."""
    cert_file: Path | None = None
    key_file: Path | None = None
    """Client certificate and key, for brokers that authenticate clients by certificate."""

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class BrokerScheme(str, Enum):
    MQTT = "mqtt"
    MQTTS = "mqtts"


class BrokerConfig(Section):
    """The fleet broker (Mosquitto, EMQX, HiveMQ, ...), spoken to in MQTT 3.1.1."""

    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""
    client_id: str = Field(default="ppchat-coordinator", min_length=1, max_length=23)
    """Fixed, so that the broker keeps our persistent session (QoS 1 messages queued while we are away)."""
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    """A file holding the password (preferred over ``password`` in the config)."""
    tls: TlsConfig | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    topic_root: str = Field(default="ppchat", pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {s.value for s in BrokerScheme}:
            raise ValueError("scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("the URL has no host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
            raise ValueError("give only scheme://host:port (credentials go in username/password_file)")
        return value

    @model_validator(mode="after")
    def _check(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        return self

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # validated
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == BrokerScheme.MQTTS.value else 1883)

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.url).scheme == BrokerScheme.MQTTS.value or self.tls is not None

    def read_password(self) -> str | None:
        if self.password_file is None:
            return self.password
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"broker.password_file: cannot read {self.password_file}: {exc}") from exc


class RoundDefaults(Section):
    """Defaults for ``coordinator round start``; each may be overridden on the command line."""

    min_devices: int = Field(default=2, ge=1, le=100_000)
    target_devices: int = Field(default=3, ge=1, le=100_000)
    deadline_s: float = Field(default=600.0, gt=0, le=30 * 86400)
    local_epochs: int = Field(default=1, ge=1, le=100)
    learning_rate: float = Field(default=1e-3, gt=0, le=10)
    lora_rank: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16.0, gt=0)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    ffa_seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """The frozen-A seed. Unset: the previous round's (so releases keep building on each other),
    or a random one for the very first round."""
    norm_bound: float = Field(default=1.0, gt=0)
    topk_fraction: float = Field(default=0.05, gt=0, le=1)
    dp_epsilon: float = Field(default=8.0, gt=0)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    max_update_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    """Sealed updates over this many bytes are refused before anything is decrypted."""

    @model_validator(mode="after")
    def _check(self) -> RoundDefaults:
        if self.min_devices > self.target_devices:
            raise ValueError("min_devices must not exceed target_devices")
        return self


class ModelConfig(Section):
    """The base model every device runs; a release names it by SHA-256."""

    base_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Unset: ``coordinator round start --base-sha256`` must give it."""


class LogLevel(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LoggingConfig(Section):
    level: LogLevel = LogLevel.INFO


class CoordinatorConfig(Section):
    """The whole coordinator configuration (``/etc/ppchat/coordinator.toml``)."""

    paths: PathsConfig = PathsConfig()
    broker: BrokerConfig = BrokerConfig()
    rounds: RoundDefaults = RoundDefaults()
    aggregation: AggregationSettings = AggregationSettings()
    model: ModelConfig = ModelConfig()
    logging: LoggingConfig = LoggingConfig()
    tick_s: float = Field(default=1.0, gt=0, le=60)
    """How often the service checks round deadlines."""

    # Derived paths: one place decides where each file lives.
    @property
    def store_path(self) -> Path:
        return self.paths.state_dir / "coordinator.sqlite3"

    @property
    def keys_dir(self) -> Path:
        return self.paths.state_dir / "keys"

    @property
    def broker_dir(self) -> Path:
        """The embedded demo broker's working directory."""
        return self.paths.state_dir / "broker"


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None) -> CoordinatorConfig:
    """Validate a parsed TOML document (paths relative to ``base_dir``)."""
    try:
        return validate(CoordinatorConfig, data, base_dir=base_dir)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: Path | None = None) -> CoordinatorConfig:
    """Load ``path``, else ``$PPCHAT_COORDINATOR_CONFIG``, else the default file if any, else defaults."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        if env:
            path = Path(env)
        elif DEFAULT_CONFIG_PATH.exists():
            path = DEFAULT_CONFIG_PATH
        else:
            return CoordinatorConfig()
    try:
        data = read_toml(path)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(data, base_dir=path.parent.resolve())

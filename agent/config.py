"""The agent's configuration: one TOML file parsed once into frozen, validated models.

Every section is a model here; unknown keys are errors, and every error names the key, e.g.
``model.n_ctx: Input should be greater than or equal to 64``. Every path can be set, so that tests
run unprivileged in temporary directories. Relative paths are resolved against the config file's
directory.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import ConfigError
from agent.train.kinds import GradSampleMode
from agent.train.privacy import PRESETS, Accountant, Budget, PrivacyPreset
from fleet.tomlconfig import ConfigFileError, read_toml, validate

DEFAULT_CONFIG_PATH = Path("/etc/ppchat/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/ppchat")
DEFAULT_RUNTIME_DIR = Path("/run/ppchat")


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PathsConfig(Section):
    """Where the agent keeps its state (store, ledger, keys, adapters) and runtime files (sockets)."""

    state_dir: Path = DEFAULT_STATE_DIR
    runtime_dir: Path = DEFAULT_RUNTIME_DIR


class ModelConfig(Section):
    """The GGUF model and llama.cpp's settings for it."""

    path: Path | None = None
    """The GGUF file. Unset: the demo model from the build cache (development only)."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """When set, the file must have this SHA-256 or the agent refuses to load it."""
    n_ctx: int = Field(default=2048, ge=64, le=131072)
    n_threads: int | None = Field(default=None, ge=1, le=256)
    """CPU threads for generation; unset: the board profile's choice (physical cores)."""
    n_threads_batch: int | None = Field(default=None, ge=1, le=256)
    n_batch: int = Field(default=256, ge=8, le=8192)
    n_gpu_layers: int = Field(default=0, ge=-1)
    """Layers offloaded to the GPU; -1 offloads all (Jetson)."""
    use_mmap: bool = True
    chat_template: str | None = None
    """A Jinja chat template overriding the one stored in the GGUF."""
    system_prompt: str = "You are ppchat, a private assistant running on this device."
    prefix_cache_mb: int = Field(default=256, ge=0, le=65536)
    """RAM for saved KV states of recent conversations (prefix reuse across turns)."""


class GenerationConfig(Section):
    """Defaults for a reply; a request may override each within bounds."""

    max_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    repeat_penalty: float = Field(default=1.1, ge=0.0, le=5.0)


class SocketConfig(Section):
    """The local chat socket (JSON lines, docs/protocol.md)."""

    enabled: bool = True
    path: Path | None = None
    """Unset: ``<runtime_dir>/agent.sock``."""
    mode: int = Field(default=0o660, ge=0, le=0o777)
    max_line_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_connections: int = Field(default=32, ge=1, le=4096)
    max_pending_per_connection: int = Field(default=4, ge=1, le=256)
    idle_timeout_s: float = Field(default=600.0, gt=0)
    write_timeout_s: float = Field(default=30.0, gt=0)
    """A client that does not read its replies for this long is disconnected."""
    shutdown_grace_s: float = Field(default=5.0, ge=0, le=300)
    """On SIGTERM, how long in-flight replies (already told to stop) may take to send their ``done``."""


class StoreConfig(Section):
    """The on-device conversation store. It never leaves the device."""

    path: Path | None = None
    """Unset: ``<state_dir>/conversations.sqlite3``."""
    train_consent_default: bool = False
    """Whether a new conversation may be used for on-device training unless the client says."""
    retention_days: float = Field(default=30.0, gt=0)
    """Turns older than this are deleted."""
    max_turns_per_conversation: int = Field(default=10000, ge=1)
    purge_interval_s: float = Field(default=3600.0, gt=0)
    """How often the daemon deletes turns past the retention period (also once at start)."""


def _check_wyoming_uri(uri: str | None, key: str) -> None:
    """``tcp://HOST:PORT`` or ``unix:///ABSOLUTE/PATH`` (what the wyoming library's ``from_uri`` takes)."""
    if uri is None:
        return
    parsed = urlsplit(uri)
    if parsed.scheme == "tcp":
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None:
            raise ValueError(f"{key}: a tcp:// URI needs a host and a port, e.g. tcp://127.0.0.1:10700")
    elif parsed.scheme == "unix":
        if not parsed.path.startswith("/"):
            raise ValueError(
                f"{key}: a unix:// URI needs an absolute path, e.g. unix:///run/ppchat/wyoming.sock"
            )
    else:
        raise ValueError(f"{key}: only tcp:// and unix:// URIs are supported, got {uri!r}")


class WyomingConfig(Section):
    """The Wyoming voice door: Home Assistant's protocol for voice services (docs/wyoming.md).

    Home Assistant adds the agent as a conversation agent through its Wyoming integration; a satellite
    may also send audio here when speech-to-text and text-to-speech services are configured.
    """

    enabled: bool = False
    uri: str = "tcp://127.0.0.1:10700"
    """Where to listen: ``tcp://HOST:PORT`` (Home Assistant can only reach TCP: use the board's LAN
    address or ``0.0.0.0``; the protocol has no authentication, so firewall it) or ``unix:///PATH``."""
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    """File mode of a ``unix://`` socket."""
    name: str = Field(default="ppchat", min_length=1, max_length=64)
    """The program's name in ``info``: Home Assistant shows it as the conversation agent's name."""
    description: str = Field(default="Private on-device assistant (ppchat)", max_length=256)
    languages: tuple[str, ...] = Field(default=("en",), min_length=1, max_length=64)
    streaming: bool = True
    """Advertise and send ``handled-start``/``handled-chunk``/``handled-stop`` (plus ``handled``)."""
    stt_uri: str | None = None
    """A Wyoming speech-to-text service (e.g. wyoming-faster-whisper, ``tcp://127.0.0.1:10300``)."""
    stt_language: str | None = Field(default=None, max_length=16)
    tts_uri: str | None = None
    """A Wyoming text-to-speech service (e.g. wyoming-piper, ``tcp://127.0.0.1:10200``)."""
    tts_voice: str | None = Field(default=None, max_length=128)
    service_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """How long to wait for the speech services (connect, and each event)."""
    max_connections: int = Field(default=16, ge=1, le=1024)
    max_event_data_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest JSON data part of one event from a client."""
    max_audio_chunk_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest audio payload of one event from a client."""
    max_audio_s: float = Field(default=60.0, gt=0, le=3600)
    """Longest utterance a satellite may send (the audio is refused beyond it)."""
    max_conversations: int = Field(default=1024, ge=1, le=1_000_000)
    """Home Assistant conversation ids remembered (least recently used are forgotten)."""
    write_timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> WyomingConfig:
        _check_wyoming_uri(self.uri, "uri")
        _check_wyoming_uri(self.stt_uri, "stt_uri")
        _check_wyoming_uri(self.tts_uri, "tts_uri")
        return self


class MqttProtocolVersion(str, Enum):
    V311 = "3.1.1"
    V5 = "5"


class MqttChatConfig(Section):
    """Chat over a LOCAL MQTT broker (the board's or the home's, e.g. Home Assistant's Mosquitto).

    Requests arrive on ``<topic_prefix>/request``; replies stream to the topic each request names
    (docs/mqtt_chat.md). Never the fleet broker: the door refuses it unless ``allow_fleet_broker``.
    """

    enabled: bool = False
    host: str = Field(default="127.0.0.1", min_length=1, max_length=253)
    port: int | None = Field(default=None, ge=1, le=65535)
    """Unset: 1883, or 8883 with TLS."""
    protocol: MqttProtocolVersion = MqttProtocolVersion.V5
    tls: bool = False
    tls_ca_path: Path | None = None
    """CA bundle for the broker's certificate; unset: the system's."""
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    tls_insecure: bool = False
    """Skip the broker's host name check (self-signed test brokers only)."""
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password: str | None = Field(default=None, max_length=4096)
    password_path: Path | None = None
    """A file holding the password (first line), instead of ``password`` in this file."""
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    """Unset: ``ppchat-chat-<device_name>-<random>``."""
    topic_prefix: str | None = Field(default=None, min_length=1, max_length=200)
    """Unset: ``ppchat/local/<device_name>``."""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_pending: int = Field(default=16, ge=1, le=4096)
    """Requests waiting for a worker; beyond it a request gets ``too_many_requests``."""
    max_concurrent: int = Field(default=2, ge=1, le=64)
    reconnect_min_s: int = Field(default=1, ge=1, le=3600)
    reconnect_max_s: int = Field(default=60, ge=1, le=86400)
    allow_fleet_broker: bool = False
    """Serve chat on the fleet broker anyway. Conversation text would then cross the broker the
    fleet's coordinator uses: leave this false unless that broker is yours alone."""

    @model_validator(mode="after")
    def _check(self) -> MqttChatConfig:
        if self.password is not None and self.password_path is not None:
            raise ValueError("give 'password' or 'password_path', not both")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("'tls_cert_path' and 'tls_key_path' go together")
        if not self.tls and (self.tls_ca_path or self.tls_cert_path or self.tls_insecure):
            raise ValueError("the tls_* settings need 'tls = true'")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("'reconnect_max_s' must be at least 'reconnect_min_s'")
        return self

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (8883 if self.tls else 1883)


class HardwareConfig(Section):
    """The board: its profile (detected unless set) and where its sensors are read."""

    profile: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    """A profile from ``hardware/profiles`` (``raspberry-pi-5``); unset: detected from the device tree."""
    root_dir: Path = Path("/")
    """Where ``/proc``, ``/sys`` and ``/etc`` are read (a fake tree in tests)."""
    ignore_thermal_zones: tuple[str, ...] = ()
    """Thermal zone types to ignore besides the profile's own."""
    use_jtop: bool = False
    """Read Jetson power rails through jetson-stats (AGPL, optional) when it is installed and its
    service runs, instead of the INA3221 hwmon files (which give the same rails without a socket)."""

    @model_validator(mode="after")
    def _known_profile(self) -> HardwareConfig:
        if self.profile is not None:
            from hardware.profile import profile_names

            if self.profile not in profile_names():
                known = ", ".join(profile_names())
                raise ValueError(f"profile: unknown board profile {self.profile!r}; known: {known}")
        return self


class SchedulerConfig(Section):
    """When the device may train: every rule must hold (``agent status`` names the ones that do not)."""

    enabled: bool = True
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    """How often the sensors are read while waiting or training (a chat pre-empts at once)."""
    require_mains: bool = True
    """Train only on mains power; with a battery, only while it charges (or is full) above the level below."""
    min_battery_percent: float = Field(default=80.0, ge=0, le=100)
    block_on_under_voltage: bool = True
    max_temperature_c: float | None = Field(default=None, gt=0, le=150)
    """Stop training at this temperature; unset: the board profile's soft limit."""
    temperature_hysteresis_c: float = Field(default=5.0, ge=0, le=50)
    """After a stop for heat, resume only below the limit minus this."""
    block_on_unknown_temperature: bool = False
    """Whether a machine with no readable thermal zone may train."""
    idle_minutes: float = Field(default=10.0, ge=0, le=7 * 24 * 60)
    """No chat request for this long before training starts."""
    max_load_per_cpu: float | None = Field(default=0.5, gt=0, le=64)
    """The 1-minute load average per CPU must be below this to start (not checked while training)."""
    min_available_memory_mb: int | None = Field(default=None, ge=0)
    """Available memory needed to start; unset: not checked."""
    allowed_hours: tuple[str, ...] = ()
    """Local-time windows like ``"22:00-06:00"`` (may cross midnight); empty: any time."""
    min_privacy_budget: float = Field(default=0.0, ge=0)
    """Train only while more than this much privacy budget (epsilon) is left."""
    restart_backoff_s: float = Field(default=300.0, ge=0, le=86400)
    """After a pre-emption, wait this long before starting again (a weak supply would flap)."""
    personal_interval_h: float | None = Field(default=24.0, gt=0, le=24 * 365)
    """A personal-adapter run is due when none completed for this long (or a stopped one waits to
    resume); unset: the daemon never starts personal runs (the scheduler still gates fleet rounds)."""
    stop_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """After SIGTERM the trainer stops at its next step boundary; it is killed if still running
    after this long (its last checkpoint stands)."""
    preempt_freeze_s: float = Field(default=0.5, ge=0, le=5)
    """On pre-emption the trainer is also frozen (SIGSTOP) for this long, then thawed (SIGCONT) to
    finish its step, checkpoint and exit: the prompt of the reply that pre-empted it is evaluated
    without the trainer's step competing for the cores, caches and memory bandwidth (on a Pi the
    bandwidth is what both are short of). 0: no freeze."""

    @model_validator(mode="after")
    def _check_hours(self) -> SchedulerConfig:
        import re

        for window in self.allowed_hours:
            found = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)", window)
            if found is None or (found.group(3) == "24" and found.group(4) != "00"):
                raise ValueError(f"allowed_hours: {window!r} is not a window like '22:00-06:00'")
            if found.group(1, 2) == found.group(3, 4):
                raise ValueError(f"allowed_hours: {window!r} is empty (start equals end)")
        return self


class TrainConfig(Section):
    """``agent train``: private LoRA fine-tuning in its own process (docs/privacy.md)."""

    base_weights_dir: Path | None = None
    """A directory with an f16 transformers copy (``config.json``, ``model.safetensors``) of the model;
    unset: the weights are dequantized from the device's GGUF (one model file is enough)."""
    lora_rank: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16.0, gt=0.0, le=4096.0)
    target_modules: tuple[str, ...] = Field(default=("q_proj", "v_proj"), min_length=1, max_length=16)
    """Module names as in transformers' Llama/Qwen2 (q_proj, k_proj, v_proj, o_proj, gate_proj, ...)."""
    learning_rate: float = Field(default=2e-3, gt=0.0, le=10.0)
    batch_size: int = Field(default=16, ge=1, le=4096)
    """The expected (Poisson) batch size; the sample rate is this over the number of examples."""
    epochs: float = Field(default=2.0, gt=0.0, le=1000.0)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1000.0)
    """Per-example gradient clipping bound (DP-SGD's sensitivity)."""
    max_seq_len: int = Field(default=256, ge=16, le=32768)
    """An example is one conversation, truncated to its last turns that fit this many tokens."""
    holdout_fraction: float = Field(default=0.15, ge=0.0, lt=0.9)
    """Conversations kept out of training to measure the loss before and after (they are not trained on)."""
    min_examples: int = Field(default=8, ge=1)
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS
    """hooks: per-example LoRA gradients are small, and one backward pass beats ghost clipping's two
    (bench/dp_step.py); ghost also works with the peft model."""
    max_holdout_loss_increase: float = Field(default=0.05, ge=0.0, le=10.0)
    """Export is refused if the held-out loss rose by more than this fraction (opacus issue 820 guard)."""
    threads: int | None = Field(default=None, ge=1, le=256)
    """torch threads; unset: all CPUs (the process runs at the lowest priority anyway)."""
    nice: int = Field(default=19, ge=0, le=19)
    idle_io: bool = True
    """Run with the idle IO scheduling class."""
    checkpoint_every: int = Field(default=25, ge=1)
    """Steps between checkpoints (one is always saved when the run is stopped)."""
    seed: int | None = Field(default=None, ge=0)
    """Seed for sampling and noise in tests; unset: fresh randomness (never set one in production)."""


class PrivacyConfig(Section):
    """The device's privacy budget (docs/privacy.md)."""

    preset: PrivacyPreset = PrivacyPreset.MODERATE
    epsilon: float | None = Field(default=None, gt=0.0, le=100.0)
    """Overrides the preset's epsilon."""
    delta: float | None = Field(default=None, gt=0.0, lt=1e-2)
    period_days: float | None = Field(default=None, gt=0.0, le=3650.0)
    run_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    """Each run aims to spend about this fraction of the budget (composition decides the rest)."""
    accountants: tuple[Accountant, ...] = Field(default=(Accountant.PRV, Accountant.RDP), min_length=1)
    """The spend is the smallest of these accountants' (sound) values."""
    secure_mode: bool = False
    """opacus secure mode (cryptographic RNG for noise and sampling); needs torchcsprng installed."""

    @property
    def budget(self) -> Budget:
        base = PRESETS[self.preset]
        if self.epsilon is None and self.delta is None and self.period_days is None:
            return base
        return Budget(
            epsilon=self.epsilon if self.epsilon is not None else base.epsilon,
            delta=self.delta if self.delta is not None else base.delta,
            period_days=self.period_days if self.period_days is not None else base.period_days,
            preset=None,
        )


class FleetConfig(Section):
    """The fleet client (agent/fleet_client.py): rounds, sealed updates and global adapters over the
    fleet's MQTT broker. Only sealed updates, signed status and enrollment leave the device."""

    enabled: bool = False
    broker_url: str | None = None
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS); required when enabled. ``agent.mqtt_chat``
    refuses to serve chat on this broker."""
    username: str | None = Field(default=None, min_length=1, max_length=256)
    """Unset: the device id (Mosquitto ACLs key on it)."""
    password: str | None = Field(default=None, max_length=4096)
    password_path: Path | None = None
    """A file holding the broker password (first line); unset with no ``password``: the identity's
    broker password file when it exists."""
    tls_ca_path: Path | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    coordinator_keys_path: Path | None = None
    """The coordinator's ``identity.pub``; unset: learnt at enrollment (pinned by the token)."""
    enrollment_token_path: Path | None = None
    """A file holding the one-time enrollment token (used once, when not enrolled)."""
    topic_root: str = Field(default="ppchat", pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0.0, le=3600.0)
    reconnect_max_s: float = Field(default=60.0, gt=0.0, le=86400.0)
    train_max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    """Cap on a round's DP-SGD steps (``agent train --max-steps``); unset: the trainer's plan."""
    train_timeout_s: float = Field(default=6 * 3600.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> FleetConfig:
        if self.broker_url is None:
            if self.enabled:
                raise ValueError("'broker_url' is required when the fleet client is enabled")
        else:
            parts = urlsplit(self.broker_url)
            if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
                raise ValueError("broker_url must be mqtt://host:port or mqtts://host:port")
            try:
                _ = parts.port
            except ValueError as exc:
                raise ValueError(f"broker_url: bad port: {exc}") from None
        if self.password is not None and self.password_path is not None:
            raise ValueError("give 'password' or 'password_path', not both")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("'tls_cert_path' and 'tls_key_path' go together")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("'reconnect_max_s' must be at least 'reconnect_min_s'")
        return self

    @property
    def url(self) -> str:
        if self.broker_url is None:
            raise ConfigError("fleet.broker_url is not set")
        return self.broker_url

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.tls_ca_path is not None


class LogLevel(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LoggingConfig(Section):
    level: LogLevel = LogLevel.INFO
    journal: bool | None = None
    """Log to the systemd journal with structured fields; unset: when running under systemd."""


class AgentConfig(Section):
    """The whole agent configuration (``/etc/ppchat/agent.toml``)."""

    device_name: str = Field(default="ppchat-device", min_length=1, max_length=64)
    paths: PathsConfig = PathsConfig()
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    socket: SocketConfig = SocketConfig()
    store: StoreConfig = StoreConfig()
    logging: LoggingConfig = LoggingConfig()
    wyoming: WyomingConfig = WyomingConfig()
    mqtt_chat: MqttChatConfig = MqttChatConfig()
    hardware: HardwareConfig = HardwareConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    fleet: FleetConfig = FleetConfig()

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        return self

    # Derived paths: one place decides where each file lives.
    @property
    def socket_path(self) -> Path:
        return self.socket.path or self.paths.runtime_dir / "agent.sock"

    @property
    def store_path(self) -> Path:
        return self.store.path or self.paths.state_dir / "conversations.sqlite3"

    @property
    def status_path(self) -> Path:
        """The daemon's status snapshot, read by ``agent status``."""
        return self.paths.runtime_dir / "status.json"

    @property
    def adapters_dir(self) -> Path:
        return self.paths.state_dir / "adapters"

    @property
    def ledger_path(self) -> Path:
        """The privacy ledger (agent/train/ledger.py)."""
        return self.paths.state_dir / "privacy" / "ledger.json"

    @property
    def train_dir(self) -> Path:
        """The trainer's checkpoints and run results."""
        return self.paths.state_dir / "train"

    @property
    def fleet_dir(self) -> Path:
        """The fleet client's state: enrollment, the coordinator's pinned keys, rounds, residual."""
        return self.paths.state_dir / "fleet"

    @property
    def global_adapters_dir(self) -> Path:
        """Global fleet adapters, ``<version>.gguf`` (the current one and the previous, for rollback)."""
        return self.adapters_dir / "global"


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None) -> AgentConfig:
    """Validate a parsed TOML document into :class:`AgentConfig` or raise :class:`ConfigError`."""
    try:
        return validate(AgentConfig, data, base_dir=base_dir)
    except ConfigFileError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def load_config(path: Path | None) -> AgentConfig:
    """Load the agent's config file. ``None`` means all defaults."""
    if path is None:
        return AgentConfig()
    path = Path(path)
    try:
        data = read_toml(path)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(data, base_dir=path.parent.resolve())

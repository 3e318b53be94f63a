"""Reading a service's TOML config file: the agent's and the coordinator's share these rules.

- :func:`read_toml` reads and parses a file; a missing, unreadable or malformed file is a
  :class:`ConfigFileError` that names the file.
- :func:`resolve_paths` makes relative paths absolute against the file's directory, for every string
  under a key named ``path`` or ending in ``_dir``, ``_path`` or ``_file`` (``~`` expanded), so that a
  config means the same from any working directory.
- :func:`validate` builds the typed model; every validation error names its dotted key
  (``scheduler.idle_minutes: ...``), so that an operator knows what to fix.

Each service turns :class:`ConfigFileError` into its own ``ConfigError``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

M = TypeVar("M", bound=BaseModel)
PATH_SUFFIXES = ("_dir", "_path", "_file")


class ConfigFileError(ValueError):
    """The config file cannot be read, parsed or validated (the message says why, and where)."""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None


def is_path_key(key: str) -> bool:
    return key == "path" or key.endswith(PATH_SUFFIXES)


def resolve_paths(data: Any, base: Path) -> Any:
    """``data`` with every relative path string under a path key joined to ``base``."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, str) and is_path_key(key):
                p = Path(value).expanduser()
                out[key] = str(p if p.is_absolute() else base / p)
            else:
                out[key] = resolve_paths(value, base)
        return out
    return data


def describe(exc: ValidationError) -> str:
    """``key.sub: message; other: message`` for every error."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        parts.append(f"{key}: {err['msg']}")
    return "; ".join(parts)


def validate(model: type[M], data: dict[str, Any], *, base_dir: Path | None = None) -> M:
    if base_dir is not None:
        data = resolve_paths(data, base_dir)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(describe(exc)) from None

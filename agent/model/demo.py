"""The demo model: built once per build key, cached, shared by the demo and the tests.

    ensure_demo_model() -> DemoModel     the cached model, building it first when needed

The cache lives in ``$PPCHAT_CACHE_DIR`` or ``~/.cache/ppchat``, under ``demo-model/<key>/``, where
the key hashes the corpus, the builder's source, its hyperparameters and the versions of the
libraries that shape the result. A build runs in its own process (:mod:`agent.model.build`, the
only place torch is imported) into a temporary directory that is renamed into place when complete,
under a file lock, so concurrent callers wait for one build and never see a partial model.

This module is light: the cached path imports no torch, sentencepiece, gguf or llama.cpp.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import ModelError
from agent.model import spec as s

MANIFEST_VERSION = 1
BUILD_TIMEOUT_S = 3600
_HERE = Path(__file__).parent
# The modules whose source decides the built files (not this one: it only caches them).
_BUILDER_SOURCES = ("build.py", "corpus.py", "export.py", "quantize.py", "spec.py", "train.py", "vocab.py")
_CORPUS = _HERE / "data" / "dialogues.jsonl"
# Libraries whose version can change the bytes of the result.
_PACKAGES = ("torch", "transformers", "sentencepiece", "gguf", "llama_cpp_python", "numpy", "safetensors")


@dataclass(frozen=True)
class _FileNames:
    f16: str = "ppchat-demo-f16.gguf"
    q8_0: str = "ppchat-demo-q8_0.gguf"
    q4_k_m: str = "ppchat-demo-q4_k_m.gguf"
    tokenizer: str = "tokenizer.model"
    hf_config: str = "hf/config.json"
    hf_weights: str = "hf/model.safetensors"
    reference: str = "reference-logits.safetensors"
    manifest: str = "manifest.json"


FILE_NAMES = _FileNames()

Builder = Callable[[Path, str], None]
"""Builds every file of the model for a build key into an empty directory (the default runs
:mod:`agent.model.build` in its own process)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TrainFigures(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    first_loss: float
    train_loss: float
    """Mean loss per assistant token over the training split, after training."""
    val_loss: float
    """The same over the held-out validation split."""
    steps: int
    tokens_seen: int
    seconds: float


class Manifest(BaseModel):
    """``manifest.json``: what was built, from what, and each file's digest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = MANIFEST_VERSION
    name: str
    key: str
    files: dict[str, FileEntry]
    spec: s.DemoSpec
    vocab_size: int
    train: TrainFigures
    build_seconds: float
    versions: dict[str, str]


class DemoModel(BaseModel):
    """Paths of a built demo model (all inside ``dir``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: Path
    key: str
    f16: Path
    q8_0: Path
    q4_k_m: Path
    tokenizer: Path
    """The SentencePiece model the vocabulary was trained as."""
    hf_dir: Path
    """A transformers copy (``config.json``, ``model.safetensors``) with the f16 GGUF's exact weights."""
    reference: Path
    """torch's float32 logits of these weights on a corpus dialogue (``tokens``, ``logits``)."""
    manifest: Path

    @classmethod
    def at(cls, directory: Path, key: str) -> DemoModel:
        return cls(
            dir=directory,
            key=key,
            f16=directory / FILE_NAMES.f16,
            q8_0=directory / FILE_NAMES.q8_0,
            q4_k_m=directory / FILE_NAMES.q4_k_m,
            tokenizer=directory / FILE_NAMES.tokenizer,
            hf_dir=directory / "hf",
            reference=directory / FILE_NAMES.reference,
            manifest=directory / FILE_NAMES.manifest,
        )

    def load_manifest(self) -> Manifest:
        try:
            return Manifest.model_validate_json(self.manifest.read_bytes())
        except (OSError, ValidationError) as exc:
            raise ModelError(f"demo model manifest {self.manifest} is unreadable: {exc}") from exc

    def verify(self) -> Manifest:
        """Check every file against the manifest's size and SHA-256; raise ModelError if one differs."""
        manifest = self.load_manifest()
        for name, expected in manifest.files.items():
            actual = file_entry(self.dir / name)
            if actual != expected:
                raise ModelError(f"demo model file {name} does not match its manifest entry")
        return manifest


def file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return FileEntry(sha256=digest.hexdigest(), size=path.stat().st_size)


def package_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def build_key(demo: s.DemoSpec = s.DEFAULT_SPEC) -> str:
    """16 hex digits naming a build: corpus, builder source, hyperparameters, library versions."""
    digest = hashlib.sha256(f"ppchat-demo-model/{MANIFEST_VERSION}\n".encode())
    for part in (_CORPUS, *(_HERE / name for name in _BUILDER_SOURCES)):
        data = part.read_bytes()
        digest.update(f"{part.name} {len(data)}\n".encode())
        digest.update(data)
    digest.update(demo.model_dump_json().encode())
    digest.update(json.dumps(package_versions(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("PPCHAT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ppchat"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _prune_abandoned(root: Path) -> None:
    """Remove ``.tmp-<key>-<pid>`` directories whose key nobody is building (its lock is free)."""
    for tmp in root.glob(".tmp-*"):
        key = tmp.name.split("-")[1]
        fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a build of that key is running
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(fd)


def _run_builder(out: Path, key: str) -> None:
    root = str(_HERE.parent.parent)  # the directory holding the ``agent`` package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # OpenMP threads that spin while waiting collapse torch's speed on a busy machine (5x slower).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, "-m", "agent.model.build", "--out", str(out), "--key", key]
    try:
        subprocess.run(command, env=env, check=True, timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        raise ModelError(f"building the demo model failed (exit code {exc.returncode}); see above") from exc
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"building the demo model took over {BUILD_TIMEOUT_S} s") from exc


def ensure_demo_model(
    cache_dir: Path | None = None, *, force: bool = False, builder: Builder | None = None
) -> DemoModel:
    """The cached demo model for the current build key, built first if missing (or if ``force``)."""
    root = (cache_dir if cache_dir is not None else default_cache_dir()) / "demo-model"
    key = build_key()
    final = root / key
    model = DemoModel.at(final, key)
    if not force and model.manifest.is_file():
        return model
    root.mkdir(parents=True, exist_ok=True)
    _prune_abandoned(root)
    with _locked(root / f".{key}.lock"):
        if not force and model.manifest.is_file():
            return model  # another process built it while we waited
        tmp = root / f".tmp-{key}-{os.getpid()}"
        tmp.mkdir()
        try:
            started = time.monotonic()
            (builder or _run_builder)(tmp, key)
            DemoModel.at(tmp, key).verify()
            old = root / f".old-{key}-{os.getpid()}"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            print(f"[demo model] ready in {final} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model

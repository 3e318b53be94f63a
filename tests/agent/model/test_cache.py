"""The demo model's cache: one build per key, atomic, safe with concurrent callers.

These tests inject a builder that writes a tiny stand-in model, so they test the cache, not the
model (tests/agent/model/test_demo_model.py tests the real one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.errors import ModelError
from agent.model import demo
from agent.model.spec import DEFAULT_SPEC


class FakeBuilder:
    """Writes one file and a manifest naming it; counts its calls; can be slow or fail."""

    def __init__(self, *, delay_s: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay_s = delay_s
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, out: Path, key: str) -> None:
        with self._lock:
            self.calls += 1
        (out / demo.FILE_NAMES.f16).write_bytes(b"GGUF fake " + key.encode())
        time.sleep(self.delay_s)
        if self.fail:
            raise ModelError("builder failed")
        manifest = demo.Manifest(
            name="fake",
            key=key,
            files={demo.FILE_NAMES.f16: demo.file_entry(out / demo.FILE_NAMES.f16)},
            spec=DEFAULT_SPEC,
            vocab_size=1,
            train=demo.TrainFigures(
                first_loss=1.0, train_loss=0.5, val_loss=0.6, steps=1, tokens_seen=1, seconds=0.0
            ),
            build_seconds=0.0,
            versions={},
        )
        (out / demo.FILE_NAMES.manifest).write_text(manifest.model_dump_json())


def test_builds_once_then_serves_from_the_cache(tmp_path: Path) -> None:
    builder = FakeBuilder()
    first = demo.ensure_demo_model(tmp_path, builder=builder)
    second = demo.ensure_demo_model(tmp_path, builder=builder)
    assert builder.calls == 1
    assert first == second
    assert first.dir == tmp_path / "demo-model" / demo.build_key()
    assert first.verify().key == first.key
    assert not list((tmp_path / "demo-model").glob(".tmp-*"))


def test_force_rebuilds_in_place(tmp_path: Path) -> None:
    builder = FakeBuilder()
    demo.ensure_demo_model(tmp_path, builder=builder)
    model = demo.ensure_demo_model(tmp_path, builder=builder, force=True)
    assert builder.calls == 2
    model.verify()
    assert [p.name for p in (tmp_path / "demo-model").iterdir() if p.is_dir()] == [model.key]


def test_concurrent_callers_wait_for_one_build(tmp_path: Path) -> None:
    builder = FakeBuilder(delay_s=0.5)
    results: list[demo.DemoModel] = []

    def call() -> None:
        results.append(demo.ensure_demo_model(tmp_path, builder=builder))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert builder.calls == 1
    assert len(results) == 3
    assert len(set(results)) == 1


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="builder failed"):
        demo.ensure_demo_model(tmp_path, builder=FakeBuilder(fail=True))
    assert not [p.name for p in (tmp_path / "demo-model").iterdir() if p.is_dir()]
    model = demo.ensure_demo_model(tmp_path, builder=FakeBuilder())
    model.verify()


def test_a_changed_file_fails_verification(tmp_path: Path) -> None:
    model = demo.ensure_demo_model(tmp_path, builder=FakeBuilder())
    model.f16.write_bytes(b"GGUF tampered")
    with pytest.raises(ModelError, match="does not match"):
        model.verify()


def test_the_cache_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPCHAT_CACHE_DIR", str(tmp_path))
    model = demo.ensure_demo_model(builder=FakeBuilder())
    assert model.dir.parent.parent == tmp_path


def test_the_cached_path_imports_no_heavy_library(tmp_path: Path) -> None:
    demo.ensure_demo_model(tmp_path, builder=FakeBuilder())
    code = (
        "import sys; from pathlib import Path; from agent.model.demo import ensure_demo_model; "
        f"ensure_demo_model(Path({str(tmp_path)!r})); "
        "heavy = {'torch', 'transformers', 'sentencepiece', 'gguf', 'llama_cpp'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    root = Path(demo.__file__).parent.parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_abandoned_temporary_builds_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "demo-model"
    abandoned = root / ".tmp-0123456789abcdef-99999"
    abandoned.mkdir(parents=True)
    (abandoned / "partial.gguf").write_bytes(b"GGUF")
    demo.ensure_demo_model(tmp_path, builder=FakeBuilder())
    assert not abandoned.exists()

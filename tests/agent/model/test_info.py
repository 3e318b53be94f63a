"""The pure-Python GGUF header reader and ``agent model info``."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.errors import ModelError
from agent.model.demo import DemoModel
from agent.model.info import read_gguf_info, summarize


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _header(pairs: bytes, n_pairs: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_pairs) + pairs + tensors


SAMPLE = _header(
    _string("general.architecture")
    + struct.pack("<I", 8)
    + _string("llama")
    + _string("general.file_type")
    + struct.pack("<II", 4, 15)
    + _string("tokenizer.ggml.scores")
    + struct.pack("<IIQ", 9, 6, 2)
    + struct.pack("<ff", 0.5, -1.0)
    + _string("flag")
    + struct.pack("<I?", 7, True),
    4,
    _string("blk.0.attn_q.weight")
    + struct.pack("<I", 2)
    + struct.pack("<QQ", 256, 256)
    + struct.pack("<IQ", 12, 0),
    1,
)


def test_reads_a_hand_made_header(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(SAMPLE)
    info = read_gguf_info(path)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.file_type == "MOSTLY_Q4_K_M"
    assert info.metadata["tokenizer.ggml.scores"] == [0.5, -1.0]
    assert info.metadata["flag"] is True
    assert [(t.name, t.shape, t.ggml_type) for t in info.tensors] == [("blk.0.attn_q.weight", (256, 256), 12)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"GGML" + bytes(20), "not a GGUF"),
        (b"GGUF" + struct.pack("<IQQ", 9, 0, 0), "version 9"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40), "implausible"),
        (_header(_string("k") + struct.pack("<I", 99), 1), "value type 99"),
        (_header(_string("k") + struct.pack("<IQ", 8, 1 << 40), 1), "over the limit"),
        (_header(_string("k") + struct.pack("<IIQ", 9, 4, 1 << 40), 1), "over the limit"),
        (_header(struct.pack("<Q", 2) + b"\xff\xfe", 1), "not UTF-8"),
    ],
)
def test_bad_headers_are_model_errors(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelError, match=message):
        read_gguf_info(path)


def test_a_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        read_gguf_info(tmp_path / "absent.gguf")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=len(SAMPLE)), noise=st.binary(max_size=64))
def test_any_corruption_is_a_model_error_or_a_reading(tmp_path: Path, cut: int, noise: bytes) -> None:
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(SAMPLE[:cut] + noise)
    with contextlib.suppress(ModelError):
        read_gguf_info(path)


def test_summarize_shortens_long_values() -> None:
    assert summarize(list(range(100)), max_items=3) == "[0, 1, 2, ... (100 items)]"
    assert summarize("x" * 500, max_chars=10) == "'xxxxxx..."


def test_reads_the_demo_model(demo_model: DemoModel) -> None:
    info = read_gguf_info(demo_model.q4_k_m)
    assert info.architecture == "llama"
    assert info.file_type == "MOSTLY_Q4_K_M"
    assert info.metadata["tokenizer.ggml.model"] == "llama"
    assert info.metadata["llama.embedding_length"] == 256


def test_info_command_prints_json(demo_model: DemoModel, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", str(demo_model.q8_0), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["file_type"] == "MOSTLY_Q8_0"
    assert document["metadata"]["general.architecture"] == "llama"
    assert document["metadata"]["tokenizer.ggml.tokens"].endswith("items)]")


def test_info_command_names_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"nope")
    assert main(["model", "info", str(path)]) == ModelError.exit_code
    assert "not a GGUF" in capsys.readouterr().err


def test_build_demo_command_prints_the_files(
    demo_model: DemoModel, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "build-demo"]) == 0
    out = capsys.readouterr().out
    assert str(demo_model.dir) in out
    assert demo_model.load_manifest().files[demo_model.f16.name].sha256 in out

"""Quantize a GGUF with llama.cpp's own quantizer, through llama-cpp-python's C binding."""

from __future__ import annotations

import ctypes
from enum import IntEnum
from pathlib import Path

from agent.errors import ModelError

_GGML_LOG_LEVEL_ERROR = 3


class FileType(IntEnum):
    """llama.cpp's ``llama_ftype`` values (GGUF ``general.file_type``) the demo model ships."""

    MOSTLY_F16 = 1
    MOSTLY_Q8_0 = 7
    MOSTLY_Q4_K_M = 15


def quantize(source: Path, target: Path, file_type: FileType, *, threads: int = 2) -> None:
    """Write ``target``, the ``file_type`` quantization of the GGUF ``source``.

    llama.cpp's log (a line per tensor) is kept quiet; its error lines go into the ModelError.
    """
    import llama_cpp
    from llama_cpp import _logger

    errors: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def keep_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == _GGML_LOG_LEVEL_ERROR:
            errors.append(text.decode("utf-8", "replace").strip())

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = threads
    llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0 or not target.exists():
        detail = "; ".join(errors) or f"code {rc}"
        raise ModelError(f"llama.cpp failed to quantize {source} to {file_type.name}: {detail}")

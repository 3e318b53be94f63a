"""Writing the config files' TOML: tables of strings, integers, floats, booleans and string lists.

There is no TOML writer in the standard library; this covers what provisioning writes and
nothing more (the result is checked by parsing it back in the tests).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Union

Scalar = Union[str, int, float, bool]
Value = Union[Scalar, list[str]]
Table = Mapping[str, Value]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else string(name)


def value(v: Value) -> str:
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("TOML floats here must be finite")
        return repr(v)
    if isinstance(v, str):
        return string(v)
    return "[" + ", ".join(string(item) for item in v) + "]"


def dumps(top: Table, tables: Mapping[str, Table], *, header: str = "") -> str:
    """``top`` keys, then one ``[name]`` table per entry of ``tables`` (in order)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    lines += [f"{key(k)} = {value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        if lines and lines[-1] != "":
            lines.append("")
        lines.append(f"[{key(name)}]")
        lines += [f"{key(k)} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"

"""Turning a token stream into text: whole UTF-8 characters only, never a partial stop string.

Both classes are pure state machines (no llama.cpp), property-tested in ``tests/agent/test_engine_text.py``.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class Utf8Assembler:
    """Joins token byte pieces into text; a multi-byte character split across tokens waits for its tail.

    Invalid byte sequences become U+FFFD (a model can emit any bytes through byte fallback).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """The text of any incomplete trailing sequence (as U+FFFD), at the end of a reply."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Holds back text that could be the start of a stop string until it is known not to be.

    ``push`` returns the text that is safe to emit and whether a stop string was found; the stop
    string itself and everything after it are never emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    @property
    def pending(self) -> str:
        return self._pending

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._pending + text
        first = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first >= 0:
            self._pending = ""
            return buf[:first], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, when the reply ends for another reason than a stop string."""
        out, self._pending = self._pending, ""
        return out

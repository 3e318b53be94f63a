"""A RAM-bounded LRU of saved KV states, looked up by the longest common token prefix.

The payload is opaque here (the engine stores llama.cpp sequence-state buffers); each entry is keyed by
the exact tokens whose KV it holds, so a prompt that shares a prefix with an entry can restore it and
evaluate only the rest. Pure data structure, no llama.cpp.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (binary search over slice equality, which runs in C)."""
    lo, hi = 0, min(len(a), len(b))
    ta, tb = tuple(a[:hi]), tuple(b[:hi])
    if ta == tb:
        return hi
    # invariant: ta[:lo] == tb[:lo] and ta[:hi] != tb[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ta[:mid] == tb[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class CacheEntry(Generic[T]):
    tokens: tuple[int, ...]
    payload: T
    nbytes: int


class PrefixCache(Generic[T]):
    """Saved states, least recently used evicted first so the total stays under ``capacity_bytes``."""

    def __init__(self, *, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self._capacity = capacity_bytes
        self._entries: OrderedDict[tuple[int, ...], CacheEntry[T]] = OrderedDict()
        self._size = 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def size_bytes(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def put(self, tokens: Sequence[int], payload: T, *, nbytes: int) -> bool:
        """Store a state; returns False when it alone is larger than the whole cache.

        Entries whose tokens are a prefix of ``tokens`` (earlier turns of the same conversation) are
        dropped: the new entry serves every prompt they would.
        """
        key = tuple(tokens)
        if nbytes > self._capacity or not key:
            return False
        for old_key in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._size -= self._entries.pop(old_key).nbytes
        while self._entries and self._size + nbytes > self._capacity:
            _, evicted = self._entries.popitem(last=False)
            self._size -= evicted.nbytes
        self._entries[key] = CacheEntry(key, payload, nbytes)
        self._size += nbytes
        return True

    def best_match(self, tokens: Sequence[int]) -> tuple[CacheEntry[T], int] | None:
        """The entry sharing the longest prefix with ``tokens`` (and that length), marked recently used."""
        best: CacheEntry[T] | None = None
        best_len = 0
        for entry in self._entries.values():
            n = common_prefix_len(entry.tokens, tokens)
            if n > best_len:
                best, best_len = entry, n
        if best is None:
            return None
        self._entries.move_to_end(best.tokens)
        return best, best_len

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0

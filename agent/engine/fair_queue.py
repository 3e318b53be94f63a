"""A bounded, thread-safe queue that serves its producers round-robin.

Requests are grouped by a fairness key (one per client); ``get`` takes the oldest request of the next
key in turn, so a client with many queued requests cannot starve another. Control items (adapter swaps,
shutdown) jump the line. Pure data structure plus a lock; no llama.cpp, no asyncio.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Raised by :meth:`FairQueue.put` when ``max_items`` requests are already waiting."""


class QueueClosed(Exception):
    """Raised by :meth:`FairQueue.put` and :meth:`FairQueue.get` after :meth:`FairQueue.close`."""


class FairQueue(Generic[T]):
    def __init__(self, *, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self._max = max_items
        self._lock = threading.Condition()
        self._by_key: OrderedDict[str, deque[T]] = OrderedDict()
        self._priority: deque[T] = deque()
        self._count = 0
        self._last_key: str | None = None
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def put(self, key: str, item: T) -> None:
        with self._lock:
            if self._closed:
                raise QueueClosed
            if self._count >= self._max:
                raise QueueFull
            self._by_key.setdefault(key, deque()).append(item)
            self._count += 1
            self._lock.notify()

    def put_priority(self, item: T) -> None:
        """Queue a control item ahead of every request (never refused for size)."""
        with self._lock:
            if self._closed:
                raise QueueClosed
            self._priority.append(item)
            self._lock.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """The next item, or None after ``timeout`` seconds; raises QueueClosed once closed and empty."""
        with self._lock:
            while not self._priority and not self._by_key:
                if self._closed:
                    raise QueueClosed
                if not self._lock.wait(timeout):
                    return None
            if self._priority:
                return self._priority.popleft()
            key = next(iter(self._by_key))
            if key == self._last_key and len(self._by_key) > 1:
                # The key just served goes behind the others that were waiting meanwhile.
                self._by_key.move_to_end(key)
                key = next(iter(self._by_key))
            items = self._by_key[key]
            item = items.popleft()
            if items:
                self._by_key.move_to_end(key)
            else:
                del self._by_key[key]
            self._count -= 1
            self._last_key = key
            return item

    def remove(self, item: T) -> bool:
        """Withdraw a waiting request (a client that went away before its turn)."""
        with self._lock:
            for key, items in self._by_key.items():
                try:
                    items.remove(item)
                except ValueError:
                    continue
                if not items:
                    del self._by_key[key]
                self._count -= 1
                return True
            return False

    def close(self) -> list[T]:
        """Refuse new items and return everything still waiting (control items first)."""
        with self._lock:
            self._closed = True
            left = list(self._priority)
            for items in self._by_key.values():
                left.extend(items)
            self._priority.clear()
            self._by_key.clear()
            self._count = 0
            self._lock.notify_all()
            return left

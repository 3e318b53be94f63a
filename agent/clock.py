"""An injectable clock, so that schedules, idle timers and hysteresis are tested without sleeping.

:class:`SystemClock` is the real one. :class:`ManualClock` moves only when a test calls
:meth:`ManualClock.advance`, which wakes every :meth:`~ManualClock.sleep` whose deadline has come
(in the manner of trio's ``MockClock``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and idle time)."""
        ...

    def now(self) -> datetime:
        """The local wall-clock time, timezone-aware (for allowed hours)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now().astimezone()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told. Its wall time and monotonic time advance together."""

    def __init__(self, *, start: datetime | None = None, monotonic: float = 1000.0) -> None:
        if start is None:
            start = datetime(2025, 1, 6, 12, 0, tzinfo=timezone.utc)
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start time")
        self._start = start
        self._origin = monotonic
        self._now = monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._now - self._origin)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._counter), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the sleepers now due (they run at the loop's next turn)."""
        if seconds < 0:
            raise ValueError("time does not go back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def set_time(self, when: datetime) -> None:
        """Jump the wall clock to ``when`` (forward only, like :meth:`advance`)."""
        self.advance((when - self.now()).total_seconds())

    @property
    def sleepers(self) -> int:
        """Sleeps still waiting (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

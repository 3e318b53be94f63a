"""User activity: how long since the last chat request, fed by the daemon's front doors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field


class Activity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    idle_s: float = Field(ge=0)
    """Seconds since the last chat request began or ended, or since the tracker started."""
    active_requests: int = Field(ge=0)
    """Replies being generated right now."""
    ever_active: bool


class ActivitySensor(Protocol):
    def read_activity(self) -> Activity: ...


class ActivityTracker:
    """Counts chat requests; ``monotonic`` is the clock's (``Clock.monotonic``).

    Idle time starts at construction: a daemon that just started does not know how long its user
    has been away, so it waits the full idle period before training.
    """

    def __init__(self, *, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._last = monotonic()
        self._active = 0
        self._ever = False

    def notify(self) -> None:
        """A chat request arrived or made progress."""
        self._last = self._monotonic()
        self._ever = True

    @contextmanager
    def request(self) -> Iterator[None]:
        """Wraps one request: busy while inside, idle time counted from its end."""
        self._active += 1
        self.notify()
        try:
            yield
        finally:
            self._active -= 1
            self.notify()

    def read_activity(self) -> Activity:
        idle = 0.0 if self._active else max(0.0, self._monotonic() - self._last)
        return Activity(idle_s=idle, active_requests=self._active, ever_active=self._ever)

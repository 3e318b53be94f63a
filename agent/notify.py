"""systemd's notification protocol (sd_notify) without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

    READY=1          after the model has loaded and the socket listens
    STATUS=...       one line for ``systemctl status``
    WATCHDOG=1       every half ``$WATCHDOG_USEC`` (when the unit sets WatchdogSec=)
    STOPPING=1       when a shutdown begins

Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing. Sending is best effort, as with
``sd_notify(3)``: a failure is logged, never fatal.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # vsock and other schemes are not used on our boards


class Notifier:
    """Sends notifications to the service manager, or nothing when there is none."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", raw)
        watchdog: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(address, watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half the manager's timeout), or None when not asked."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value`` lines) in one datagram. True when it was sent."""
        if self._address is None:
            return False
        for field in fields:
            if "\n" in field or "=" not in field:
                raise ValueError(f"not a KEY=value notification field: {field!r}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode("utf-8"), self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        return self.notify(*self._status_field(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status_field(status))

    @staticmethod
    def _status_field(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.split()),)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

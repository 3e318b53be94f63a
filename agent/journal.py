"""Logging to the systemd journal with structured fields (``agent run`` under systemd).

Each record goes to journald as one entry with, besides ``MESSAGE`` and ``PRIORITY``:

    SYSLOG_IDENTIFIER  ppchat-agent
    PPCHAT_COMPONENT   the agent module that logged (``daemon``, ``fleet_client``, ``scheduler``, ...)
    PPCHAT_LOGGER      the full logger name (``agent.fleet_client``)
    PPCHAT_DEVICE      the config's ``device_name``
    CODE_FILE, CODE_LINE, CODE_FUNC  where it was logged

so that ``journalctl -u ppchat-agent PPCHAT_COMPONENT=fleet_client`` or ``-o verbose`` picks them out.
The sender is systemd-python's ``systemd.journal.send`` (injected, so tests check the fields without
journald). :func:`journal_wanted` decides when: ``logging.journal = true``, or unset and the process
runs under systemd (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set) with systemd-python importable;
otherwise logs go to stderr (which systemd also forwards to the journal, without the fields).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

SYSLOG_IDENTIFIER = "ppchat-agent"

JournalSender = Callable[..., object]
"""``systemd.journal.send``: ``send(MESSAGE, **FIELDS)`` with string values."""

_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (journald's ``PRIORITY``)."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def component_of(logger_name: str) -> str:
    """``agent.fleet_client`` -> ``fleet_client``; ``agent.engine.llama_backend`` -> ``engine``."""
    parts = logger_name.split(".")
    if parts[0] in ("agent", "hardware", "fleet") and len(parts) > 1:
        return parts[1]
    return parts[0] or "root"


def under_systemd(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def journal_wanted(setting: bool | None, environ: Mapping[str, str]) -> bool:
    """Whether to log to the journal: the config says so, or (unset) we run under systemd."""
    return setting if setting is not None else under_systemd(environ)


class StructuredJournalHandler(logging.Handler):
    """A logging handler sending each record to journald with the ppchat fields."""

    def __init__(self, send: JournalSender, *, device: str, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._send = send
        self._device = device

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = self.format(record)
        return {
            "MESSAGE": message,
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
            "PPCHAT_COMPONENT": component_of(record.name),
            "PPCHAT_LOGGER": record.name,
            "PPCHAT_DEVICE": self._device,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(**self.fields(record))
        except (OSError, ValueError):
            self.handleError(record)  # journald gone: logging's own error path, never a crash


def systemd_sender() -> JournalSender | None:
    """systemd-python's ``journal.send``, or None when it is not installed."""
    import importlib

    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    send: JournalSender = journal.send
    return send

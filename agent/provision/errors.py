"""Provisioning's errors (all :class:`ProvisionError`, an :class:`agent.errors.AgentError`)."""

from __future__ import annotations

from agent.errors import AgentError


class ProvisionError(AgentError):
    """A step cannot be done (a command failed, a download does not match its SHA-256, ...)."""

    exit_code = 1


class ChecksumMismatch(ProvisionError):
    """A download's SHA-256 is not the pinned one; nothing was installed."""

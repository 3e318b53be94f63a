"""The coordinator's exception tree.

    CoordinatorError            base of every error the coordinator raises on purpose; carries an exit code
    ├── ConfigError             the config file is missing, unreadable or invalid (names the key)
    ├── NotInitialized          no keys or store yet: run ``coordinator init``
    ├── StoreError              the SQLite store cannot be opened, migrated or written
    │   ├── NotFound            a round, device or release the caller named does not exist
    │   └── Conflict            a write would break a uniqueness rule (same device twice in a round, ...)
    ├── EnrollmentError         an enrollment token is unknown, used or expired; a device name is taken
    ├── RoundError              a round operation the state machine does not allow (e.g. two open rounds)
    ├── UpdateRejected          an update refused at the door; ``reason`` says why (a ``RefusalReason``)
    ├── AggregationError        the updates cannot be aggregated
    │   └── DeltaMismatch       tensor names or shapes differ between updates (names the tensor)
    ├── ReleaseError            a global adapter release cannot be built
    └── BrokerError             the MQTT broker cannot be reached or refused us

Foreign errors (sqlite3.Error, OSError, pydantic's ValidationError, fleet's errors) are translated at the
boundary that meets them. The CLI exits with ``exit_code`` of the error it caught.
"""

from __future__ import annotations

from enum import Enum


class CoordinatorError(Exception):
    """Base of the coordinator's errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(CoordinatorError):
    exit_code = 78  # EX_CONFIG


class NotInitialized(CoordinatorError):
    exit_code = 78  # EX_CONFIG


class StoreError(CoordinatorError):
    exit_code = 74  # EX_IOERR


class NotFound(StoreError):
    exit_code = 66  # EX_NOINPUT


class Conflict(StoreError):
    exit_code = 65  # EX_DATAERR


class EnrollmentError(CoordinatorError):
    exit_code = 77  # EX_NOPERM


class RoundError(CoordinatorError):
    exit_code = 65  # EX_DATAERR


class RefusalReason(str, Enum):
    """Why an update was refused. Every refusal is logged with one of these."""

    UNKNOWN_DEVICE = "unknown_device"
    REVOKED_DEVICE = "revoked_device"
    WRONG_ROUND = "wrong_round"
    ROUND_CLOSED = "round_closed"
    LATE = "late"
    REPLAYED = "replayed"
    FORGED = "forged"
    OVERSIZED = "oversized"
    OUT_OF_BOUNDS = "out_of_bounds"
    MALFORMED = "malformed"


class UpdateRejected(CoordinatorError):
    """An update the coordinator refuses. ``reason`` is stable; ``detail`` is for the log."""

    exit_code = 65  # EX_DATAERR

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class AggregationError(CoordinatorError):
    exit_code = 65  # EX_DATAERR


class DeltaMismatch(AggregationError):
    """Updates disagree on tensor names or shapes; ``tensor`` names the first offending one."""

    def __init__(self, tensor: str, message: str) -> None:
        super().__init__(f"{tensor}: {message}")
        self.tensor = tensor


class ReleaseError(CoordinatorError):
    exit_code = 70  # EX_SOFTWARE


class BrokerError(CoordinatorError):
    exit_code = 69  # EX_UNAVAILABLE

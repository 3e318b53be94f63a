"""Small enums shared by the trainer, its config section and the ledger (no heavy imports)."""

from __future__ import annotations

from enum import Enum


class AdapterKind(str, Enum):
    """Which adapter a run trains.

    ``personal``: A and B trained, never leaves the device. ``fleet``: FFA-LoRA, A derived from the
    round's seed and frozen, only B trained; its change is the update the fleet client sends.
    """

    PERSONAL = "personal"
    FLEET = "fleet"


class GradSampleMode(str, Enum):
    """How opacus gets per-example gradient norms.

    ``ghost``: ghost clipping (norms without materializing per-example gradients, two backward
    passes); ``hooks``: per-example gradients from module hooks (memory ~ batch x trainable params).
    """

    GHOST = "ghost"
    HOOKS = "hooks"


class RunStatus(str, Enum):
    """A ledger run's state. The charge is the same in every state: it was paid before training."""

    CHARGED = "charged"
    """Charged, training started or about to; a crash leaves a run in this state."""
    COMPLETED = "completed"
    STOPPED = "stopped"
    """Stopped early (SIGTERM) with a checkpoint; it may be resumed without a new charge."""
    FAILED = "failed"
    REFUSED = "refused"
    """Trained, but the export guard refused the result (the charge stands)."""

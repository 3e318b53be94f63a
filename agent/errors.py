"""The agent's exception tree.

    AgentError                 base of every error the agent raises on purpose; carries an exit code
    ├── ConfigError            the config file is missing, unreadable or invalid (names the key)
    ├── ModelError             the GGUF model is missing, corrupt or does not load
    │   └── AdapterError       a LoRA adapter does not load or does not fit the model
    ├── EngineError            generation failed inside llama.cpp
    │   ├── ContextOverflow    the last message (with the system prompt) does not fit the context window
    │   └── EngineBusy         the engine's request queue is full (or the engine is closed)
    ├── StoreError             the conversation store cannot be opened or written
    ├── ProtocolError          a client sent something the chat protocol does not allow (has a stable code)
    ├── PrivacyError           the privacy ledger refuses or cannot be read
    │   └── BudgetExceeded     a run would spend more than the device's budget
    └── NotRunning             the daemon is not running (agent chat / status)

Foreign errors (sqlite3, OSError, llama.cpp's ValueError) are translated at the boundary that meets them.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of the agent's errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(AgentError):
    exit_code = 78  # EX_CONFIG


class ModelError(AgentError):
    exit_code = 66  # EX_NOINPUT


class AdapterError(ModelError):
    pass


class EngineError(AgentError):
    exit_code = 70  # EX_SOFTWARE


class ContextOverflow(EngineError):
    pass


class EngineBusy(EngineError):
    pass


class StoreError(AgentError):
    exit_code = 74  # EX_IOERR


class ProtocolError(AgentError):
    """A client error on a front door. ``code`` is stable and documented in docs/protocol.md."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PrivacyError(AgentError):
    exit_code = 77  # EX_NOPERM


class BudgetExceeded(PrivacyError):
    pass


class NotRunning(AgentError):
    exit_code = 2

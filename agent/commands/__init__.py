"""The agent's subcommands, one module each.

Each module defines ``HELP`` (one line), ``configure(parser)`` and ``execute(args) -> int``. Modules
import heavy libraries inside ``execute`` only, so that ``agent chat`` starts fast and the chat daemon
never imports torch.
"""

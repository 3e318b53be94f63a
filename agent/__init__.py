"""ppchat device agent: on-device chat, private learning, fleet participation."""

__version__ = "0.1.0"

"""ppchat coordinator: enrollment, rounds, aggregation, signed releases."""

__version__ = "0.1.0"

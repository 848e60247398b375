"""``zoo correlate`` and ``zoo ensemble fit|predict`` (being written)."""

COMMANDS: list = []

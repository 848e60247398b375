"""``zoo finetune``, ``zoo predict`` and ``zoo lr-find`` (being written)."""

COMMANDS: list = []

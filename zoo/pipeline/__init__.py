"""The pipeline: what runs a zoo end to end, above ``finetune`` and ``ensemble``.

Layers, each importing only the ones below it (``tests/test_layers.py`` keeps it so):
``zoo`` core (data listing, run directory, prediction file, folds, CPU budget, progress,
atomic writes, errors) -> ``finetune`` and ``ensemble`` side by side (neither imports the
other) -> ``zoo.pipeline`` -> ``zoo.cli`` (click commands only).

Here: ``zoo run``'s stages over one context (``run``, ``context``), the folder it writes
(``layout``), zoo files (``zoo_file``), an ensemble's members run on images
(``member_inference``), leaderboard and latency (``leaderboard``), the report
(``report_html``) and the demo (``demo``). Nothing here speaks click; torch is imported
only inside the functions that need it, so the command line starts without it.
"""

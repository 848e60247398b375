"""zoo: fine-tune diverse timm backbones and ensemble them.

This is the core layer (data listing, run directory, prediction file, folds, CPU budget,
progress, atomic writes, errors) and the public Python API. Layers, each importing only
the ones below it: ``zoo`` core -> ``finetune`` and ``ensemble`` side by side ->
``zoo.pipeline`` -> ``zoo.cli`` (``tests/test_layers.py`` keeps it so).

Importing ``zoo`` does not import torch: the names below are handed out on first use
(PEP 562 ``__getattr__``, the one place allowed to reach up a layer), so the ensemble
commands, which work on prediction files with numpy and scipy alone, start fast.

    import zoo
    result = zoo.run("data/", "runs/zoo", backbones=["resnet18.a1_in1k", "tf_efficientnet_lite0.in1k"], folds=5)
    result.leaderboard.to_pandas()                 # or pandas.DataFrame(result.leaderboard)
    preds = zoo.predict(result, ["photos/*.jpg"])  # .ids, .classes, .probabilities(), .to_pandas(top_k=2)

``zoo.run``, ``zoo.finetune`` and ``zoo.predict`` are the notebook-shaped API (docs/python.md); the
library functions the commands call are public too.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "run": "zoo.pipeline.api", "finetune": "zoo.pipeline.api", "predict": "zoo.pipeline.api",
    "Predictions": "zoo.predictions", "Leaderboard": "zoo.pipeline.leaderboard", "Tracking": "zoo.tracking",
    "run_zoo": "zoo.pipeline.run", "RunResult": "zoo.pipeline.context", "MemberSpec": "zoo.pipeline.zoo_file",
    "parse_backbones": "zoo.pipeline.zoo_file", "read_zoo_file": "zoo.pipeline.zoo_file", "run_demo": "zoo.pipeline.demo",
    "ensemble_predict": "zoo.pipeline.member_inference", "ensemble_score": "zoo.pipeline.member_inference",
    "FinetuneConfig": "finetune.config", "train_member": "finetune.member", "predict_run": "finetune.inference",
    "fit_ensemble": "ensemble.fit", "read_ensemble": "ensemble.file", "write_ensemble": "ensemble.file",
    "correlate": "ensemble.diversity", "load_predictions": "zoo.predictions",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])

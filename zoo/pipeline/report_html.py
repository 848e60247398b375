"""``OUT/report.html`` of ``zoo run``: one self-contained file that opens from disk.

Every image is a PNG embedded as a ``data:`` URI and the styles are inline: no network, no
script. Plots are drawn with matplotlib's ``Figure`` (the Agg canvas, no pyplot state).
Sections: the leaderboard, the accuracy-vs-latency front, the correlation heatmap, the
weights, reliability diagrams of the best member and the ensemble, the ensemble's confusion
matrix, training curves per member, the hardest holdout images and, beside them for cross-fitted
members, the pool images most suspected of a wrong label (``zoo.pipeline.label_issues``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.metrics import ECE_BINS, expected_calibration_error
from zoo import atomic

HARDEST = 16  # holdout images in the grid
SUSPECTED = 24  # pool images in the grid of suspected label errors


@dataclass
class ReportInputs:
    title: str
    leaderboard: list  # LeaderRow
    select_split: str
    subsets: list  # Subset
    front: list
    pick: Any
    max_latency: float | None
    heatmap: Path
    ensemble: Any  # ensemble.model.Ensemble
    names: list[str]
    runs: list  # RunDir
    select: list  # Predictions, aligned
    holdout: list | None  # Predictions, aligned (labelled), or None
    holdout_split: str | None
    listing: Any  # zoo.data.Dataset as listed
    seconds: float
    trained: list[str]
    skipped: list[str]
    correlation_text: str = ""
    label_issues: Any = None  # zoo.pipeline.label_issues.LabelIssues (cross-fitted members), or None
    timed_out: dict[str, str] = field(default_factory=dict)  # member -> why the time limit left it out or cut it short


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _file_png(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def _img(src: str | None, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">' if src else f"<p><em>{html.escape(alt)}: not available</em></p>"


def _figure(w: float, h: float, n: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _cell(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def leaderboard_html(rows, split: str) -> str:
    head = ["", "kind", "backbone", "params (M)", "ms/img batch 1", "ms/img batch 64", f"{split} acc", f"{split} log loss",
            f"{split} ECE", "holdout acc", "holdout log loss", "holdout ECE", "weight"]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        h = r.holdout or {}
        cells = [r.name, r.kind, r.backbone, r.params / 1e6, r.ms_batch1, r.ms_batch64, r.select.get("accuracy"),
                 r.select.get("log_loss"), r.select.get("ece"), h.get("accuracy"), h.get("log_loss"), h.get("ece"), r.weight]
        cls = ' class="ens"' if r.kind in ("equal weights", "ensemble") else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_cell(c, 2 if i in (3, 4, 5) else 4)}</td>" for i, c in enumerate(cells)) + "</tr>")
    return "\n".join(out + ["</table>"])


def pareto_plot(inputs: ReportInputs) -> str:
    fig, (ax,) = _figure(6.5, 4.2)
    ax.scatter([s.latency_ms for s in inputs.subsets], [s.accuracy for s in inputs.subsets], s=14, color="#9bb", label="subsets")
    front = inputs.front
    ax.plot([s.latency_ms for s in front], [s.accuracy for s in front], "o-", color="#c33", label="Pareto front")
    for s in front:
        ax.annotate("+".join(s.members), (s.latency_ms, s.accuracy), fontsize=7, xytext=(3, -9), textcoords="offset points")
    if inputs.max_latency is not None:
        ax.axvline(inputs.max_latency, color="#555", linestyle="--", label=f"budget {inputs.max_latency:g} ms")
    if inputs.pick is not None:
        ax.scatter([inputs.pick.latency_ms], [inputs.pick.accuracy], s=120, facecolors="none", edgecolors="k", label="picked")
    ax.set_xlabel("ms per image (batch 64, sum over members)")
    ax.set_ylabel(f"{inputs.select_split} accuracy (equal weights)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def weights_plot(ens) -> str:
    members = list(ens.members) + list(ens.dropped)
    fig, (ax,) = _figure(max(4.0, 0.7 * len(members) + 2), 3.0)
    ax.bar([m.name for m in members], [m.weight if m in ens.members else 0.0 for m in members], color="#36a")
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _reliability(ax, probs: np.ndarray, labels: np.ndarray, title: str, bins: int = ECE_BINS) -> None:
    """Accuracy against confidence per equal-width bin; the title's ECE is the leaderboard's
    (``expected_calibration_error``, same bins: (b/n, (b+1)/n])."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    centers, accs = [], []
    for b in range(bins):
        mask = which == b
        if mask.any():
            centers.append(confidence[mask].mean())
            accs.append(correct[mask].mean())
    ece = expected_calibration_error(probs, labels, bins)
    ax.plot([0, 1], [0, 1], "--", color="#999")
    ax.bar(edges[:-1], [0] * bins, width=1 / bins)  # keeps the axis range when a bin is empty
    ax.plot(centers, accs, "o-", color="#c33")
    ax.set_title(f"{title}\nECE {ece:.3f}", fontsize=9)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)


def reliability_plot(inputs: ReportInputs, best: str, where: list) -> tuple[str, np.ndarray]:
    """Reliability diagrams of the best member and the fitted ensemble on ``where`` (the holdout,
    else the selection rows); returns the PNG and the ensemble's probabilities on those rows."""
    labels = where[0].labels
    split = f"holdout ({inputs.holdout_split}/)" if inputs.holdout is not None else inputs.select_split
    fig, axes = _figure(8.0, 3.6, 2)
    _reliability(axes[0], where[inputs.names.index(best)].probabilities(), labels, f"best member: {best}, {split}")
    ens_probs = np.exp(inputs.ensemble.predict_log_proba([where[inputs.names.index(m.name)].log_probabilities()
                                                          for m in inputs.ensemble.members]))
    _reliability(axes[1], ens_probs, labels, f"fitted ensemble, {split}")
    fig.tight_layout()
    return _png(fig), ens_probs


def confusion_plot(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    c = len(classes)
    matrix = np.zeros((c, c), dtype=int)
    np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
    size = max(3.5, 0.45 * c + 2)
    fig, (ax,) = _figure(size, size)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(c), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    return _png(fig)


def _read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if k in ("epoch", "train_loss", "val_loss", "val_accuracy") and v != ""}
                for row in csv.DictReader(f)]


def curves_plot(name: str, run) -> str | None:
    """Train/val loss and val accuracy per epoch; a cross-fit: one line per fold."""
    parts = [(f"fold {i}", r) for i, r in enumerate(run.fold_runs(), start=1)] or [("", run)]
    series = [(label, _read_metrics(r.metrics_csv)) for label, r in parts]
    if not any(rows for _, rows in series):
        return None
    fig, axes = _figure(8.0, 3.0, 2)
    for label, rows in series:
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r.get("train_loss", np.nan) for r in rows], "--", label=f"{label} train".strip())
        axes[0].plot(epochs, [r.get("val_loss", np.nan) for r in rows], "-", label=f"{label} val".strip())
        axes[1].plot(epochs, [r.get("val_accuracy", np.nan) for r in rows], "o-", label=label or "val")
    axes[0].set_title(f"{name}: loss", fontsize=9)
    axes[1].set_title(f"{name}: validation accuracy", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def thumbnail_figure(cells: list[tuple[Path | None, str, str]], cols: int = 4, size: float = 2.2):
    """A grid of image thumbnails, each ``(path, title, title colour)``; an unreadable image says so."""
    from matplotlib.figure import Figure
    from PIL import Image

    rows = max(1, -(-len(cells) // cols))
    fig = Figure(figsize=(size * cols, (size + 0.3) * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (path, title, color) in zip(axes, cells):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((128, 128))
                ax.imshow(np.asarray(im))
        except (OSError, TypeError, ValueError):
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ax.set_title(title, fontsize=7, color=color)
    fig.tight_layout()
    return fig


def _paths(listing) -> dict[str, Path]:
    return {s.id: s.path for split in listing.splits.values() for s in split}


def hardest_plot(probs: np.ndarray, preds, listing, n: int = HARDEST) -> str | None:
    """The holdout images the ensemble gives the lowest probability of their true class."""
    labels, classes, paths = preds.labels, preds.classes, _paths(listing)
    true_p = probs[np.arange(len(labels)), labels]
    cells = []
    for i in np.argsort(true_p, kind="stable")[:n]:
        guess = int(probs[i].argmax())
        cells.append((paths.get(preds.ids[i]), f"true {classes[labels[i]]} (p {true_p[i]:.2f})\npred {classes[guess]} "
                      f"(p {probs[i, guess]:.2f})", "#c33" if guess != labels[i] else "#333"))
    return _png(thumbnail_figure(cells))


def label_issues_figure(issues, listing, n: int = SUSPECTED, cols: int = 6, size: float = 2.2):
    """The ``n`` most suspect pool images (``zoo.pipeline.label_issues.LabelIssues``): given vs suggested label,
    the probability of the given one; red where cleanlab flags the image, grey where it only ranks high."""
    paths, classes = _paths(listing), issues.classes
    cells = [(paths.get(issues.ids[i]), f"given {classes[issues.given[i]]} (p {issues.self_confidence[i]:.2f})\n"
              f"suggested {classes[issues.suggested[i]]}" + ("" if issues.flagged[i] else ", not flagged"),
              "#c33" if issues.flagged[i] else "#777") for i in range(min(n, len(issues.ids)))]
    return thumbnail_figure(cells, cols, size)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child,td:nth-child(2),td:nth-child(3),th:nth-child(2),th:nth-child(3){text-align:left}tr.ens{background:#eef4ff;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}.pair{display:flex;flex-wrap:wrap;gap:1.5em}.pair>div{flex:1 1 480px;min-width:0}
"""


def write_report(path: Path, inputs: ReportInputs) -> Path:
    """Write the report; returns its path."""
    members = [r for r in inputs.leaderboard if r.kind in ("member", "dropped member")]
    best = min(members, key=lambda r: (r.select.get("log_loss", np.inf), -r.select.get("accuracy", 0))).name
    where = inputs.holdout if inputs.holdout is not None else inputs.select
    reliability, ens_probs = reliability_plot(inputs, best, where)
    split_words = f"the holdout ({inputs.holdout_split}/, {len(where[0].ids)} images)" if inputs.holdout is not None \
        else f"the {inputs.select_split} rows (no labelled holdout)"
    e = html.escape
    sections = [
        f"<h1>{e(inputs.title)}</h1>",
        f"<p class=note>{len(inputs.names)} members; this call trained {len(inputs.trained)} "
        f"({e(', '.join(inputs.trained) or 'none')}) and skipped {len(inputs.skipped)} finished earlier; "
        f"{inputs.seconds:.0f} s. Selection rows: {e(inputs.select_split)} (what weights and subsets are chosen on); "
        f"holdout: {e(inputs.holdout_split + '/') if inputs.holdout is not None else 'none'} (never trained or chosen on).</p>",
        *(["<p class=note><b>Time limit</b>: " + "; ".join(f"{e(name)}: {e(why)}" for name, why in inputs.timed_out.items())
           + ".</p>"] if inputs.timed_out else []),
        "<h2>Leaderboard</h2>", leaderboard_html(inputs.leaderboard, inputs.select_split),
        f"<p class=note>Latency: this device, milliseconds per image of one model's forward pass on random input; "
        f"ensembles sum their members. The fitted ensemble's {e(inputs.select_split)} scores are cross-validated.</p>",
        "<h2>Accuracy vs latency: member subsets</h2>", _img(pareto_plot(inputs), "Pareto front of member subsets"),
        "<table><tr><th>subset (equal weights)</th><th>ms/img b64</th><th>params (M)</th>"
        f"<th>{e(inputs.select_split)} acc</th><th>{e(inputs.select_split)} log loss</th><th>holdout acc</th></tr>"
        + "".join(f"<tr><td>{e(' + '.join(s.members))}{' (picked)' if inputs.pick is not None and s == inputs.pick else ''}</td>"
                  f"<td>{s.latency_ms:.2f}</td><td>{s.params / 1e6:.2f}</td><td>{s.accuracy:.4f}</td><td>{s.log_loss:.4f}</td>"
                  f"<td>{_cell(s.holdout_accuracy)}</td></tr>" for s in inputs.front) + "</table>",
        "<h2>Correlation of the members' predictions</h2>", _img(_file_png(inputs.heatmap), "correlation heatmap"),
        f"<pre>{e(inputs.correlation_text)}</pre>",
        "<h2>Ensemble weights</h2>", _img(weights_plot(inputs.ensemble), "ensemble weights"),
        f"<h2>Reliability on {e(split_words)}</h2>", _img(reliability, "reliability diagrams"),
        "<h2>Confusion matrix of the fitted ensemble</h2>",
        _img(confusion_plot(ens_probs, where[0].labels, where[0].classes), "confusion matrix"),
        "<h2>Training curves</h2>",
    ]
    for name, run in zip(inputs.names, inputs.runs):
        sections += [f"<h3>{e(name)}</h3>", _img(curves_plot(name, run), f"{name} training curves")]
    grids = []
    if inputs.holdout is not None:
        grids.append(f"<h2>Hardest images of {e(split_words)}</h2>"
                     "<p class=note>Lowest probability of the true class under the fitted ensemble.</p>"
                     + _img(hardest_plot(ens_probs, where[0], inputs.listing), "hardest holdout images"))
    if inputs.label_issues is not None:
        issues = inputs.label_issues
        grids.append(f"<h2>Suspected label errors among the {len(issues.ids)} training images</h2>"
                     f"<p class=note>{e(issues.summary())}. The {min(SUSPECTED, len(issues.ids))} most suspect (lowest "
                     "label quality), red where flagged: given vs suggested label. Review them, then train without "
                     "those you agree with: <code>zoo finetune --exclude label_issues.csv</code>.</p>"
                     + _img(_png(label_issues_figure(issues, inputs.listing)), "suspected label errors"))
    if grids:
        sections.append("<div class=pair>" + "".join(f"<div>{g}</div>" for g in grids) + "</div>")
    text = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{e(inputs.title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    return atomic.write_text(path, text)

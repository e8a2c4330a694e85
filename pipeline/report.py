"""Metrics and report files from a head's probabilities: for people (text, PNG) and machines (JSON).

Unlabeled images are scored and listed with class "unknown" but never counted in metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix,
                             precision_recall_fscore_support, top_k_accuracy_score)

UNKNOWN = "unknown"
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_NAME_WIDTH = 18


def write_report(out_dir: Path, *, labels: Sequence[str], images: Sequence[str], true_labels: Sequence[str | None],
                 probabilities: np.ndarray, split: str, context: Mapping | None = None,
                 threshold: float | None = None) -> dict:
    """Write metrics.json, confusion_matrix.txt/.png and predictions.jsonl; return the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = list(labels)
    metrics = compute_metrics(labels, true_labels, probabilities, threshold=threshold)
    metrics.update(split=split, context=dict(context or {}))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    write_predictions(out_dir / "predictions.jsonl", labels, images, true_labels, probabilities)
    if metrics["n_labeled"]:
        matrix = np.array(metrics["confusion_matrix"])
        (out_dir / "confusion_matrix.txt").write_text(
            confusion_text(labels, matrix) + "\n" + metrics["classification_report"], encoding="utf-8")
        plot_confusion(out_dir / "confusion_matrix.png", labels, matrix,
                       title=f"{split}: accuracy {metrics['accuracy']:.3f} on {metrics['n_labeled']} images")
    return metrics


def compute_metrics(labels: list[str], true_labels: Sequence[str | None], probabilities: np.ndarray, *,
                    threshold: float | None = None) -> dict:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({t for t in true_labels if t is not None and t not in index})
    if unknown:
        raise ValueError(f"true label {unknown[0]!r} is not one of the head's classes {labels}")
    labeled = np.array([t is not None for t in true_labels], dtype=bool)
    metrics: dict = {"n_labeled": int(labeled.sum()), "n_unlabeled": int((~labeled).sum()), "labels": labels}
    if not labeled.any():
        return metrics
    y = np.array([index[t] for t in true_labels if t is not None])
    proba = probabilities[labeled]
    predicted = proba.argmax(1)
    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=classes, zero_division=0)
    metrics.update(
        accuracy=float(accuracy_score(y, predicted)),
        balanced_accuracy=float(balanced_accuracy_score(y, predicted)),
        per_class={label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                   for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
        confusion_matrix=confusion_matrix(y, predicted, labels=classes).tolist(),
        classification_report=classification_report(y, predicted, labels=classes, target_names=labels,
                                                     zero_division=0, digits=3),
        threshold_curve=[_at_threshold(y, proba, t) for t in THRESHOLDS],
    )
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, predicted, labels=classes, average=average, zero_division=0)
        metrics[f"{average}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    if len(labels) > 5:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(y, proba, k=5, labels=classes))
    if threshold is not None:
        metrics["threshold"] = _at_threshold(y, proba, threshold)
    return metrics


def _at_threshold(y: np.ndarray, proba: np.ndarray, threshold: float) -> dict:
    """Coverage (share not turned into "unknown") and accuracy on what is covered."""
    covered = proba.max(1) >= threshold
    accuracy = float((proba[covered].argmax(1) == y[covered]).mean()) if covered.any() else None
    return {"threshold": threshold, "coverage": float(covered.mean()), "accuracy": accuracy}


def write_predictions(path: Path, labels: list[str], images: Sequence[str], true_labels: Sequence[str | None],
                      probabilities: np.ndarray) -> None:
    """One JSON object per image, as in the CNTK tutorial, probabilities highest first."""
    with open(path, "w", encoding="utf-8") as out:
        for image, truth, row in zip(images, true_labels, probabilities):
            order = np.argsort(-row, kind="stable")
            out.write(json.dumps({"image": image, "class": truth if truth is not None else UNKNOWN,
                                  "predicted": labels[order[0]],
                                  "predictions": {labels[i]: round(float(row[i]), 6) for i in order}}) + "\n")


def confusion_text(labels: list[str], matrix: np.ndarray) -> str:
    """Counts, then row-normalised percentages: rows are true classes, columns predictions."""
    names = [_short(label) for label in labels]
    width = max(6, max(map(len, names)) + 1)
    rows_pct = 100 * matrix / np.maximum(matrix.sum(1, keepdims=True), 1)

    corner = "true \\ pred"
    first = max(len(corner), width)

    def table(title, values, fmt):
        header = f"{corner:>{first}}" + "".join(f"{name:>{width}}" for name in names)
        body = [f"{name:>{first}}" + "".join(f"{fmt(v):>{width}}" for v in row) for name, row in zip(names, values)]
        return "\n".join([title, header, *body])

    return (table("Confusion matrix (counts)", matrix, str) + "\n\n"
            + table("Confusion matrix (% of each true class)", rows_pct, lambda v: f"{v:.1f}") + "\n")


def _short(label: str) -> str:
    return label if len(label) <= _NAME_WIDTH else label[:_NAME_WIDTH - 1] + "…"


def plot_confusion(path: Path, labels: list[str], matrix: np.ndarray, *, title: str) -> None:
    """Counts and row-normalised heatmaps side by side, sized to stay readable at 100+ classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(labels)
    side = min(4 + 0.28 * n, 60)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2, side + 1.5), layout="constrained")
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    names = [_short(label) for label in labels]
    for ax, values, subtitle, fmt in ((axes[0], matrix, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        display = ConfusionMatrixDisplay(values, display_labels=names)
        display.plot(ax=ax, include_values=n <= 30, values_format=fmt, cmap="Blues", colorbar=True,
                     xticks_rotation="vertical")
        ax.set_title(subtitle)
        if n > 30:
            ax.tick_params(labelsize=max(4, 10 - n // 30))
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    if not metrics["n_labeled"]:
        return f"{metrics['split']}: {metrics['n_unlabeled']} unlabeled images scored (no labels, no metrics)"
    lines = [f"{metrics['split']} split: {metrics['n_labeled']} labeled images"
             + (f" (+{metrics['n_unlabeled']} unlabeled)" if metrics["n_unlabeled"] else ""),
             f"accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}"
             + (f"   top-5 {metrics['top5_accuracy']:.4f}" if "top5_accuracy" in metrics else ""),
             "", metrics["classification_report"].rstrip()]
    return "\n".join(lines)

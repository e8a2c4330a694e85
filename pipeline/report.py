"""Metrics and report files from a head's probabilities: for people (text, PNG) and machines (JSON).

Unlabeled images are scored and listed with class "unknown" but never counted in metrics.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (ConfusionMatrixDisplay, accuracy_score, balanced_accuracy_score, classification_report,
                             confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score)

from . import stages

UNKNOWN = "unknown"
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_NAME_WIDTH = 18  # class names longer than this are cut in the text table and on the figure's axes
_MAX_ANNOTATED = 30  # beyond this many classes, numbers in the heatmap cells would be unreadable


def write_report(out_dir: Path, *, labels: Sequence[str], images: Sequence[str], true_labels: Sequence[str | None],
                 probabilities: np.ndarray, split: str, context: Mapping | None = None,
                 threshold: float | None = None) -> dict:
    """Write metrics.json, predictions.jsonl and (with labels) confusion_matrix.txt/.png; return the metrics.

    With `threshold`, predictions whose top probability is below it become "unknown" in
    predictions.jsonl and the metrics gain coverage and accuracy on the covered rows; the
    other metrics always describe the plain arg-max prediction.
    """
    labels = list(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(images), len(labels)) or len(true_labels) != len(images):
        raise ValueError(f"expected one probability row per image and one column per label, got shape "
                         f"{probabilities.shape} for {len(images)} images, {len(true_labels)} true labels "
                         f"and {len(labels)} labels")
    metrics = compute_metrics(labels, true_labels, probabilities, threshold=threshold)
    # a JSON round trip keeps the returned dict identical to metrics.json whatever the caller put in context
    metrics.update(split=split, context=json.loads(json.dumps(dict(context or {}), default=_plain)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _write_predictions(out_dir / "predictions.jsonl", labels, images, true_labels, probabilities, threshold)
    if metrics["n_labeled"]:
        matrix = np.array(metrics["confusion_matrix"])
        (out_dir / "confusion_matrix.txt").write_text(
            _confusion_text(labels, matrix) + "\n" + metrics["classification_report"], encoding="utf-8")
        _plot_confusion(out_dir / "confusion_matrix.png", labels, matrix,
                        title=f"{split}: accuracy {metrics['accuracy']:.3f} on {metrics['n_labeled']} labeled images")
    return metrics


def compute_metrics(labels: list[str], true_labels: Sequence[str | None], probabilities: np.ndarray, *,
                    threshold: float | None = None) -> dict:
    """The metrics over labeled rows as plain JSON types; usable without writing any file."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({t for t in true_labels if t is not None and t not in index})
    if unknown:
        raise ValueError(f"true label {unknown[0]!r} is not one of the head's {len(labels)} classes "
                         f"({len(unknown)} such label(s) in all); was the head trained on another label set?")
    labeled = np.array([t is not None for t in true_labels], dtype=bool)
    metrics: dict = {"n_labeled": int(labeled.sum()), "n_unlabeled": int((~labeled).sum()), "labels": labels}
    if not labeled.any():
        return metrics
    y = np.array([index[t] for t in true_labels if t is not None])
    proba = probabilities[labeled]
    predicted = proba.argmax(1)
    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=classes, zero_division=0)
    with warnings.catch_warnings():
        # predicting a class absent from this split is normal; balanced accuracy averages over the true classes
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(y, predicted)
    metrics.update(
        accuracy=float(accuracy_score(y, predicted)),
        balanced_accuracy=float(balanced),
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
    """Coverage (share not turned into "unknown") and accuracy on what is covered (None if nothing is)."""
    covered = proba.max(1) >= threshold
    accuracy = float((proba[covered].argmax(1) == y[covered]).mean()) if covered.any() else None
    return {"threshold": float(threshold), "coverage": float(covered.mean()), "accuracy": accuracy}


def _plain(value):
    """JSON fallback for context values: numpy scalars and arrays as numbers, anything else (Path…) as text."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)


def _write_predictions(path: Path, labels: list[str], images: Sequence[str], true_labels: Sequence[str | None],
                       probabilities: np.ndarray, threshold: float | None) -> None:
    """One JSON object per image, as in the CNTK tutorial, probabilities highest first."""
    with open(path, "w", encoding="utf-8") as out:
        for image, truth, row in zip(images, true_labels, probabilities):
            order = np.argsort(-row, kind="stable")
            abstained = threshold is not None and row[order[0]] < threshold
            out.write(json.dumps({"image": image, "class": UNKNOWN if truth is None else truth,
                                  "predicted": UNKNOWN if abstained else labels[order[0]],
                                  "predictions": {labels[i]: round(float(row[i]), 6) for i in order}}) + "\n")


def _row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each true class's row as fractions; classes absent from the split stay all zero."""
    return matrix / np.maximum(matrix.sum(1, keepdims=True), 1)


def _short(label: str) -> str:
    """Cut long names so one of them cannot widen every table column and tick label."""
    return label if len(label) <= _NAME_WIDTH else label[:_NAME_WIDTH - 1] + "…"


def _confusion_text(labels: list[str], matrix: np.ndarray) -> str:
    """Counts, then row-normalised percentages: rows are true classes, columns predictions."""
    names = [_short(label) for label in labels]
    width = max(6, max(map(len, names)) + 1)
    corner = "true \\ pred"
    first = max(len(corner), width)

    def table(title, values, fmt):
        header = f"{corner:>{first}}" + "".join(f"{name:>{width}}" for name in names)
        body = [f"{name:>{first}}" + "".join(f"{fmt(v):>{width}}" for v in row) for name, row in zip(names, values)]
        return "\n".join([title, header, *body])

    return (table("Confusion matrix (counts)", matrix, str) + "\n\n"
            + table("Confusion matrix (% of each true class)", 100 * _row_normalised(matrix), lambda v: f"{v:.1f}")
            + "\n")


def _plot_confusion(path: Path, labels: list[str], matrix: np.ndarray, *, title: str) -> None:
    """Counts and row-normalised heatmaps side by side, sized to stay readable at 100+ classes.

    A bare Figure renders with Agg without touching pyplot's global backend or figure list.
    """
    n = len(labels)
    side = min(4 + 0.22 * n, 60)  # inches per panel; the cap keeps 1000 classes a PNG that viewers open
    fontsize = float(np.clip(0.6 * 72 * side / n, 3, 10))  # points, at most 60% of a cell
    fig = Figure(figsize=(2 * side + 4, side + 1), layout="constrained")
    names = [_short(label) for label in labels]
    panels = ((matrix, "counts", "d"), (100 * _row_normalised(matrix), "% of each true class", ".0f"))
    for ax, (values, subtitle, fmt) in zip(fig.subplots(1, 2), panels):
        ConfusionMatrixDisplay(values, display_labels=names).plot(
            ax=ax, include_values=n <= _MAX_ANNOTATED, values_format=fmt, cmap="Blues", xticks_rotation="vertical",
            text_kw={"fontsize": fontsize})
        ax.tick_params(labelsize=fontsize)
        ax.set_title(subtitle)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def format_summary(metrics: dict) -> str:
    """A few lines for the terminal; file paths are the caller's to print."""
    if not metrics["n_labeled"]:
        return f"{metrics['split']}: {metrics['n_unlabeled']} unlabeled images scored (no labels, no metrics)"
    lines = [f"{metrics['split']} split: {metrics['n_labeled']} labeled images"
             + (f" (+{metrics['n_unlabeled']} unlabeled, not in metrics)" if metrics["n_unlabeled"] else ""),
             f"accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}"
             + (f"   top-5 {metrics['top5_accuracy']:.4f}" if "top5_accuracy" in metrics else "")]
    if "threshold" in metrics:
        point = metrics["threshold"]
        covered = "n/a" if point["accuracy"] is None else f"{point['accuracy']:.4f}"
        lines.append(f"threshold {point['threshold']}: coverage {point['coverage']:.1%}, accuracy on covered {covered}")
    if "data_issues" in metrics.get("context", {}):
        lines.append(metrics["context"]["data_issues"]["summary"])
    return "\n".join([*lines, "", metrics["classification_report"].rstrip()])


stages.callable_module(__name__, "pipeline.evaluate:report")  # `from pipeline import report; report(run)`

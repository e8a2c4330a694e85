"""Report contract: metrics computed right, unlabeled images kept out of them, files for people and machines."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.report import format_summary, write_report

LABELS = ["ant", "bee", "wasp"]
# six labeled images: truths a a b b w w; predictions a b b b w a; plus one unlabeled
PROBA = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3], [.2, .3, .5]])
TRUTH = ["ant", "ant", "bee", "bee", "wasp", "wasp", None]
IMAGES = [f"img{i}.jpg" for i in range(7)]


def _report(tmp_path, **kwargs):
    return write_report(tmp_path, labels=LABELS, images=IMAGES, true_labels=TRUTH, probabilities=PROBA,
                        split="test", context={"head": "logreg"}, **kwargs)


def test_hand_computed_metrics(tmp_path):
    metrics = _report(tmp_path)
    assert metrics["n_labeled"] == 6 and metrics["n_unlabeled"] == 1
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["per_class"]["bee"] == {"precision": pytest.approx(2 / 3), "recall": 1.0,
                                           "f1": pytest.approx(0.8), "support": 2}
    assert "top5_accuracy" not in metrics  # only with more than five classes
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["context"] == {"head": "logreg"} and metrics["split"] == "test"


def test_predictions_jsonl_sorted_and_unlabeled_marked_unknown(tmp_path):
    _report(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == IMAGES
    assert lines[1] == {"image": "img1.jpg", "class": "ant", "predicted": "bee",
                        "predictions": {"bee": 0.6, "ant": 0.3, "wasp": 0.1}}
    assert list(lines[1]["predictions"]) == ["bee", "ant", "wasp"]
    assert lines[6]["class"] == "unknown" and lines[6]["predicted"] == "wasp"


def test_text_table_and_png(tmp_path):
    _report(tmp_path)
    text = (tmp_path / "confusion_matrix.txt").read_text()
    assert all(label in text for label in LABELS)
    assert "     1     1     0" in text and "% of each true class" in text and "50.0" in text
    with Image.open(tmp_path / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.width > 500
    summary = format_summary(json.loads((tmp_path / "metrics.json").read_text()))
    assert "accuracy 0.6667" in summary and "wasp" in summary


def test_threshold_trades_coverage_for_accuracy(tmp_path):
    metrics = _report(tmp_path, threshold=0.65)
    # top probabilities of labeled rows: .8 .6 .8 .7 .8 .5 -> 4 covered, all correct
    assert metrics["threshold"] == {"threshold": 0.65, "coverage": pytest.approx(4 / 6), "accuracy": 1.0}
    curve = {point["threshold"]: point for point in metrics["threshold_curve"]}
    assert curve[0.0]["coverage"] == 1.0 and curve[0.0]["accuracy"] == pytest.approx(4 / 6)
    assert curve[0.99]["coverage"] == 0.0 and curve[0.99]["accuracy"] is None


def test_top5_with_many_classes_and_a_readable_png_at_120_classes(tmp_path):
    rng = np.random.default_rng(0)
    labels = [f"class_{i:03d}_with_a_rather_long_name" for i in range(120)]
    truth_idx = rng.integers(0, 120, 600)
    proba = rng.dirichlet(np.ones(120), 600)
    proba[np.arange(600), truth_idx] += 0.02 * rng.random(600)
    proba /= proba.sum(1, keepdims=True)
    metrics = write_report(tmp_path, labels=labels, images=[str(i) for i in range(600)],
                           true_labels=[labels[i] for i in truth_idx], probabilities=proba, split="val")
    ranks = (proba > proba[np.arange(600), truth_idx][:, None]).sum(1)
    assert metrics["top5_accuracy"] == pytest.approx((ranks < 5).mean())
    with Image.open(tmp_path / "confusion_matrix.png") as png:
        assert png.width > 3000


def test_unknown_true_label_and_no_labels(tmp_path):
    with pytest.raises(ValueError, match="'hornet'"):
        write_report(tmp_path, labels=LABELS, images=["x"], true_labels=["hornet"], probabilities=PROBA[:1],
                     split="test")
    metrics = write_report(tmp_path / "u", labels=LABELS, images=["x"], true_labels=[None],
                           probabilities=PROBA[:1], split="test")
    assert metrics["n_labeled"] == 0 and (tmp_path / "u" / "predictions.jsonl").is_file()
    assert "unlabeled" in format_summary(metrics)

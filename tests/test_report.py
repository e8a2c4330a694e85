"""Report contract: metrics computed right, unlabeled images kept out of them, files for people and machines."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.report import UNKNOWN, format_summary, write_report

LABELS = ["ant", "bee", "wasp"]
# six labeled images: truths a a b b w w; predictions a b b b w a; plus one unlabeled
PROBA = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3], [.2, .3, .5]])
TRUTH = ["ant", "ant", "bee", "bee", "wasp", "wasp", None]
IMAGES = [f"img{i}.jpg" for i in range(7)]


def _report(out_dir, **kwargs):
    return write_report(out_dir, labels=LABELS, images=IMAGES, true_labels=TRUTH, probabilities=PROBA,
                        split="test", context={"head": "logreg"}, **kwargs)


def _plain_types_only(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_plain_types_only, value))
    return value is None or type(value) in (str, int, float, bool)


def test_hand_computed_metrics(tmp_path):
    metrics = _report(tmp_path)
    assert metrics["n_labeled"] == 6 and metrics["n_unlabeled"] == 1
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # ant: P 1/2 R 1/2; bee: P 2/3 R 1; wasp: P 1 R 1/2
    assert metrics["per_class"] == {
        "ant": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "bee": {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2},
        "wasp": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}}
    assert metrics["macro_avg"] == {"precision": pytest.approx(13 / 18), "recall": pytest.approx(2 / 3),
                                    "f1": pytest.approx((0.5 + 0.8 + 2 / 3) / 3)}
    assert "top5_accuracy" not in metrics  # only with more than five classes
    assert metrics["context"] == {"head": "logreg"} and metrics["split"] == "test"


def test_metrics_json_is_plain_and_equal_to_the_returned_dict(tmp_path):
    context = {"backbone": "mobilenet", "params": {"C": np.float32(0.5), "sizes": np.array([3, 4])},
               "cache": Path("/tmp/c.h5")}
    metrics = write_report(tmp_path, labels=LABELS, images=IMAGES, true_labels=TRUTH, probabilities=PROBA,
                           split="val", context=context, threshold=0.5)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored == metrics and _plain_types_only(stored)
    assert stored["context"] == {"backbone": "mobilenet", "params": {"C": 0.5, "sizes": [3, 4]},
                                 "cache": "/tmp/c.h5"}


def test_unlabeled_rows_do_not_change_metrics(tmp_path):
    with_unlabeled = _report(tmp_path / "a")
    labeled_only = write_report(tmp_path / "b", labels=LABELS, images=IMAGES[:6], true_labels=TRUTH[:6],
                                probabilities=PROBA[:6], split="test", context={"head": "logreg"})
    assert labeled_only.pop("n_unlabeled") == 0 and with_unlabeled.pop("n_unlabeled") == 1
    assert with_unlabeled == labeled_only


def test_predictions_jsonl_sorted_and_unlabeled_marked_unknown(tmp_path):
    _report(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == IMAGES
    assert lines[1] == {"image": "img1.jpg", "class": "ant", "predicted": "bee",
                        "predictions": {"bee": 0.6, "ant": 0.3, "wasp": 0.1}}
    assert all(list(line["predictions"].values()) == sorted(line["predictions"].values(), reverse=True)
               for line in lines)
    assert lines[6]["class"] == UNKNOWN == "unknown" and lines[6]["predicted"] == "wasp"


def test_text_table_png_and_summary(tmp_path):
    _report(tmp_path)
    text = (tmp_path / "confusion_matrix.txt").read_text(encoding="utf-8")
    assert all(label in text for label in LABELS)
    counts = text.split("\n\n")[0].splitlines()
    assert counts[2:] == [f"{'ant':>11}     1     1     0", f"{'bee':>11}     0     2     0",
                          f"{'wasp':>11}     1     0     1"]
    assert "% of each true class" in text and " 50.0" in text and "100.0" in text
    assert "precision" in text and "weighted avg" in text  # sklearn's classification report
    with Image.open(tmp_path / "confusion_matrix.png") as png:
        png.load()
        assert png.format == "PNG" and png.width > 500 and png.height > 0
    summary = format_summary(json.loads((tmp_path / "metrics.json").read_text()))
    assert "6 labeled" in summary and "accuracy 0.6667" in summary and "balanced accuracy 0.6667" in summary
    assert "top-5" not in summary and all(label in summary for label in LABELS)


def test_threshold_trades_coverage_for_accuracy(tmp_path):
    metrics = _report(tmp_path, threshold=0.65)
    # top probabilities of labeled rows: .8 .6 .8 .7 .8 .5 -> 4 covered, all correct
    assert metrics["threshold"] == {"threshold": 0.65, "coverage": pytest.approx(4 / 6), "accuracy": 1.0}
    assert metrics["accuracy"] == pytest.approx(4 / 6)  # the plain metrics still score every labeled row
    curve = {point["threshold"]: point for point in metrics["threshold_curve"]}
    assert list(curve) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    assert curve[0.0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": pytest.approx(4 / 6)}
    assert curve[0.6] == {"threshold": 0.6, "coverage": pytest.approx(5 / 6), "accuracy": pytest.approx(4 / 5)}
    assert curve[0.99] == {"threshold": 0.99, "coverage": 0.0, "accuracy": None}
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["predicted"] for line in lines] == ["ant", UNKNOWN, "bee", "bee", "wasp", UNKNOWN, UNKNOWN]
    assert "coverage 66.7%" in format_summary(metrics)


def test_top5_on_a_constructed_case(tmp_path):
    labels = [f"c{i}" for i in range(7)]
    ranks = [0, 4, 5, 6]  # where the true class sits in each row's ranking: the first two are in the top 5
    scores = np.linspace(0.25, 0.05, 7)  # c0 best, c6 worst, in every row
    proba = np.tile(scores / scores.sum(), (4, 1))
    metrics = write_report(tmp_path, labels=labels, images=list("abcd"), true_labels=[f"c{r}" for r in ranks],
                           probabilities=proba, split="val")
    assert metrics["top5_accuracy"] == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(0.25)
    assert "top-5 0.5000" in format_summary(metrics)


def test_120_classes_make_a_large_readable_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = [f"class_{i:03d}_with_a_rather_long_name" for i in range(120)]
    truth_idx = rng.integers(0, 120, 600)
    proba = rng.dirichlet(np.ones(120), 600)
    metrics = write_report(tmp_path, labels=labels, images=[str(i) for i in range(600)],
                           true_labels=[labels[i] for i in truth_idx], probabilities=proba, split="val")
    ranks = (proba > proba[np.arange(600), truth_idx][:, None]).sum(1)
    assert metrics["top5_accuracy"] == pytest.approx((ranks < 5).mean())
    assert np.array(metrics["confusion_matrix"]).shape == (120, 120)
    with Image.open(tmp_path / "confusion_matrix.png") as png:
        png.load()
        assert png.width > 3000  # grown with the classes, not squeezed into a default-size figure
    assert "class_000_with_a_…" in (tmp_path / "confusion_matrix.txt").read_text(encoding="utf-8")


def test_bad_inputs_are_clear_errors_and_no_labels_is_not(tmp_path):
    with pytest.raises(ValueError, match="'hornet'"):
        write_report(tmp_path, labels=LABELS, images=["x"], true_labels=["hornet"], probabilities=PROBA[:1],
                     split="test")
    with pytest.raises(ValueError, match="shape"):
        write_report(tmp_path, labels=LABELS, images=IMAGES[:6], true_labels=TRUTH[:6], probabilities=PROBA,
                     split="test")
    metrics = write_report(tmp_path / "u", labels=LABELS, images=["x"], true_labels=[None],
                           probabilities=PROBA[:1], split="test")
    assert metrics["n_labeled"] == 0 and metrics["n_unlabeled"] == 1
    assert json.loads((tmp_path / "u" / "predictions.jsonl").read_text())["class"] == "unknown"
    assert json.loads((tmp_path / "u" / "metrics.json").read_text()) == metrics
    assert not (tmp_path / "u" / "confusion_matrix.png").exists()
    assert "unlabeled" in format_summary(metrics)

"""The HTML report: self-contained, escaped, and correct in a real browser (headless Chromium)."""

import json
import re
import shutil

import numpy as np
import pytest

from chromium import Page
from conftest import write_image
from pipeline.cli import main
from pipeline.config import Config
from pipeline.html_report import COUNTS_IN_CELLS_UP_TO, MAX_CONFIDENT, write_html_report
from pipeline.report import write_report
from pipeline.runs import Run, RunInfo, Sample

HOSTILE = "<img src=x onerror=alert(1)> & \"quotes\""  # a legal folder name that is also markup


@pytest.fixture(scope="module")
def pipeline_report(tmp_path_factory):
    """extract, train (dense head) and report through the CLI on three classes, one with a hostile
    name, and one file copied under a second label."""
    tmp = tmp_path_factory.mktemp("html")
    root = tmp / "pets"
    for c, name in enumerate(["cat", "dog", HOSTILE]):
        for i in range(10):
            write_image(root / name / f"{c}_{i}.png", seed=100 * c + i)
    shutil.copy(root / "cat" / "0_0.png", root / "dog" / "also_a_cat.png")
    args = [f"--set=data.root='{root}'", f"--set=cache.dir='{tmp / 'cache'}'", f"--set=run.dir='{tmp / 'runs'}'",
            "--set=backbone.name=mobilenet", "--set=backbone.alpha=0.25", "--set=backbone.weights=random",
            "--set=data.val_percent=25", "--set=data.test_percent=25", "--set=head.kind=dense",
            "--set=head.dense.epochs=15"]
    for stage in ("extract", "train", "report"):
        assert main([stage, *args, *(["--no-progress"] if stage == "extract" else [])]) == 0
    (report,) = (tmp / "runs" / "pets").glob("*/report/report.html")
    return report


def _check_loads_cleanly(page: Page, n_classes: int) -> None:
    """No console errors, every embedded image decodes, nothing fetched, one matrix row per class."""
    assert page.problems() == []
    sizes = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 15)])")
    assert sizes and all(complete and width > 0 and src.startswith("data:image/") for complete, width, src in sizes)
    assert all(url.startswith(("file:", "data:")) for url in page.requested_urls())
    assert page.evaluate("document.querySelectorAll('#confusion tbody tr').length") == n_classes


def test_pipeline_report_in_chromium(pipeline_report):
    metrics = json.loads((pipeline_report.parent / "metrics.json").read_text())
    with Page() as page:
        page.open(pipeline_report)
        _check_loads_cleanly(page, n_classes=3)
        # the hostile name is text everywhere, never an element or a script
        row_names = page.evaluate("Array.from(document.querySelectorAll('#confusion th.row')).map(t => t.textContent)")
        assert row_names == sorted(["cat", "dog", HOSTILE])
        assert page.evaluate("document.querySelectorAll('th img, td img, li img').length") == 0
        text = page.evaluate("document.body.innerText")
        assert f"{metrics['accuracy']:.1%}" in text and "balanced accuracy" in text
        assert "mobilenet α=0.25 (random)" in text and "dense" in text and "best_epoch=" in text
        took = r"(\d+\.\d s|\d+ min \d\d s)"  # a busy machine can take minutes
        assert re.search(rf"extract {took} · train {took} · report {took}", text)
        # the file copied under a second label is flagged with both labels
        conflict = page.evaluate("document.getElementById('conflicts').innerText")
        assert "cat/0_0.png" in conflict and "dog/also_a_cat.png" in conflict
        # dense head: loss and accuracy charts, training and validation each
        assert page.evaluate("document.querySelectorAll('svg.chart polyline').length") == 4
        mistakes = metrics["n_labeled"] - round(metrics["accuracy"] * metrics["n_labeled"])
        assert page.evaluate("document.querySelectorAll('#misclassified figure').length") == mistakes


def _synthetic_run(tmp_path, n_classes=120, n_images=600, history=None, head="dense", params=None):
    """A 120-class test split with a confusable neighbour per class, as a Caltech-101-sized run would be."""
    rng = np.random.default_rng(0)
    labels = [f"class_{i:03d}" + ("_with_a_rather_long_name" if i % 7 == 0 else "") for i in range(n_classes)]
    truth = rng.integers(0, n_classes, n_images)
    logits = rng.normal(0, 1, (n_images, n_classes))
    logits[np.arange(n_images), truth] += 3.0
    logits[np.arange(n_images), (truth + 1) % n_classes] += 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    images = [f"{labels[t]}/{i}.png" for i, t in enumerate(truth)]
    for i, image in enumerate(images):
        write_image(tmp_path / "data" / image, seed=i, size=(40, 30))
    samples = [Sample(image, f"{i:064x}", labels[t], "test") for i, (image, t) in enumerate(zip(images, truth))]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "history.json").write_text(json.dumps(history or []))
    info = {"head": head, "params": params or {"best_epoch": 3}, "dataset": "many", "split_sizes": {"test": n_images},
            "fingerprint": {"backbone": "inception_v3", "alpha": None, "weights": "imagenet:x"}, "created": "today"}
    run = Run(run_dir, Config(), labels, samples, RunInfo.from_json(info))
    truths = [labels[t] for t in truth]
    metrics = write_report(run_dir / "report", labels=labels, images=images, true_labels=truths,
                           probabilities=probabilities, split="test")
    path = write_html_report(run_dir / "report" / "report.html", run=run, metrics=metrics, images=images,
                             true_labels=truths, probabilities=probabilities, image_root=tmp_path / "data",
                             timings={"extract": 61.0, "train": 2.0, "report": 0.5})
    return path, metrics, labels


def test_120_classes_heatmap_hover_and_sorting_in_chromium(tmp_path):
    path, metrics, labels = _synthetic_run(tmp_path)
    assert len(labels) > COUNTS_IN_CELLS_UP_TO
    with Page() as page:
        page.open(path)
        _check_loads_cleanly(page, n_classes=120)
        # too many classes for numbers in cells: the count is on hover
        assert page.evaluate("Array.from(document.querySelectorAll('#confusion tbody td:not(.n)'))"
                             ".every(td => td.textContent === '')")
        tip = page.evaluate("""(() => { const td = document.querySelector('#confusion tbody tr').cells[2];
            td.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
            return document.getElementById('tip').textContent; })()""")
        count = metrics["confusion_matrix"][0][1]
        assert tip.startswith(f"true {labels[0]} → predicted {labels[1]}: {count} of ")
        # per-class table: worst F1 first, then sortable by clicking a header
        f1 = {label: stats["f1"] for label, stats in metrics["per_class"].items()}
        first = page.evaluate("document.querySelector('#per-class tbody tr').cells[0].textContent")
        assert f1[first] == min(f1.values())
        order = page.evaluate("""(() => { const th = Array.from(document.querySelectorAll('#per-class th'))
              .find(h => h.textContent === 'support'); th.click(); th.click();
            return Array.from(document.querySelectorAll('#per-class tbody tr'))
              .map(r => +r.cells[4].dataset.v); })()""")
        assert order == sorted(order, reverse=True) and len(order) == 120
        assert page.evaluate("document.querySelectorAll('#confident figure').length") == MAX_CONFIDENT


def test_file_is_self_contained_and_escaped(tmp_path):
    path, _, _ = _synthetic_run(tmp_path, n_classes=8, n_images=60)
    text = path.read_text()
    assert re.findall(r'src="([^"]{0,20})', text) and all(s.startswith("data:image/jpeg;base64,")
                                                           for s in re.findall(r'src="([^"]{0,30})', text))
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert text.count("<script") == 2  # the matrix data and the page's own script, nothing injected


def test_hostile_names_cannot_end_the_data_script(tmp_path):
    """A class named like a closing tag stays inside the JSON data block."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    labels = ["</script><script>alert(1)</script>", "b&b"]
    samples = [Sample(f"{i}.png", f"{i:064x}", labels[i % 2], "test") for i in range(4)]
    run = Run(run_dir, Config(), labels, samples, RunInfo("logreg", {"C": 1.0}, dataset="d"))
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    truths = [s.label for s in samples]
    metrics = write_report(run_dir / "report", labels=labels, images=[s.image for s in samples],
                           true_labels=truths, probabilities=probabilities, split="test")
    path = write_html_report(run_dir / "report.html", run=run, metrics=metrics, images=[s.image for s in samples],
                             true_labels=truths, probabilities=probabilities, image_root=None, timings={})
    text = path.read_text()
    assert "</script><script>alert" not in text and text.count("<script") == 2
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text and "b&amp;b" in text
    assert "image not found" in text  # no dataset folder: placeholders, not a crash
    with Page() as page:
        page.open(path)
        assert page.problems() == []
        data = page.evaluate("JSON.parse(document.getElementById('cm-data').textContent).labels")
        assert data == labels


def test_logreg_search_unlabeled_gallery_and_no_labels(tmp_path):
    history = [{"C": c, "val_accuracy": a, "val_log_loss": l} for c, a, l in ((0.1, 0.5, 0.9), (1.0, 0.7, 0.6))]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "history.json").write_text(json.dumps(history))
    write_image(tmp_path / "data" / "mystery.png", seed=1)
    run = Run(run_dir, Config(), ["a", "b"], [Sample("mystery.png", "0" * 64, None, "test")],
              RunInfo("logreg", {"C": 1.0}))
    probabilities = np.array([[0.3, 0.7]])
    metrics = write_report(run_dir / "report", labels=["a", "b"], images=["mystery.png"], true_labels=[None],
                           probabilities=probabilities, split="test")
    text = write_html_report(run_dir / "report.html", run=run, metrics=metrics, images=["mystery.png"],
                             true_labels=[None], probabilities=probabilities, image_root=tmp_path / "data",
                             timings={"train": 1.0}).read_text()
    assert "No labeled images" in text and 'id="confusion"' not in text
    assert 'id="unlabeled"' in text and "data:image/jpeg;base64," in text
    # the setting that was kept is highlighted (a history from before normalisations and views: none, 0)
    assert 'class="chosen"><td>1</td><td>none</td><td>0</td><td>0.7000</td>' in text
    assert "scored on the validation split" in text

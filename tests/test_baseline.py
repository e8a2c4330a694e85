"""The from-scratch baseline: same splits as the transfer runs, early stopping, the same report, labelled."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from pipeline.baseline import BaselineSettings, input_pipeline, run_baseline
from pipeline.cli import main
from pipeline.compare import compare_runs, format_table
from pipeline.config import load_config
from pipeline.errors import DatasetError
from pipeline.evaluate import run_report
from pipeline.extract import run_extract
from pipeline.pixel_models import predict_samples
from pipeline.runs import load_run
from pipeline.train import run_train

EPOCHS, PATIENCE = 30, 3


def _colour_classes(root):
    """Three classes a CNN can tell apart by colour, one undecodable file, one copy under a second label."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "green", "blue"]):
        for i in range(12):
            pixels = rng.normal(60, 25, (40, 48, 3))
            pixels[..., c] += 120
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    shutil.copy(root / "green" / "0.png", root / "blue" / "green_really.png")
    return root


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    config = tiny_config(tmp, _colour_classes(tmp / "colours"))
    args = [f"--set=data.root='{config.data.root}'", f"--set=cache.dir='{config.cache.dir}'",
            f"--set=run.dir='{config.run.dir}'", "--set=data.val_percent=25.0", "--set=data.test_percent=25.0"]
    assert main(["baseline", *args, "--epochs", str(EPOCHS), "--patience", str(PATIENCE), "--image-size", "32",
                 "--no-progress"]) == 0
    (run_dir,) = (tmp / "runs" / "colours").iterdir()
    return config, run_dir


def test_runs_with_early_stopping_and_keeps_the_best_epoch(baseline_run):
    config, run_dir = baseline_run
    assert run_dir.name.endswith("-scratch-cnn") and (run_dir / "model.keras").is_file()
    info = json.loads((run_dir / "run.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    assert info["from_scratch"] is True and info["failed_images"] == 1 and info["params"]["image_size"] == 32
    assert info["label_conflict_files"] == [[["blue/green_really.png", "blue"], ["green/0.png", "green"]]]
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert info["params"]["best_epoch"] == best
    assert len(history) <= min(EPOCHS, best + PATIENCE)  # stopped at most PATIENCE epochs past the best
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history[0])
    # the saved model is the best epoch's: scoring the val split again gives that epoch's accuracy
    run = load_run(run_dir)
    val = [s for s in run.samples if s.split == "val"]
    probabilities = predict_samples(run, val, Path(config.data.root))
    labels = json.loads((run_dir / "labels.json").read_text())
    accuracy = np.mean([labels[p.argmax()] == s.label for p, s in zip(probabilities, val)])
    assert accuracy == pytest.approx(history[best - 1]["val_accuracy"])


def test_stops_early_when_validation_loss_stops_improving(tmp_path, tiny_dataset):
    """Noise images with arbitrary labels: validation loss soon rises, and training stops PATIENCE epochs later."""
    result = run_baseline(tiny_config(tmp_path, tiny_dataset),
                          BaselineSettings(image_size=32, epochs=EPOCHS, patience=PATIENCE), progress=False)
    assert result.epochs_run < EPOCHS and result.epochs_run == result.best_epoch + PATIENCE
    history = json.loads((result.run_dir / "history.json").read_text())
    assert min(history, key=lambda h: h["val_loss"])["epoch"] == result.best_epoch


def test_same_splits_as_the_transfer_run(baseline_run):
    config, run_dir = baseline_run
    run_extract(config, progress=False)
    transfer = run_train(config).run_dir

    def splits(directory):
        lines = (directory / "samples.jsonl").read_text().splitlines()
        return {s["image"]: (s["split"], s["key"]) for s in map(json.loads, lines)}

    assert splits(run_dir) == splits(transfer)
    assert "red/broken.jpg" not in splits(run_dir) and "blue/green_really.png" not in splits(run_dir)


def test_same_report_and_labelled_in_the_comparison(baseline_run):
    config, run_dir = baseline_run
    report = run_dir / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_labeled"] == len(
        (report / "predictions.jsonl").read_text().splitlines())
    html = (report / "report.html").read_text()
    assert "From-scratch baseline" in html and "green_really.png" in html and "svg class=\"chart\"" in html
    rows = compare_runs(config)
    (scratch,) = [row for row in rows if row.from_scratch]
    assert scratch.features == "none (from scratch)" and scratch.head == "small CNN on 32 px images"
    assert scratch.accuracy == metrics["accuracy"] and scratch.extract_seconds is None
    assert "features 'none (from scratch)': the baseline" in format_table(rows)


def test_report_refuses_images_changed_since_training(baseline_run):
    config, run_dir = baseline_run
    test_image = next(s["image"] for s in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines())
                      if s["split"] == "test")
    path = Path(config.data.root) / test_image
    original = path.read_bytes()
    try:
        Image.new("RGB", (40, 48), "white").save(path)
        with pytest.raises(DatasetError, match="changed since it was trained.*make baseline"):
            run_report(run_dir)
    finally:
        path.write_bytes(original)


def test_input_pipeline_shuffles_and_augments_training_batches_only():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(10)
    (plain_x, plain_y), = input_pipeline(images, labels, batch_size=10, training=False).as_numpy_iterator()
    assert plain_x.dtype == np.float32 and np.array_equal(plain_x, images) and np.array_equal(plain_y, labels)
    (x, y), = input_pipeline(images, labels, batch_size=10, training=True, seed=3).as_numpy_iterator()
    assert x.shape == images.shape and x.dtype == np.float32 and sorted(y) == list(range(10))
    assert not np.array_equal(y, labels)  # shuffled
    assert all(not np.allclose(x[k], images[y[k]]) for k in range(10))  # every image altered
    assert x.min() >= 0 and x.max() <= 255


def test_it_learns_flowers5_well_above_chance(tmp_path, flowers5):
    """Five classes, so chance is 0.2 on the 200 validation photos; at 32 px it reached 0.62 (best epoch 6,
    AMD EPYC). Early stopping keeps it to about ten epochs."""
    config = load_config(None, [f"data.root='{flowers5}'", f"cache.dir='{tmp_path / 'cache'}'",
                                f"run.dir='{tmp_path / 'runs'}'"])
    result = run_baseline(config, BaselineSettings(image_size=32, epochs=15, patience=4), progress=False)
    assert result.split_sizes == {"train": 750, "val": 200, "test": 0}
    assert result.val_accuracy >= 0.45, result.val_accuracy

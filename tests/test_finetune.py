"""Fine-tuning: end to end on a tiny set with random weights, BatchNorm frozen, and the run used like any other."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import tiny_config, write_image
from pipeline import backbones
from pipeline.baseline import BaselineSettings, run_baseline
from pipeline.cli import main
from pipeline.compare import LADDER, compare_runs, format_ladder, ladder, write_compare_html
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.export import build_model, run_export
from pipeline.extract import run_extract
from pipeline.finetune import latest_head_run, run_finetune, unfreeze
from pipeline.heads import load_head
from pipeline.predict import run_predict
from pipeline.runs import load_run
from pipeline.train import run_train

# batch 4: two steps an epoch, so even the first epoch trains past the warm-up's first step (learning rate 0)
FINETUNE = {"finetune.epochs": 2, "finetune.batch_size": 4, "finetune.patience": 2, "finetune.unfreeze": 2.0,
            "finetune.learning_rate": 1e-3}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A head run and the run fine-tuned from it (through the CLI), on 24 images with random MobileNet weights."""
    tmp = tmp_path_factory.mktemp("finetune")
    root = tmp / "tiny"
    for c, name in enumerate(["cat", "dog", "owl"]):
        for i in range(8):
            write_image(root / name / f"{name}_{i}.png", seed=100 * c + i)
    config = tiny_config(tmp, root, **FINETUNE)
    run_extract(config, progress=False)
    head_dir = run_train(config).run_dir
    args = [f"--set=data.root='{root}'", f"--set=cache.dir='{config.cache.dir}'", f"--set=run.dir='{config.run.dir}'",
            "--set=backbone.name='mobilenet'", "--set=backbone.alpha=0.25", "--set=backbone.weights='random'",
            "--set=data.val_percent=25.0", "--set=data.test_percent=25.0",
            *(f"--set={key}={value}" for key, value in FINETUNE.items())]
    assert main(["finetune", *args, "--no-progress"]) == 0
    (run_dir,) = [p for p in (tmp / "runs" / "tiny").iterdir() if p.name.endswith("-finetuned")]
    return config, head_dir, run_dir


def test_finetunes_end_to_end_from_the_newest_head_run(finetuned, capsys):
    config, head_dir, run_dir = finetuned
    assert latest_head_run(config) == head_dir  # the fine-tuned run is newer, but not a head run
    info = json.loads((run_dir / "run.json").read_text())
    assert info["finetuned_from"]["run"] == str(head_dir) and info["model"] == {"file": "model.keras",
                                                                                "input_size": 224}
    assert info["frozen_val_accuracy"] == json.loads((head_dir / "run.json").read_text())["val_accuracy"]
    assert info["better_than_frozen"] == (info["val_accuracy"] > info["frozen_val_accuracy"])
    assert info["params"]["unfrozen_layers"] > 0 and info["cache"] is None and info["finetune_seconds"] > 0
    assert (run_dir / "samples.jsonl").read_text() == (head_dir / "samples.jsonl").read_text()  # same splits
    assert load_run(run_dir).config.finetune.unfreeze == 2.0  # the recipe it ran with, beside the head run's data
    history = json.loads((run_dir / "history.json").read_text())
    assert history[0]["epoch"] == 0 and 1 <= len(history) - 1 <= 2
    assert info["val_accuracy"] == history[info["params"]["best_epoch"]]["val_accuracy"]
    # the report was written by the CLI, from the fine-tuned model on the images themselves
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["context"]["seconds"]["finetune"] == info["finetune_seconds"]
    assert "fine-tuned" in (run_dir / "report" / "report.html").read_text()


def test_batchnorm_statistics_do_not_move_and_only_the_top_is_trained(finetuned):
    _, head_dir, run_dir = finetuned
    start = load_run(head_dir)
    before = build_model(start.config.backbone, load_head("logreg", head_dir), len(start.labels))
    after = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)

    def backbone_layers(model):
        (backbone,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        return {layer.name: layer for layer in backbone.layers}

    old, new = backbone_layers(before), backbone_layers(after)
    norms = [name for name, layer in old.items() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 27
    for name in norms:  # moving mean and variance, and gamma and beta too
        for w_old, w_new in zip(old[name].weights, new[name].weights):
            np.testing.assert_array_equal(w_old.numpy(), w_new.numpy(), err_msg=f"{name}/{w_old.name} moved")
    top = {"conv_dw_12", "conv_pw_12", "conv_dw_13", "conv_pw_13"}  # finetune.unfreeze = 2 blocks
    assert {name for name, layer in new.items() if layer.weights and layer.trainable} == top
    changed = {name for name, layer in old.items() if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
               and not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(layer.weights, new[name].weights))}
    assert changed == top


def test_export_parity_holds_on_the_finetuned_run(finetuned, tmp_path):
    _, _, run_dir = finetuned
    result = run_export(run_dir, tmp_path / "export", tflite=False)
    assert result.parity["images"] > 0 and result.parity["max_abs_diff"] <= 1e-4
    export = json.loads((tmp_path / "export" / "export.json").read_text())
    assert export["parity"]["tolerance"] == 1e-4


def test_predict_runs_the_finetuned_model_and_never_reads_the_frozen_cache(finetuned, tmp_path, monkeypatch):
    config, head_dir, run_dir = finetuned
    report = {json.loads(line)["image"]: json.loads(line)["predictions"]
              for line in (run_dir / "report" / "predictions.jsonl").read_text().splitlines()}

    def no_cache(*args, **kwargs):
        raise AssertionError("predict opened the feature cache for a fine-tuned run")

    monkeypatch.setattr("pipeline.predict.FeatureCache", no_cache)
    images = [Path(config.data.root) / name for name in report]
    result = run_predict(run_dir, [str(p) for p in images], out_path=tmp_path / "p.jsonl", progress=False)
    assert not any(p.cached or p.error for p in result.predictions)
    for name, prediction in zip(report, result.predictions):
        expected = np.array([report[name][label] for label in result.labels])
        np.testing.assert_allclose(prediction.probabilities, expected, atol=2e-6)
    with pytest.raises(AssertionError, match="opened the feature cache"):  # a head run still reads it
        run_predict(head_dir, [str(images[0])], out_path=tmp_path / "h.jsonl", progress=False)


def test_the_ladder_lists_every_kind_and_labels_the_from_scratch_row(finetuned):
    config, _, run_dir = finetuned
    run_baseline(config, BaselineSettings(image_size=32, epochs=1, patience=1), progress=False)
    rows = compare_runs(config)
    steps = ladder(rows)
    assert [step.rung for step in steps] == list(LADDER)
    assert steps[0].rung.name.startswith("from scratch") and steps[0].run.from_scratch
    assert steps[1].run is not None and steps[4].run.run_dir == run_dir
    assert steps[2].run is None and steps[3].run is None  # no views or TTA runs here: the row says how to add one
    text = format_ladder(rows)
    for rung in LADDER:
        assert rung.name in text
    assert "none yet: make finetune" not in text and "from scratch (small CNN, no transfer)" in text
    finetuned_line = next(line for line in text.splitlines() if line.startswith("fine-tuned"))
    assert run_dir.name in finetuned_line
    html = write_compare_html(config.run.dir and Path(config.run.dir) / "c.html", rows, "tiny").read_text()
    assert 'id="ladder"' in html and "<b>from scratch (small CNN, no transfer)</b>" in html


def test_unfreeze_by_share_or_by_blocks_leaves_batchnorm_frozen():
    model = backbones.build_model(load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25",
                                                     "backbone.weights=random"]).backbone)
    spec = backbones.get_spec("mobilenet")
    one = unfreeze(model, spec.block_end, 1)
    assert {layer.name for layer in model.layers if layer.trainable and layer.weights} == {"conv_dw_13", "conv_pw_13"}
    assert (one.layers, one.of) == (2, 27)
    half = unfreeze(model, spec.block_end, 0.5)
    assert half.layers == 14 and not any(layer.trainable for layer in model.layers
                                         if isinstance(layer, keras.layers.BatchNormalization))
    everything = unfreeze(model, spec.block_end, 99)
    assert everything.layers == everything.of == 27


@pytest.mark.parametrize("value", ["1.5", "0", "-1"])
def test_unfreeze_takes_a_share_or_a_whole_number_of_blocks(value):
    with pytest.raises(ConfigError, match="finetune.unfreeze"):
        load_config(None, [f"finetune.unfreeze={value}"])


def test_finetuning_a_run_that_is_not_a_head_run_is_refused(finetuned, caplog):
    config, _, run_dir = finetuned
    with pytest.raises(ConfigError, match="not a head trained on cached features"):
        run_finetune(config, run_dir, progress=False)
    assert "is a run of" not in caplog.text
    other = tiny_config(Path(config.cache.dir).parent, Path(config.data.root), **{"data.name": "other"})
    with pytest.raises(ConfigError, match="not a head trained on cached features"):  # a run of another dataset is named first
        run_finetune(other, run_dir, progress=False)
    assert "is a run of 'tiny', not of this config's 'other'" in caplog.text

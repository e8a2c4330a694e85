"""Comparing runs: extract timings kept in the cache, a sweep that fills the table, the best marked."""

import json

import pytest

from chromium import Page
from conftest import tiny_config, write_image
from pipeline.cache import FeatureCache
from pipeline.cli import main
from pipeline.compare import DEFAULT_GRID, best_run, compare_runs, format_table, sweep_grid
from pipeline.errors import ConfigError, PipelineError
from pipeline.extract import run_extract
from pipeline.train import run_train


def _args(config):
    return [f"--set=data.root='{config.data.root}'", f"--set=cache.dir='{config.cache.dir}'",
            f"--set=run.dir='{config.run.dir}'", "--set=backbone.name=mobilenet", "--set=backbone.alpha=0.25",
            "--set=backbone.weights=random", "--set=data.val_percent=25.0", "--set=data.test_percent=25.0"]


def test_extract_records_its_time_in_the_cache_only_when_it_computes(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset)
    first = run_extract(config, progress=False)
    with FeatureCache(first.cache_path) as cache:
        timing = cache.extract_timing()
    assert timing["images"] == 24 and 0 < timing["seconds"] <= first.seconds
    run_extract(config, progress=False)  # nothing new: the cost of building the file is unchanged
    with FeatureCache(first.cache_path) as cache:
        assert cache.extract_timing() == timing
    write_image(tiny_dataset / "owl" / "late.png", seed=999)
    run_extract(config, progress=False)
    with FeatureCache(first.cache_path) as cache:
        later = cache.extract_timing()
    assert later["images"] == 25 and later["seconds"] > timing["seconds"]


def test_sweep_fills_the_table_and_marks_the_best(tmp_path, tiny_dataset, capsys):
    config = tiny_config(tmp_path, tiny_dataset)
    assert main(["extract", *_args(config), "--no-progress"]) == 0
    earlier = run_train(config).run_dir  # not reported yet: compare reports it
    capsys.readouterr()
    assert main(["sweep", *_args(config), "--no-progress", "--vary", "head.logreg.c_values=[[0.001], [10.0]]",
                 "--vary", "head.logreg.max_iter=[50, 500]"]) == 0
    out = capsys.readouterr().out
    runs = sorted(path.parent for path in (tmp_path / "runs" / "tiny").glob("*/run.json"))
    assert len(runs) == 5
    assert all((run / "report" / "report.html").is_file() for run in runs)
    swept = [json.loads((run / "run.json").read_text())["params"]["C"] for run in runs if run != earlier]
    assert sorted(swept) == [0.001, 0.001, 10.0, 10.0]  # every combination of the --vary values was trained

    rows = compare_runs(config)
    assert [row.val_accuracy for row in rows] == sorted((row.val_accuracy for row in rows), reverse=True)
    best = best_run(rows)
    assert best is rows[0] and all(row.accuracy is not None and row.problem is None for row in rows)
    with FeatureCache(json.loads((runs[0] / "run.json").read_text())["cache"]) as cache:
        extract_seconds = cache.extract_timing()["seconds"]
    assert all(row.extract_seconds == extract_seconds and row.train_seconds > 0 for row in rows)
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["run", "features", "head", "val", "accuracy", "test", "accuracy", "test", "balanced",
                                "accuracy", "test", "precision", "(macro)", "extract", "train", "fine-tune",
                                "hyperparameters"]
    assert lines[1].startswith(f"* {best.name}") and sum(line.startswith("* ") for line in lines[1:6]) == 1
    assert lines[6] == "" and lines[7].startswith("* best validation accuracy")
    assert table in out and "compare: " in out  # the sweep ends by printing the table
    metrics = json.loads((best.run_dir / "report" / "metrics.json").read_text())
    assert f"{metrics['accuracy']:.4f}" in lines[1] and f"{metrics['macro_avg']['precision']:.4f}" in lines[1]

    html = tmp_path / "runs" / "tiny" / "compare.html"
    with Page() as page:
        page.open(html)
        assert page.problems() == []
        names = page.evaluate("Array.from(document.querySelectorAll('#compare tbody tr'))"
                              ".map(r => r.cells[0].innerText)")
        assert len(names) == 5 and names[0] == f"★ {best.name}"
        links = page.evaluate("Array.from(document.querySelectorAll('#compare a')).map(a => a.getAttribute('href'))")
        assert all((html.parent / link).is_file() for link in links) and len(links) == 5


def test_sweep_grid_and_its_mistakes():
    assert sweep_grid([]) == [tuple(combo) for combo in DEFAULT_GRID]
    assert {combo[0] for combo in DEFAULT_GRID} == {"head.kind=logreg", "head.kind=dense"}
    grid = sweep_grid(["head.kind=[\"dense\"]", "head.dense.hidden_units=[[256], [512, 128]]",
                       "head.dense.dropout=[0.2, 0.5]"])
    assert len(grid) == 4 and ("head.kind=\"dense\"", "head.dense.hidden_units=[512, 128]",
                               "head.dense.dropout=0.5") in grid
    with pytest.raises(ConfigError, match="head.\\* keys, augment.views, backbone.pool_blocks only"):
        sweep_grid(["backbone.name=[\"resnet50\"]"])
    assert sweep_grid(["augment.views=[0, 4]", "head.tta=[\"none\", \"flip\"]"])[-1] == ("augment.views=4",
                                                                                      "head.tta=\"flip\"")
    with pytest.raises(ConfigError, match="TOML array of alternatives"):
        sweep_grid(["head.dense.dropout=0.2"])
    with pytest.raises(ConfigError, match="expected KEY="):
        sweep_grid(["head.dense.dropout"])


def test_sweep_checks_every_combination_before_training(tmp_path, tiny_dataset, capsys):
    config = tiny_config(tmp_path, tiny_dataset)
    code = main(["sweep", *_args(config), "--no-progress", "--vary", "head.dense.dropout=[0.2, \"lots\"]"])
    assert code == 2 and "head.dense.dropout" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_compare_without_runs_says_what_to_do(tmp_path, tiny_dataset):
    with pytest.raises(PipelineError, match="make train"):
        compare_runs(tiny_config(tmp_path, tiny_dataset))

"""The backbone's execution path: chosen by measurement, remembered, forced, and safe to fall back.

The choice logic runs on a fake clock with paths whose cost is set by the test, so nothing
here depends on which path is faster on the machine running the tests. The real paths are
then held to computing the same features on real photos with real ImageNet weights.
"""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import backbones, execution, images
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.extract import run_extract

from conftest import tiny_config, write_image

BATCH = 4


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_paths(clock, costs: dict, calls: list, fail_first_call=()):
    """One path per name; a call advances the clock by its cost (a compile by ten times
    that) and returns rows that name the path, so a test sees which path computed a batch."""

    def make(name, code):
        def build(backbone):
            calls.append(("build", name))
            compiled = []

            def run(batch):
                calls.append((name, len(batch)))
                if name in fail_first_call:
                    raise execution.PathFailed(f"{name} could not compile the backbone (no compiler here)")
                first_full = len(batch) == BATCH and not compiled
                compiled.append(True) if len(batch) == BATCH else None
                clock.now += costs[name] * (10 if first_full else 1)
                return np.full((len(batch), 2), code, np.float32)

            return run

        return execution.ExecutionPath(name, "tensorflow", name, build)

    return [make(name, code) for code, name in enumerate(costs)]


def batch(n=BATCH):
    return np.zeros((n, 8, 8, 3), np.uint8)


BACKBONE = SimpleNamespace(config=SimpleNamespace(batch_size=BATCH))
KEY = {"cpu": "test cpu", "backbone": "mobilenet", "batch_size": BATCH}


def chooser(paths, clock, memory=None):
    return execution.PathChooser(BACKBONE, paths, memory=memory, key=KEY, clock=clock)


def test_the_trial_runs_on_real_batches_and_picks_the_faster_path(tmp_path):
    clock, calls = FakeClock(), []
    memory = execution.ChoiceMemory(tmp_path / "execution_paths.json")
    run = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls), clock, memory)
    assert run(batch(3))[0, 0] == 0, "before the choice a partial batch runs on the default path"
    outputs = [run(batch())[0, 0] for _ in range(2 * execution.TRIAL_ROUNDS)]
    assert outputs == [0, 1] * execution.TRIAL_ROUNDS, "candidates take turns on the run's own batches"
    assert run.chosen.name == "xla" and "measured" in run.description and "xla 0.200 s/batch" in run.description
    assert run(batch())[0, 0] == 1 and run(batch(3))[0, 0] == 1, "then every batch runs on the winner"
    assert ("xla", 3) not in calls[:-1], "no partial batch reached the compiled path before the choice"
    record = json.loads(memory.path.read_text())["choices"][0]
    assert record["key"] == KEY and record["winner"] == "xla"
    assert record["seconds_per_batch"] == {"graph": pytest.approx(0.5), "xla": pytest.approx(0.2)}, \
        "the warm-up (compile) is never timed"


def test_the_slower_path_wins_when_it_measures_faster(tmp_path):
    clock, calls = FakeClock(), []
    run = chooser(fake_paths(clock, {"graph": 0.1, "xla": 0.9}, calls), clock)
    for _ in range(2 * execution.TRIAL_ROUNDS):
        run(batch())
    assert run.chosen.name == "graph"


def test_a_clear_loser_is_timed_once_and_not_again(tmp_path):
    clock, calls = FakeClock(), []
    run = chooser(fake_paths(clock, {"graph": 0.1, "xla": 0.9}, calls), clock)  # 9x: MobileNet on an AMX Xeon
    while run.chosen is None:
        run(batch())
    assert [name for name, _ in calls if name == "xla"] == ["xla", "xla"], "a warm-up and one timed call"
    assert run.chosen.name == "graph" and "xla 0.900 s/batch" in run.description
    memory = execution.ChoiceMemory(tmp_path / "execution_paths.json")
    close = chooser(fake_paths(clock, {"graph": 0.2, "xla": 0.3}, []), clock, memory)
    for _ in range(2 * execution.TRIAL_ROUNDS):
        close(batch())
    timed = memory.recall(KEY)["all_seconds"]
    assert close.chosen.name == "graph" and len(timed["xla"]) == execution.TRIAL_ROUNDS - 1, \
        "a near loss is timed in full: noise could have made it"


def test_a_run_too_small_to_measure_stays_on_the_graph_and_remembers_nothing(tmp_path):
    memory = execution.ChoiceMemory(tmp_path / "execution_paths.json")
    clock, calls = FakeClock(), []
    run = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls), clock, memory)
    run.expect(2 * execution.TRIAL_ROUNDS - 1)
    assert run.chosen.name == "graph" and "too few" in run.description
    for _ in range(3):
        run(batch())
    assert {name for name, _ in calls} == {"build", "graph"}, "XLA was never built, let alone compiled"
    assert not memory.path.exists(), "a larger extract measures the paths"
    large = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, []), clock, memory)
    large.expect(2 * execution.TRIAL_ROUNDS)
    assert large.chosen is None, "enough batches for the trial: it runs"


def test_a_remembered_choice_is_reused_without_a_trial(tmp_path):
    memory = execution.ChoiceMemory(tmp_path / "execution_paths.json")
    clock, calls = FakeClock(), []
    first = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls), clock, memory)
    for _ in range(2 * execution.TRIAL_ROUNDS):
        first(batch())
    calls.clear()
    again = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls), clock, memory)
    assert again.chosen.name == "xla" and "remembered" in again.description
    again(batch()), again(batch(2))
    assert calls == [("build", "xla"), ("xla", BATCH), ("xla", 2)], "the loser is never built again"
    other_key = execution.PathChooser(BACKBONE, fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls), memory=memory,
                                      key={**KEY, "batch_size": 64}, clock=clock)
    assert other_key.chosen is None, "another batch size (or CPU, precision, version...) is measured anew"


def test_a_forced_path_runs_without_a_trial():
    clock, calls = FakeClock(), []
    run = chooser(fake_paths(clock, {"graph": 0.5}, calls), clock)
    assert run.chosen.name == "graph" and "only candidate" in run.description
    run(batch())
    assert calls == [("build", "graph"), ("graph", BATCH)]


def test_a_path_that_fails_to_compile_is_dropped_with_one_warning(tmp_path, caplog):
    clock, calls = FakeClock(), []
    memory = execution.ChoiceMemory(tmp_path / "execution_paths.json")
    run = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls, fail_first_call={"xla"}), clock, memory)
    with caplog.at_level(logging.WARNING, logger="pipeline.execution"):
        outputs = [run(batch())[0, 0] for _ in range(5)]
    assert outputs == [0] * 5, "the batch that failed to compile is computed on the other path"
    assert run.chosen.name == "graph"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not compile" in warnings[0] and "\n" not in warnings[0]


def test_a_remembered_winner_that_fails_here_is_forgotten(tmp_path, caplog):
    memory = execution.ChoiceMemory(tmp_path / "execution_paths.json")
    memory.remember({"key": KEY, "winner": "xla", "seconds_per_batch": {"xla": 0.1, "graph": 0.2}})
    clock, calls = FakeClock(), []
    run = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls, fail_first_call={"xla"}), clock, memory)
    assert run.chosen.name == "xla"
    with caplog.at_level(logging.WARNING, logger="pipeline.execution"):
        assert run(batch())[0, 0] == 0
    assert run.chosen.name == "graph" and memory.recall(KEY) is None


def test_an_unreadable_memory_file_means_measuring_again(tmp_path, caplog):
    path = tmp_path / "execution_paths.json"
    path.write_text("{not json")
    clock, calls = FakeClock(), []
    with caplog.at_level(logging.WARNING, logger="pipeline.execution"):
        run = chooser(fake_paths(clock, {"graph": 0.5, "xla": 0.2}, calls), clock, execution.ChoiceMemory(path))
    assert run.chosen is None and "unreadable" in caplog.text
    for _ in range(2 * execution.TRIAL_ROUNDS):
        run(batch())
    assert json.loads(path.read_text())["choices"][0]["winner"] == "xla"


def test_settings_that_leave_no_path_are_one_line_naming_them():
    config = load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25", "backbone.weights=random",
                                "backbone.runtime=openvino", "backbone.compile=xla"]).backbone
    with pytest.raises(ConfigError, match="backbone.runtime = 'openvino' with backbone.compile = 'xla'"):
        backbones.FeatureExtractor(config)


def test_graph_and_xla_give_the_same_features_on_real_photos(keras_home, flowers5):
    """The path is not in the fingerprint, so both must compute the same rows (real MobileNet
    weights, real photos), within the tolerance export parity uses; partial batches too."""
    paths = sorted(flowers5.glob("train/*/*.jpg"))[::40][:4]
    pixels = np.stack([images.decode_image(path.read_bytes(), 224) for path in paths])
    base = load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25", "backbone.batch_size=4"]).backbone
    graph = backbones.FeatureExtractor(load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25",
                                                          "backbone.batch_size=4", "backbone.compile=graph"]).backbone)
    xla = backbones.FeatureExtractor(load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25",
                                                        "backbone.batch_size=4", "backbone.compile=xla"]).backbone)
    assert "tensorflow-xla" in xla.description and base.compile == "auto"
    by_graph, by_xla, partial = graph(pixels), xla(pixels), xla(pixels[:3])
    assert np.abs(by_graph).max() > 0.1
    np.testing.assert_allclose(by_xla, by_graph, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(partial, by_xla[:3], rtol=1e-4, atol=1e-5)


def test_extract_measures_once_remembers_and_says_which_path_ran(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset, **{"backbone.batch_size": 2})  # 24 images: 12 full batches
    first = run_extract(config, progress=False)
    assert first.execution.startswith("backbone path: tensorflow-") and "measured" in first.execution
    assert first.execution in first.describe().splitlines()
    memory = json.loads((tmp_path / "cache" / execution.MEMORY_FILE_NAME).read_text())
    (record,) = memory["choices"]
    assert set(record["seconds_per_batch"]) == {"tensorflow-graph", "tensorflow-xla"}
    assert record["key"]["batch_size"] == 2 and record["key"]["backbone"] == "mobilenet"
    write_image(tiny_dataset / "cat" / "new.png", seed=999)  # new content reaches the backbone
    again = run_extract(tiny_config(tmp_path, tiny_dataset, **{"backbone.batch_size": 2}), progress=False)
    assert "remembered" in again.execution and record["winner"] in again.execution

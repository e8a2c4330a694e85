"""Scoring new images with a trained run: cached content skips the backbone, new content is
extracted in batches, bad files become one line each, and a threshold abstains."""

import json
import shutil

import numpy as np
import pytest

from pipeline.cache import FeatureCache
from pipeline.cli import main
from pipeline.errors import ConfigError, DatasetError, PipelineError
from pipeline.extract import run_extract
from pipeline.heads import load_head
from pipeline.predict import find_images, run_predict
from pipeline.runs import load_run
from pipeline.train import run_train

from conftest import tiny_config, write_image
from pipeline_helpers import CountingExtractor, class_folders, permissions_enforced


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A logistic-regression run on 24 synthetic images (MobileNet 0.25, random weights)."""
    tmp_path = tmp_path_factory.mktemp("predict")
    root = class_folders(tmp_path / "tiny", cat=8, dog=8, owl=8)
    config = tiny_config(tmp_path, root)
    run_extract(config, progress=False)
    return config, run_train(config).run_dir, root


def report_probabilities(run_dir, relpaths):
    """What the report computes: cached features through the saved head."""
    run = load_run(run_dir)
    keys = {s.image: s.key for s in run.samples}
    with FeatureCache(run.info.cache, run.info.fingerprint) as cache:
        rows = cache.row_index()
        features = cache.read_features([rows[keys[p]] for p in relpaths])
    return load_head(run.info.head, run_dir).predict_proba(features)


def test_cached_images_skip_the_backbone_new_ones_are_batched_bad_ones_get_a_line(trained, tmp_path):
    config, run_dir, root = trained
    new = tmp_path / "new"
    for i in range(5):
        write_image(new / f"fresh_{i}.png", seed=900 + i)
    shutil.copy(root / "owl" / "owl_3.png", new / "owl_copy.png")  # cached content under another name
    (new / "broken.jpg").write_bytes(b"not an image at all")
    (new / "notes.txt").write_text("not an image name: never picked up")
    write_image(new / "locked.png", seed=950).chmod(0)
    counting = CountingExtractor()
    with permissions_enforced():
        result = run_predict(run_dir, [str(root / "cat"), str(new)], progress=False, out_path=tmp_path / "out.jsonl",
                             make_extractor=counting)
    assert counting.batches == [5]  # only the new content, in one batch of at most backbone.batch_size (8)
    names = [p.image for p in result.predictions]
    assert names == sorted(str(p) for p in (root / "cat").glob("*.png")) + sorted(str(p) for p in new.iterdir()
                                                                                  if p.suffix != ".txt")
    by_name = {p.image: p for p in result.predictions}
    assert by_name[str(new / "broken.jpg")].error.startswith("not an image Pillow can read")
    assert by_name[str(new / "locked.png")].error == "cannot read the file (Permission denied)"
    assert by_name[str(new / "owl_copy.png")].cached and not by_name[str(new / "fresh_0.png")].cached
    expected = report_probabilities(run_dir, [f"cat/cat_{i}.png" for i in range(8)] + ["owl/owl_3.png"])
    got = np.array([by_name[str(root / "cat" / f"cat_{i}.png")].probabilities for i in range(8)]
                   + [by_name[str(new / "owl_copy.png")].probabilities])
    np.testing.assert_allclose(got, expected, atol=1e-12)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == names
    assert lines[names.index(str(new / "broken.jpg"))] == {"image": str(new / "broken.jpg"),
                                                          "error": by_name[str(new / "broken.jpg")].error}
    first = lines[0]
    assert set(first) == {"image", "class", "predictions", "novelty"} and first["class"] in ("cat", "dog", "owl")
    assert isinstance(first["novelty"], float) and first["novelty"] >= 0
    assert first["class"] == max(first["predictions"], key=first["predictions"].get)
    assert list(first["predictions"].values()) == sorted(first["predictions"].values(), reverse=True)


def test_new_content_scores_as_it_would_from_the_cache(trained, tmp_path):
    """The same pixels reached through the backbone now or through the cache give the same probabilities."""
    config, run_dir, root = trained
    copies = []
    for name in ("cat/cat_1.png", "dog/dog_2.png"):
        copy = tmp_path / name.replace("/", "_")
        copy.write_bytes((root / name).read_bytes() + b"trailing bytes: new content, same pixels")
        copies.append(str(copy))
    counting = CountingExtractor()
    result = run_predict(run_dir, copies, progress=False, out_path=tmp_path / "out.jsonl", make_extractor=counting)
    assert counting.batches == [2]
    got = np.array([p.probabilities for p in result.predictions])
    np.testing.assert_allclose(got, report_probabilities(run_dir, ["cat/cat_1.png", "dog/dog_2.png"]), atol=1e-5)


def test_threshold_turns_low_confidence_into_unknown(trained, tmp_path):
    config, run_dir, root = trained
    plain = run_predict(run_dir, [str(root)], progress=False, out_path=tmp_path / "plain.jsonl")
    tops = sorted(p.probabilities.max() for p in plain.predictions)
    threshold = float((tops[len(tops) // 2] + tops[len(tops) // 2 - 1]) / 2)
    result = run_predict(run_dir, [str(root)], threshold=threshold, progress=False, out_path=tmp_path / "t.jsonl")
    for p, q in zip(result.predictions, plain.predictions):
        assert p.label == ("unknown" if p.probabilities.max() < threshold else q.label)
    assert sum(p.label == "unknown" for p in result.predictions) == len(tops) // 2
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert sum(line["class"] == "unknown" for line in lines) == len(tops) // 2
    assert "run `make report` to see what thresholds cost" in result.describe()
    assert main(["report", "--run", str(run_dir)]) == 0
    assert "kept" in result.describe() and "threshold_curve" in result.describe()  # the report's held-out curve


def test_cli_prints_a_top_k_table_and_writes_json_lines(trained, tmp_path, capsys):
    config, run_dir, root = trained
    out = tmp_path / "cli.jsonl"
    assert main(["predict", "--run", str(run_dir), "--top", "2", "--out", str(out), "--no-progress",
                 str(root / "dog" / "dog_0.png"), str(root / "owl" / "*.png")]) == 0
    printed = capsys.readouterr().out
    assert "top 2" in printed and "dog_0.png" in printed and "owl_7.png" in printed
    assert "predict: 9 images: 9 from the cache, 0 through the backbone, 0 failed" in printed
    row = next(line for line in printed.splitlines() if "dog_0.png" in line)  # long paths keep their end
    assert len(row.split()) == 3 + 2 * 2  # image, class, novelty, then two (label, probability) pairs
    assert len(out.read_text().splitlines()) == 9


def test_inputs_and_settings_are_checked(trained, tmp_path, capsys):
    config, run_dir, root = trained
    assert [p.name for p in find_images([str(root / "**" / "cat_[12].png")])] == ["cat_1.png", "cat_2.png"]
    with pytest.raises(DatasetError, match="no such file or folder"):
        find_images([str(tmp_path / "missing.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        find_images([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        run_predict(run_dir, [str(root)], threshold=1.5)
    assert main(["predict", "--run", str(run_dir), "--threshold", "2", str(root)]) == 2
    assert capsys.readouterr().err.startswith("error: --threshold 2.0")


def test_a_run_whose_backbone_changed_is_refused(trained, tmp_path):
    config, run_dir, root = trained
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    info = json.loads((moved / "run.json").read_text())
    info["fingerprint"]["decode"] = "an older decoding"
    (moved / "run.json").write_text(json.dumps(info))
    with pytest.raises(PipelineError, match=r"\(decode changed since"):
        run_predict(moved, [str(root)], progress=False)

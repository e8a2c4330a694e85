"""Cached augmented views: deterministic everywhere, incremental, crash-safe, training-only.

Real components: the real MobileNet 0.25 graph (random weights), real HDF5 caches, the real
extract, train and report stages on synthetic photos.
"""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

from pipeline import augment, journal
from pipeline.cache import FeatureCache
from pipeline.evaluate import run_report
from pipeline.extract import run_extract
from pipeline.features import open_cache
from pipeline.train import run_train

from conftest import tiny_config
from pipeline_helpers import KeptExtractor, snapshot_around_writes

RECIPE_ID = augment.RECIPE.fingerprint_id()


def view_content(config) -> dict:
    """(content hash, view index) -> feature row, and content hash -> clean row."""
    with open_cache(config) as cache:
        rows, views = cache.row_index(), cache.view_index(RECIPE_ID)
        clean = dict(zip(rows, cache.read_features(list(rows.values()))))
        viewed = dict(zip(views, cache.read_view_features(RECIPE_ID, list(views.values()))))
    return {"clean": clean, "views": viewed}


class CountingExtractor:
    """The kept real extractor, counting the images it is given."""
    images = 0

    def __init__(self, backbone):
        self.inner = KeptExtractor(backbone)

    def __getattr__(self, name):  # feature_dim, expect, ...: the real extractor's
        return getattr(self.inner, name)

    def __call__(self, batch):
        CountingExtractor.images += len(batch)
        return self.inner(batch)


def test_a_view_is_a_pure_function_of_the_bytes_the_index_and_the_recipe():
    """The same pixels in any thread, and the same as on the machine that pinned the digest below:
    the generator is NumPy's PCG64 seeded from the hash, the arithmetic exact or element-wise float64."""
    source = np.random.default_rng(7).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    key = hashlib.sha256(b"a photo").hexdigest()
    serial = [augment.random_view(source, key, index, 48) for index in range(1, 9)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda index: augment.random_view(source, key, index, 48), range(1, 9)))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded))
    assert len({view.tobytes() for view in serial}) == 8  # each index is another view
    digest = hashlib.sha256(b"".join(view.tobytes() for view in serial)).hexdigest()
    assert digest == "ae2dd109a55c01ee7a400e2cbe962c6092912d0851dadb1f94d3eff7b05ed2be", digest


def test_views_are_the_same_on_a_rerun_and_with_another_worker_count(tmp_path, tiny_dataset):
    settings = {"augment.views": 2, "head.tta": "flip"}
    results = []
    for name, workers in (("one", 1), ("again", 1), ("three", 3)):
        config = tiny_config(tmp_path, tiny_dataset, **settings, **{"cache.dir": str(tmp_path / name),
                                                                    "extract.workers": workers})
        summary = run_extract(config, progress=False, make_extractor=KeptExtractor)
        assert (summary.views_per_image, summary.views_extracted) == (3, 3 * 24)
        results.append(view_content(config))
    first = results[0]
    assert len(first["views"]) == 72 and {index for _, index in first["views"]} == {0, 1, 2}
    for other in results[1:]:  # the same pixels; the backbone's last bits may follow its measured execution path
        assert first["views"].keys() == other["views"].keys()
        for key, row in first["views"].items():
            np.testing.assert_allclose(row, other["views"][key], rtol=1e-5, atol=1e-5, err_msg=str(key))


def test_raising_the_view_count_extracts_only_the_new_views(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset, **{"augment.views": 1})
    run_extract(config, progress=False, make_extractor=CountingExtractor)
    before = view_content(config)
    CountingExtractor.images = 0
    raised = tiny_config(tmp_path, tiny_dataset, **{"augment.views": 3})
    summary = run_extract(raised, progress=False, make_extractor=CountingExtractor)
    assert (summary.extracted, summary.views_extracted, CountingExtractor.images) == (0, 48, 48)
    assert "3 view(s) per image: 48 extracted" in summary.describe()
    after = view_content(raised)
    assert {index for _, index in after["views"]} == {1, 2, 3}
    assert all(np.array_equal(row, after["views"][key]) for key, row in before["views"].items())  # kept as stored
    CountingExtractor.images = 0
    again = run_extract(raised, progress=False, make_extractor=CountingExtractor)
    assert (again.extracted, again.views_extracted, CountingExtractor.images) == (0, 0, 0)


def test_views_never_reach_validation_or_test_scoring(tmp_path, tiny_dataset):
    """Views of held-out images are overwritten with garbage: training and the report do not change,
    so only training images' views were read."""
    config = tiny_config(tmp_path, tiny_dataset, **{"augment.views": 2, "head.logreg.view_weights": [1.0]})
    run_extract(config, progress=False, make_extractor=KeptExtractor)
    first = run_train(config)
    _, first_metrics = run_report(first.run_dir)
    samples = [json.loads(line) for line in (first.run_dir / "samples.jsonl").read_text().splitlines()]
    held_out = {s["key"] for s in samples if s["split"] != "train"}
    assert held_out and first.head.view_weight_ == 1.0
    with open_cache(config) as cache:
        path = cache.path
    with h5py.File(path, "r+") as f:
        group = f[f"views/{RECIPE_ID}"]
        keys = [key.decode() for key in group["key"][:]]
        for row, key in enumerate(keys):
            if key in held_out:
                group["feature"][row] = np.full(group["feature"].shape[1], 1e6, np.float32)
    second = run_train(config)
    _, second_metrics = run_report(second.run_dir)
    np.testing.assert_array_equal(first.head.coef_, second.head.coef_)
    assert first.val_accuracy == second.val_accuracy
    assert first_metrics["accuracy"] == second_metrics["accuracy"]
    assert first_metrics["confusion_matrix"] == second_metrics["confusion_matrix"]


def test_a_crash_during_views_resumes_like_clean_rows(tmp_path, tiny_dataset, monkeypatch):
    """Every state a kill -9 could leave while views are being committed (between any two writes
    of the cache or its journal) opens as a complete commit, and the rerun ends as a clean run."""
    settings = {"augment.views": 2, "head.tta": "flip"}
    clean_config = tiny_config(tmp_path, tiny_dataset, **settings, **{"cache.dir": str(tmp_path / "clean")})
    run_extract(clean_config, progress=False, make_extractor=KeptExtractor)
    clean = view_content(clean_config)
    config = tiny_config(tmp_path, tiny_dataset, **settings, **{"cache.dir": str(tmp_path / "crashing")})
    states = []

    def snapshot():
        path = next((tmp_path / "crashing").glob("*.h5"), None)
        if path is not None:
            state = (path.name, path.read_bytes(),
                     journal.journal_path(path).read_bytes() if journal.journal_path(path).exists() else None)
            if not states or states[-1][1:] != state[1:]:
                states.append(state)

    snapshot_around_writes(monkeypatch, snapshot)
    run_extract(config, progress=False, make_extractor=KeptExtractor)
    monkeypatch.undo()
    half_way = [state for state in states if state[2] is not None]  # a journal exists: mid-commit
    assert len(half_way) > 20
    for number in np.linspace(0, len(half_way) - 1, 6).astype(int):
        name, cache_bytes, journal_bytes = half_way[number]
        where = tmp_path / f"crash{number}"
        where.mkdir()
        (where / name).write_bytes(cache_bytes)
        journal.journal_path(where / name).write_bytes(journal_bytes)
        crashed = tiny_config(tmp_path, tiny_dataset, **settings, **{"cache.dir": str(where)})
        with FeatureCache(where / name) as cache:  # opening rolls the half-done commit back
            kept = cache.view_index(RECIPE_ID)
            assert {key for key, _ in kept} <= set(cache.row_index()), "a view committed without its image"
        resumed = run_extract(crashed, progress=False, make_extractor=KeptExtractor)
        assert resumed.views_extracted == 72 - len(kept)
        content = view_content(crashed)
        assert content["views"].keys() == clean["views"].keys()
        for key, row in clean["views"].items():
            np.testing.assert_allclose(content["views"][key], row, rtol=1e-5, atol=1e-5, err_msg=f"crash {number}")


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_train_records_what_it_chose_and_report_scores_clean_rows(tmp_path, tiny_dataset, tta):
    config = tiny_config(tmp_path, tiny_dataset, **{"augment.views": 2, "head.tta": tta})
    run_extract(config, progress=False, make_extractor=KeptExtractor)
    result = run_train(config)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["features"]["views"] == 2 and info["features"]["tta"] == tta
    assert info["features"]["views_used"] == (3 if tta == "flip" else 2) * result.split_sizes["train"]
    assert {"C", "normalization", "view_weight"} <= set(info["params"])
    plain = run_train(tiny_config(tmp_path, tiny_dataset, **{"augment.views": 2, "head.tta": tta,
                                                             "head.logreg.view_weights": [0.0]}))
    assert result.val_accuracy >= plain.val_accuracy  # 0 is among the weights tried: never worse on validation
    _, metrics = run_report(result.run_dir)
    assert metrics["n_labeled"] == result.split_sizes["test"]


def test_pooled_blocks_are_their_own_cache_and_twice_as_wide(tmp_path, tiny_dataset):
    one = tiny_config(tmp_path, tiny_dataset)
    two = tiny_config(tmp_path, tiny_dataset, **{"backbone.pool_blocks": 2})
    first, second = (run_extract(config, progress=False, make_extractor=KeptExtractor) for config in (one, two))
    assert first.cache_path != second.cache_path
    with open_cache(one) as narrow, open_cache(two) as wide:
        assert wide.fingerprint["pooled_blocks"] == ["conv_pw_13_relu", "conv_pw_12_relu"]
        assert "pooled_blocks" not in narrow.fingerprint  # one-block caches keep their names
        assert wide.feature_dim == 2 * narrow.feature_dim
        keys = sorted(narrow.row_index())
        clean = narrow.read_features([narrow.row_index()[k] for k in keys])
        both = wide.read_features([wide.row_index()[k] for k in keys])
    np.testing.assert_allclose(both[:, :clean.shape[1]], clean, rtol=1e-4, atol=1e-4)  # the last block first

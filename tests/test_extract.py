"""Extract with the real Keras backbone: incremental, content-keyed, never stopped by a bad file.

A counting wrapper around the real FeatureExtractor shows how many images reach the
backbone; a small MobileNet with random weights keeps it fast.
"""

import os
import shutil
import subprocess
import sys

import numpy as np

from pipeline import backbones
from pipeline.extract import run_extract
from pipeline.features import dataset_from_config, match_cached, open_cache

from conftest import REPO, tiny_config, write_image
from pipeline_helpers import CountingExtractor


def _extract(config, **kwargs):
    counting = CountingExtractor()
    summary = run_extract(config, progress=False, make_extractor=counting, **kwargs)
    return summary, counting.images


def test_incremental_extract_runs_backbone_on_new_images_only(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset)
    summary, calls = _extract(config)
    assert (summary.extracted, calls, summary.failed) == (24, 24, [])
    assert summary.cache_path.is_file()

    counting = CountingExtractor()
    summary = run_extract(config, progress=False, make_extractor=counting)
    assert (summary.extracted, summary.reused, counting.images) == (0, 24, 0)
    assert counting.built == 0, "an unchanged dataset must not even build the backbone"

    for i in range(10):
        write_image(tiny_dataset / "owl" / f"new_{i}.png", seed=5000 + i)
    summary, calls = _extract(config)
    assert (summary.extracted, calls) == (10, 10)


def test_renamed_file_is_not_extracted_again_but_edited_one_is(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset)
    _extract(config)
    shutil.move(tiny_dataset / "cat" / "cat_0.png", tiny_dataset / "dog" / "moved.png")
    (tiny_dataset / "cat" / "cat_1.png").touch()
    os.utime(tiny_dataset / "cat" / "cat_1.png", (1, 1))
    summary, calls = _extract(config)
    assert calls == 0 and summary.extracted == 0
    write_image(tiny_dataset / "cat" / "cat_2.png", seed=9999)  # same path, new bytes
    summary, calls = _extract(config)
    assert calls == 1 and summary.extracted == 1
    with open_cache(config) as cache:
        cached = match_cached(dataset_from_config(config), cache)
        assert not cached.missing and len(cached.keys) == 24


def test_features_equal_a_direct_backbone_call(tmp_path, tiny_dataset):
    from pipeline import images

    config = tiny_config(tmp_path, tiny_dataset)
    _extract(config)
    path = tiny_dataset / "dog" / "dog_3.png"
    direct = backbones.FeatureExtractor(config.backbone)(images.decode_image(path.read_bytes(), 224)[None])[0]
    with open_cache(config) as cache:
        row = cache.row_index()[images.content_hash(path.read_bytes())]
        np.testing.assert_allclose(cache.read_features([row])[0], direct, rtol=1e-5, atol=1e-5)


def test_bad_image_is_recorded_and_never_stops_the_run(tmp_path, tiny_dataset):
    (tiny_dataset / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tiny_dataset / "dog" / "empty.png").write_bytes(b"")
    config = tiny_config(tmp_path, tiny_dataset)
    summary, calls = _extract(config)
    assert calls == 24 and summary.extracted == 24
    assert [path for path, _ in summary.failed] == ["cat/broken.jpg", "dog/empty.png"]
    assert "cat/broken.jpg" in summary.describe()
    summary, calls = _extract(config)  # failures are remembered, not retried
    assert calls == 0 and len(summary.failed) == 2


def test_unchanged_rerun_does_not_import_tensorflow(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset)
    _extract(config)
    args = ["extract", "--no-progress", "--set", f"data.root='{tiny_dataset}'", "--set",
            f"cache.dir='{tmp_path / 'cache'}'", "--set", "backbone.name=mobilenet", "--set",
            "backbone.alpha=0.25", "--set", "backbone.weights=random", "--set", "backbone.batch_size=8"]
    code = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "0 extracted, 24 already cached" in result.stdout

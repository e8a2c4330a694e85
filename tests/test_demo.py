"""The embedded default dataset: written once from scikit-learn's bundled digits, no download."""

from PIL import Image

from pipeline.config import load_config
from pipeline.dataset import discover
from pipeline.demo import ensure_digits

from conftest import REPO


def test_digits_are_written_once_as_class_folders(tmp_path):
    root = tmp_path / "digits"
    ensure_digits(root)
    dataset = discover(root)
    assert dataset.classes == [str(d) for d in range(10)]
    assert len(dataset.entries) == 1797
    with Image.open(dataset.entries[0].path) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    first = dataset.entries[0].path.stat().st_mtime_ns
    ensure_digits(root)
    assert dataset.entries[0].path.stat().st_mtime_ns == first, "an existing folder is left alone"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".digits-")], "no staging left behind"


def test_default_config_is_the_embedded_demo():
    config = load_config(REPO / "configs" / "default.toml")
    assert config.data.embedded == "digits" and config.backbone.name == "inception_v3"
    assert config.backbone.allow_random_fallback

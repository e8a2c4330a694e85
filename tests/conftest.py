"""Shared fixtures: real photos and real ImageNet weights from ../shared, tiny synthetic sets.

KERAS_HOME points at a temporary copy of ../shared/keras before Keras is imported, so
`weights="imagenet"` loads the real MobileNet files offline and nothing touches ~/.keras.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]

_keras_home = Path(tempfile.mkdtemp(prefix="keras-home-"))
if (SHARED / "keras").is_dir():
    shutil.copytree(SHARED / "keras", _keras_home, dirs_exist_ok=True)
os.environ["KERAS_HOME"] = str(_keras_home)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Randomised trials (kill -9 at random moments) draw from this one seed, printed in the
# header of every run; `PIPELINE_TEST_SEED=N make test` replays a failure.
TRIAL_SEED = int(os.environ.get("PIPELINE_TEST_SEED") or random.SystemRandom().randrange(2**32))


def pytest_report_header(config) -> str:
    return f"random trials: PIPELINE_TEST_SEED={TRIAL_SEED} (set it to replay them)"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the checkout (see README)")
    return path


@pytest.fixture(scope="session")
def flowers5() -> Path:
    return _require(SHARED / "datasets" / "flowers5")


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    return _require(SHARED / "datasets" / "hymenoptera")


@pytest.fixture(scope="session")
def keras_home() -> Path:
    _require(SHARED / "keras" / "models")
    return _keras_home


def write_image(path: Path, seed: int, size=(48, 40), fmt=None) -> Path:
    """A small photo-like image whose content depends on its seed (so hashes differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """Three classes of eight synthetic images each, in class folders."""
    from pipeline_helpers import class_folders

    return class_folders(tmp_path / "tiny", cat=8, dog=8, owl=8)


def tiny_config(tmp_path: Path, root: Path, **overrides):
    """A fast config: MobileNet v1 0.25 with random weights, caches and runs in tmp_path, on
    TensorFlow (so a test pays for an OpenVINO conversion only when it is about OpenVINO)."""
    from pipeline.config import load_config

    settings = {"data.root": str(root), "cache.dir": str(tmp_path / "cache"), "run.dir": str(tmp_path / "runs"),
                "backbone.name": "mobilenet", "backbone.alpha": 0.25, "backbone.weights": "random",
                "backbone.batch_size": 8, "backbone.runtime": "tensorflow", "data.val_percent": 25.0,
                "data.test_percent": 25.0}
    settings.update(overrides)
    return load_config(None, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items()])

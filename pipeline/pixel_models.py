"""Runs whose saved model takes pixels: the from-scratch CNN and the fine-tuned backbone.

Their features are not in any cache (the from-scratch CNN has no backbone, and a fine-tuned
backbone no longer computes what the frozen one cached), so every stage that scores them
decodes the images and runs the whole model. Their kinds are registered in `heads.REGISTRY`
with `takes_pixels`, and run.json says where the model is and what it takes:
`"model": {"file": "model.keras", "input_size": N}`; `report`, `predict` and `export` go by
those, not by the name of the run's kind.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .config import Config
from .dataset import ImageEntry
from .errors import DatasetError, ImageError, PipelineError
from .images import read_and_decode
from .runs import Run, RunInfo, Sample

MODEL_FILE = "model.keras"
PREDICT_BATCH = 64


def model_record(input_size: int) -> dict:
    """run.json's `model` entry for a run whose whole model is MODEL_FILE, pixels (n, size, size, 3) in."""
    return {"file": MODEL_FILE, "input_size": int(input_size)}


def whole_model(info: RunInfo) -> dict | None:
    """The run's `model` record, or None for a head on cached features.

    From-scratch runs written before the record existed hold only their image size.
    """
    from .heads import kind_of

    if not kind_of(info.head).takes_pixels:
        return None
    return info.model or model_record(info.params["image_size"])


class PixelModel:
    """A run's whole model as a `heads.Head`: pixels (n, size, size, 3) in 0..255 in, probabilities out.
    Trained by its own stage (`baseline`, `finetune`), never by `train`."""
    kind = "pixels"

    def __init__(self, model=None):
        self.model_ = model

    def fit(self, X, y, X_val=None, y_val=None, **options) -> "PixelModel":
        raise PipelineError("a whole model (pixels in) is trained by its own stage; fix: use `make baseline` or "
                            "`make finetune`")

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        return predict_pixels(self.model_, pixels)

    def save(self, directory: Path) -> None:
        self.model_.save(Path(directory) / MODEL_FILE)

    @classmethod
    def load(cls, directory: Path) -> "PixelModel":
        import keras

        return cls(keras.saving.load_model(Path(directory) / MODEL_FILE, safe_mode=True))

    def to_keras(self, pixels):
        return self.model_(pixels)


def load_model(run: Run):
    """The run's whole Keras model (pixels in)."""
    return PixelModel.load(run.dir).model_


def predict_pixels(model, pixels: np.ndarray) -> np.ndarray:
    """float64 probabilities from uint8 or float pixels, in batches."""
    if not len(pixels):
        return np.zeros((0, int(model.output_shape[-1])))
    return np.asarray(model.predict(np.asarray(pixels, np.float32), batch_size=PREDICT_BATCH, verbose=0), np.float64)


def decode_images(entries: Sequence[ImageEntry], size: int, config: Config, *,
                  progress: bool, desc: str = "decode") -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """relpath -> (content hash, pixels) from one read per file, and relpath -> why it failed.

    The hash is the cache's key, so splits match the transfer runs' image for image; the
    decoding is the backbones' own, so every kind of run sees the same pixels.
    """
    workers = config.extract.workers or os.cpu_count() or 1
    max_pixels = config.data.max_image_pixels

    def load(entry: ImageEntry):
        try:
            return entry.relpath, read_and_decode(entry.path, size, max_pixels=max_pixels), None
        except ImageError as exc:
            return entry.relpath, None, str(exc)

    decoded, failed = {}, {}
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        results = tqdm(pool.map(load, entries), total=len(entries), unit="img", desc=desc,
                       disable=not progress, dynamic_ncols=True, file=sys.stderr)
        for relpath, result, error in results:
            if error is None:
                decoded[relpath] = result
            else:
                failed[relpath] = error
    return decoded, failed


def sample_pixels(run: Run, samples: Sequence[Sample], image_root: Path | None, size: int, *, config: Config,
                  progress: bool = False, fix: str) -> np.ndarray:
    """uint8 pixels of a run's samples, re-read from the dataset folder and refused if any changed.

    A file whose content changed since training would be scored (or trained on) as something it
    was not. `fix` is the command that repairs it, for the error message.
    """
    if image_root is None:
        raise DatasetError(f"the images of run {run.dir} are not where its config.toml says "
                           f"(data.root = {run.config.data.root}); fix: restore the folder, or {fix}")
    entries = [ImageEntry(image_root / s.image, s.image, s.label, s.split) for s in samples]
    decoded, failed = decode_images(entries, size, config, progress=progress)
    changed = [s.image for s in samples if s.image in failed or decoded[s.image][0] != s.key]
    if changed:
        raise DatasetError(f"{len(changed)} image(s) of run {run.dir} are missing or changed since it was trained "
                           f"(e.g. {image_root / changed[0]}); fix: {fix}")
    if not samples:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([decoded[s.image][1] for s in samples])


def predict_samples(run: Run, samples: Sequence[Sample], image_root: Path | None, *,
                    progress: bool = False) -> np.ndarray:
    """Class probabilities of a whole-model run for these samples, re-read from the dataset folder.

    The report stage calls this where a head on cached features would read the cache.
    """
    if not samples:
        return np.zeros((0, len(run.labels)))
    size = whole_model(run.info)["input_size"]
    pixels = sample_pixels(run, samples, image_root, size, config=run.config, progress=progress,
                           fix="train the run again (`make baseline` or `make finetune`)")
    return predict_pixels(load_model(run), pixels)

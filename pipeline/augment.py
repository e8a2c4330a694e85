"""Augmented views of an image, computed once at extract time and cached beside its clean row.

A view is a pure function of (the image's bytes, the view index, the recipe): its random
numbers come from a NumPy generator seeded with the content hash and the index, and every
step is our own arithmetic on uint8 pixels (the integer resize of `images`), so a view is
the same on every run, with any number of decoding threads, on every machine. TensorFlow's
random ops are never used: their streams depend on the op's seed state and the device.

View 0 is the exact mirror image of the clean input, which `head.tta = "flip"` averages
with the clean row at scoring. Views 1, 2, ... are random: a random resized crop (taken
from a decoding at twice the input size, so a crop is not an upsampled blur), a horizontal
flip half the time, and mild colour jitter. The recipe's fingerprint names the group the
views are stored under in the cache, so views of a changed recipe are never mixed with
the old ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from . import images

MIRROR = 0  # the view index of the plain mirror image


@dataclass(frozen=True)
class ViewRecipe:
    """What a random view may do; any change gives new views (a new fingerprint)."""
    source_scale: int = 2  # crops are cut from a decoding at this multiple of the input size
    min_area: float = 0.35  # random resized crop: share of the image's area kept, from min_area to 1
    max_aspect: float = 4 / 3  # and its aspect ratio, from 1/max_aspect to max_aspect
    flip_probability: float = 0.5
    brightness: float = 0.2  # each jitter factor drawn from 1 - x .. 1 + x
    contrast: float = 0.2
    saturation: float = 0.2
    version: int = 1  # bump when the code below changes what a view looks like

    def fingerprint(self) -> dict:
        return {"recipe": "crop-flip-jitter", **asdict(self)}

    def fingerprint_id(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


RECIPE = ViewRecipe()


def wanted_views(count: int, tta: str) -> tuple[int, ...]:
    """The view indices a config needs: the mirror for flip TTA, and `count` random views."""
    return (*((MIRROR,) if tta == "flip" else ()), *range(1, count + 1))


def make_views(data: bytes, key: str, indices: tuple[int, ...], size: int, *, max_pixels: int,
               recipe: ViewRecipe = RECIPE) -> dict[int, np.ndarray]:
    """View index -> uint8 (size, size, 3) pixels, for an image's file bytes and content hash."""
    views: dict[int, np.ndarray] = {}
    if MIRROR in indices:
        views[MIRROR] = np.ascontiguousarray(images.decode_image(data, size, max_pixels=max_pixels)[:, ::-1])
    random_indices = [index for index in indices if index != MIRROR]
    if random_indices:
        source = images.decode_image(data, size * recipe.source_scale, max_pixels=max_pixels)
        for index in random_indices:
            views[index] = random_view(source, key, index, size, recipe)
    return views


def random_view(source: np.ndarray, key: str, index: int, size: int, recipe: ViewRecipe = RECIPE) -> np.ndarray:
    """One random view of a decoded square image; the same (key, index, recipe) gives the same pixels."""
    rng = np.random.default_rng([int(key[:16], 16), int(key[16:32], 16), index, recipe.version])
    side = source.shape[0]
    area = rng.uniform(recipe.min_area, 1.0)
    aspect = np.exp(rng.uniform(-np.log(recipe.max_aspect), np.log(recipe.max_aspect)))
    width = int(min(side, round(side * np.sqrt(area * aspect))))
    height = int(min(side, round(side * np.sqrt(area / aspect))))
    top = int(rng.integers(0, side - height + 1))
    left = int(rng.integers(0, side - width + 1))
    crop = source[top:top + height, left:left + width]
    if rng.uniform() < recipe.flip_probability:
        crop = crop[:, ::-1]
    view = images.resize(np.ascontiguousarray(crop), size)
    brightness, contrast, saturation = (rng.uniform(1 - x, 1 + x)
                                        for x in (recipe.brightness, recipe.contrast, recipe.saturation))
    return _jitter(view, brightness, contrast, saturation)


_LUMA = (0.299, 0.587, 0.114)


def _jitter(view: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Saturation, contrast and brightness, in float64 element-wise operations and exact integer
    sums only (no BLAS, no SIMD-ordered float reductions), so the pixels are the same everywhere."""
    channels = view.astype(np.float64)
    grey = _LUMA[0] * channels[..., 0] + _LUMA[1] * channels[..., 1] + _LUMA[2] * channels[..., 2]
    sums = view.reshape(-1, 3).sum(axis=0, dtype=np.int64)
    mean_grey = float(sum(weight * int(total) for weight, total in zip(_LUMA, sums))) / (view.size // 3)
    channels = grey[..., None] + saturation * (channels - grey[..., None])
    channels = mean_grey + contrast * (channels - mean_grey)
    return np.clip(np.rint(brightness * channels), 0, 255).astype(np.uint8)

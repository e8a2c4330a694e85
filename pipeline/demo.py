"""The embedded default dataset: scikit-learn's bundled handwritten digits as image files.

It ships inside scikit-learn, so the first README command runs with no download.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def ensure_digits(root: Path, *, size: int = 64) -> None:
    """Write the 1,797 digits as PNGs in class folders, once; atomic so a crash leaves none."""
    root = Path(root)
    if root.is_dir():
        return
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        for number, (pixels, target) in enumerate(zip(digits.images, digits.target)):
            folder = staging / str(target)
            folder.mkdir(exist_ok=True)
            image = Image.fromarray(np.uint8(255 - pixels * 255 / 16), mode="L")
            image.resize((size, size), Image.Resampling.NEAREST).save(folder / f"digit_{number:04d}.png")
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

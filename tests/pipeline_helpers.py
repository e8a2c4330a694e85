"""Helpers shared by the test modules: image encoders, tiny datasets, extractors that count or
are kept, wait loops, and the permission check that root does not get from the kernel."""

import contextlib
import errno
import io
import os
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import backbones, journal

from conftest import write_image

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 200, 0), (0, 0, 255), (240, 240, 0)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    """The bytes of `image` saved as `fmt` (PNG, JPEG, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """Four flat colours: any wrong rotation, flip or colour conversion is unmistakable."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2:] = GREEN
    pixels[height // 2:, : width // 2] = BLUE
    pixels[height // 2:, width // 2:] = YELLOW
    return Image.fromarray(pixels)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and CRC, for PNGs that Pillow would not write."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def class_folders(root: Path, name: str = "{label}_{i}.png", seed: int = 100, **sizes: int) -> Path:
    """`root/<label>/` folders of synthetic images, `sizes[label]` each; image i of the c-th label
    has seed `seed * c + i`, so that every image has content of its own."""
    for c, (label, size) in enumerate(sizes.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(size):
            write_image(root / label / name.format(label=label, i=i, c=c), seed=seed * c + i)
    return root


class CountingExtractor:
    """A `make_extractor` for extract and predict: the real FeatureExtractor, counting the batches it gets."""

    def __init__(self):
        self.batches: list[int] = []
        self.built = 0  # extractors made: 0 when the backbone was never needed

    def __call__(self, backbone_config):
        self.built += 1
        return _Counted(backbones.FeatureExtractor(backbone_config), self.batches)

    @property
    def images(self) -> int:
        return sum(self.batches)


class _Counted:
    def __init__(self, inner, batches: list[int]):
        self.inner, self.batches = inner, batches

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.batches.append(len(batch))
        return self.inner(batch)


def wait_for(condition, *, process: subprocess.Popen | None = None, log: Path | None = None,
             limit: float = 120.0) -> None:
    """Poll `condition` until it holds; fail (with the log's tail) if `process` ends first or `limit` passes."""
    deadline = time.monotonic() + limit
    while not condition():
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        if process is not None and process.poll() is not None and not condition():
            raise AssertionError(f"the process ended first: {tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing happened within {limit:g} s: {tail}")
        time.sleep(0.002)


class KeptExtractor:
    """The real extractor, built once per backbone setup for the whole test session and kept,
    so that a test can also run it on the pixels it expects."""

    built: dict = {}

    def __new__(cls, backbone):
        model = (backbone.name, backbone.alpha, backbone.weights, backbone.seed, backbone.precision,
                 backbone.pool_blocks)
        if model not in cls.built:
            cls.built[model] = backbones.FeatureExtractor(backbone)
        return cls.built[model]


def cli_args(config, *settings: str) -> list[str]:
    """`--set` arguments that give the command line the config of conftest's `tiny_config`,
    and then `settings` (key=value) on top."""
    given = {"data.root": repr(config.data.root), "cache.dir": repr(config.cache.dir), "run.dir": repr(config.run.dir),
             "backbone.name": config.backbone.name, "backbone.alpha": config.backbone.alpha,
             "backbone.weights": config.backbone.weights, "backbone.batch_size": config.backbone.batch_size,
             "data.val_percent": config.data.val_percent, "data.test_percent": config.data.test_percent}
    pairs = [f"{key}={value}" for key, value in given.items()] + list(settings)
    return [part for pair in pairs for part in ("--set", pair)]


@contextlib.contextmanager
def permissions_enforced():
    """chmod 000 stops every user but root, and CI runs as root: under root, reads of a file or
    folder without read permission fail here as the kernel fails them for anyone else
    (PermissionError at the read), so the "cannot read" paths are tested everywhere."""
    if os.geteuid() != 0:
        yield
        return
    read_bytes, scandir = Path.read_bytes, os.scandir

    def refused(path) -> None:
        if not os.stat(path).st_mode & 0o444:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def checked_read_bytes(self):
        refused(self)
        return read_bytes(self)

    def checked_scandir(path="."):
        refused(path)
        return scandir(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "read_bytes", checked_read_bytes)
        patch.setattr(os, "scandir", checked_scandir)
        yield


def snapshot_around_writes(monkeypatch, snapshot, journal_methods=()) -> None:
    """Call `snapshot` before and after every write the journal makes (and each named
    `JournaledFile` method): each state it sees is one that a kill -9 could leave."""

    def around(function):
        def wrapped(*args, **kwargs):
            snapshot()
            try:
                return function(*args, **kwargs)
            finally:
                snapshot()
        return wrapped

    monkeypatch.setattr(journal, "_write_all", around(journal._write_all))
    for name in journal_methods:
        monkeypatch.setattr(journal.JournaledFile, name, around(getattr(journal.JournaledFile, name)))

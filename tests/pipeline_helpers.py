"""Helpers shared by the bad-image, fault, concurrency and config-error tests."""

import contextlib
import errno
import os
from pathlib import Path

import pytest

from pipeline import backbones


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

"""Classifier heads trained on cached bottleneck features, with one shared contract.

A head is fitted on integer class indices (`fit(X, y, X_val, y_val)`), picks its own
hyperparameters on the validation split, returns class probabilities from
`predict_proba`, and saves itself as plain data (HDF5 or .keras, never pickle) into a
run directory. Heads never see images and never build the backbone.
"""

from __future__ import annotations

from pathlib import Path

from ..config import HeadConfig
from ..errors import ConfigError

HEAD_KINDS = ("logreg", "dense")


def trainable_kinds() -> list[str]:
    """The head kinds `train` fits on cached features: what head.kind may name."""
    return list(HEAD_KINDS)


def make_head(config: HeadConfig):
    if config.kind == "logreg":
        from .logreg import LogisticRegressionHead

        return LogisticRegressionHead(config.logreg)
    if config.kind == "dense":
        from .dense import DenseHead

        return DenseHead(config.dense)
    raise ConfigError(f"head.kind = {config.kind!r} is unknown; fix: use one of {', '.join(HEAD_KINDS)}")


def load_head(kind: str, directory: Path):
    if kind == "logreg":
        from .logreg import LogisticRegressionHead

        return LogisticRegressionHead.load(directory)
    if kind == "dense":
        from .dense import DenseHead

        return DenseHead.load(directory)
    raise ConfigError(f"{directory}: unknown head kind {kind!r}")

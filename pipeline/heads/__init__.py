"""Classifier heads, one contract (`Head`), and the registry of every kind of model a run holds.

A head trained on cached features is a scikit-learn classifier (see `base.FeatureHead`):
fitted on features (`fit(X, y)`, or `fit(X, y, X_val, y_val)` to pick its hyperparameters
on that validation split), returning class probabilities from `predict_proba`, saving
itself as plain data (HDF5 or .keras, never pickle) into a run directory, and turning
itself into Keras layers for the export (`to_keras`). Heads never see images and never
build the backbone.

REGISTRY holds one `HeadKind` per kind a run's `run.json` can name: the heads `train`
fits, and the models other stages train whose whole model takes pixels (the from-scratch
CNN, the fine-tuned backbone). Stages ask the record, never compare kind names: a new
head is one record here and its module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ..config import HeadConfig
from ..errors import ConfigError


@runtime_checkable
class Head(Protocol):
    kind: ClassVar[str]

    def fit(self, X, y, X_val=None, y_val=None, **options) -> "Head": ...

    def predict_proba(self, X) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...

    @classmethod
    def load(cls, directory: Path) -> "Head": ...

    def to_keras(self, features: Any) -> Any:
        """The head as Keras layers applied to a features tensor; returns the probabilities tensor."""


@dataclass(frozen=True)
class HeadKind:
    """Everything the stages need to know about one kind of model a run holds."""
    kind: str
    implementation: str  # "module:Class" under pipeline, imported on first use (Keras heads import TensorFlow)
    trained_by: str  # the command that makes a run of this kind
    config_key: str = ""  # its table under [head] when `train` fits it on cached features; "" for the others
    takes_pixels: bool = False  # its saved model takes pixels: scored on decoded images, never cached features
    transfer: bool = True  # False: learnt from the raw images alone (no backbone), the from-scratch baseline
    fine_tuned: bool = False  # the backbone's top was trained with the head
    shown_params: tuple[str, ...] = ()  # when set, only these params of its run.json are shown in tables

    def head_class(self) -> Any:
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(f"pipeline.{module}"), name)

    def load(self, directory: Path) -> Head:
        return self.head_class().load(Path(directory))


REGISTRY: dict[str, HeadKind] = {
    record.kind: record
    for record in (
        HeadKind("logreg", "heads.logreg:LogisticRegressionHead", "make train", config_key="logreg"),
        HeadKind("dense", "heads.dense:DenseHead", "make train SET=head.kind=dense", config_key="dense"),
        HeadKind("scratch_cnn", "pixel_models:PixelModel", "make baseline", takes_pixels=True, transfer=False,
                 shown_params=("image_size", "best_epoch")),
        HeadKind("finetuned", "pixel_models:PixelModel", "make finetune", takes_pixels=True, fine_tuned=True),
    )
}


def trainable_kinds() -> list[str]:
    """The head kinds `train` fits on cached features: what head.kind may name."""
    return [kind for kind, record in REGISTRY.items() if record.config_key]


def kind_of(name: str) -> HeadKind:
    """The record of a kind named in a run.json (or a config)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"head kind {name!r} is unknown; fix: use one of {', '.join(REGISTRY)}") from None


def make_head(config: HeadConfig) -> Head:
    """The head `config.kind` names, with the settings of its own table (head.logreg, head.dense)."""
    record = kind_of(config.kind)
    if not record.config_key:
        raise ConfigError(f"head.kind = {config.kind!r} is not trained on cached features; fix: use one of "
                          f"{', '.join(trainable_kinds())} (`{record.trained_by}` makes {config.kind} runs)")
    return record.head_class().from_config(getattr(config, record.config_key))


def load_head(kind: str, directory: Path) -> Head:
    """A run's model as its kind saved it in `directory`."""
    return kind_of(kind).load(directory)

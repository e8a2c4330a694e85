"""The train stage: a head on cached features only; rerun it as often as you like.

It never builds or runs the backbone and, for the logistic-regression head, never imports
TensorFlow: it reads the cache, assigns splits from content hashes and fits the head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import augment, stages
from .config import Config
from .errors import DatasetError
from .features import FeatureRows, labelled_samples, open_cache, scoring_features, training_views
from .heads import make_head
from .runs import RunInfo, Sample, new_run_dir, save_run


@dataclass
class TrainResult:
    head: object  # fitted, a heads.Head
    labels: list[str]
    split_sizes: dict[str, int]
    val_accuracy: float
    seconds: float
    samples: list[Sample] = field(default_factory=list)  # every image used, with its key, label and split
    info: RunInfo | None = None  # what run.json records
    warnings: list[str] = field(default_factory=list)  # one line each: empty classes, label conflicts
    config: Config | None = None
    run_dir: Path | None = None  # set once saved

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {v}" for k, v in self.split_sizes.items())
        params = ", ".join(f"{k}={v}" for k, v in self.head.params_.items())
        return (f"train: {self.head.kind} head on {len(self.labels)} classes ({sizes}); chosen {params}; "
                f"validation accuracy {self.val_accuracy:.4f} ({self.seconds:.1f} s)\nrun: {self.run_dir}")

    def save(self) -> Path:
        """Write the run directory (`runs/<dataset>/<time>-<backbone>-<head>/`); returns it."""
        self.run_dir = new_run_dir(self.config)
        self.head.save(self.run_dir)
        save_run(self.run_dir, self.config, self.labels, self.samples, self.info, self.head.history_)
        return self.run_dir


def run_train(config: Config) -> TrainResult:
    """The train stage: fit the configured head and save it as a run directory."""
    result = train(config)
    result.save()
    return result


def train(config: Config, head=None) -> TrainResult:
    """Fit a head (default: the one config.head describes) on the cached features, in memory;
    `.save()` on the result writes it as a run directory."""
    started = time.perf_counter()
    warnings: list[str] = []
    with open_cache(config) as cache:
        found = labelled_samples(config, cache)
        samples, labels, conflicts = found.samples, found.labels, found.conflicts
        class_of = found.class_of()
        rows = cache.row_index()
        data, keys, classes = {}, {}, {}  # classes: per split, in the order of keys (FeatureRows sorts its rows)
        for split in ("train", "val"):
            chosen = [s for s in samples if s.split == split and s.label is not None]
            if not chosen:
                raise DatasetError(f"the {split} split is empty; fix: add images or adjust data.val_percent")
            keys[split] = [s.key for s in chosen]
            labels_of = classes[split] = np.array([class_of[s.label] for s in chosen])
            if split == "val" and config.head.tta != "none":  # scored as the report will: clean and mirror
                data[split] = scoring_features(cache, keys[split], config.head.tta), labels_of
            else:
                rows_of = FeatureRows.of(cache, [rows[key] for key in keys[split]], labels_of)
                data[split] = rows_of, rows_of.labels
        view_indices = augment.wanted_views(config.augment.views, config.head.tta)
        key_of_row = {rows[key]: key for key in keys["train"]}
        identities = [key_of_row[row] for row in data["train"][0].rows]  # content hashes in the rows' order: the folds
        views = None
        if view_indices:  # each view knows its image's row among the training rows (sorted by cache row)
            positions = np.searchsorted(data["train"][0].rows, [rows[key] for key in keys["train"]])
            views = training_views(cache, keys["train"], classes["train"], view_indices, positions)
        fingerprint, cache_file = cache.fingerprint, str(cache.path)
    head = head if head is not None else make_head(config.head)
    if views is not None and not getattr(head, "learns_from_views", False):
        warnings.append(f"head.kind = {head.kind!r} does not use augmented views; fix: use head.kind = \"logreg\" "
                        "to let cross-validation decide whether views help")
        views = None
    # heads read (or stream) their splits from the cache themselves: a big split is never held twice
    (train_X, train_y), (val_X, val_y) = data["train"], data["val"]
    extras = {"views": views} if views else {}
    if getattr(head, "folds_by_identity", False):
        extras["groups"] = identities
    head.fit(train_X, train_y, val_X, val_y, n_classes=len(labels), **extras)
    val_chunks = val_X.chunks() if isinstance(val_X, FeatureRows) else [(val_X, val_y)]
    correct = sum(int(np.sum(head.predict_proba(X).argmax(1) == y)) for X, y in val_chunks)
    val_accuracy = correct / len(val_y)
    split_sizes = {split: sum(s.split == split for s in samples) for split in ("train", "val", "test")}
    seconds = time.perf_counter() - started
    info = RunInfo(head.kind, head.params_, val_accuracy, split_sizes, config.dataset_name, fingerprint, cache_file,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), failed_images=found.failed, label_conflicts=conflicts,
                   train_seconds=seconds,
                   features={"pool_blocks": config.backbone.pool_blocks, "views": config.augment.views,
                             "views_used": len(views) if views else 0,
                             "view_recipe": augment.RECIPE.fingerprint_id(), "tta": config.head.tta})
    return TrainResult(head, labels, split_sizes, val_accuracy, seconds, samples, info,
                       found.warnings + conflicts + warnings, config)


stages.callable_module(__name__, "pipeline.train:train")  # `from pipeline import train; train(...)`

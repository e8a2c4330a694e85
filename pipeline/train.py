"""The train stage: a head on cached features only; rerun it as often as you like.

It never builds or runs the backbone and, for the logistic-regression head, never imports
TensorFlow: it reads the cache, assigns splits from content hashes and fits the head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import augment
from .config import Config
from .dataset import assign_splits
from .errors import DatasetError
from .features import (FeatureRows, dataset_from_config, match_cached, open_cache, require_complete,
                       scoring_features, trainable, training_views)
from .heads import make_head
from .runs import new_run_dir, save_run


@dataclass
class TrainResult:
    run_dir: Path
    head: object
    labels: list[str]
    split_sizes: dict[str, int]
    val_accuracy: float
    seconds: float
    warnings: list[str] = field(default_factory=list)  # one line each: empty classes, label conflicts

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {v}" for k, v in self.split_sizes.items())
        params = ", ".join(f"{k}={v}" for k, v in self.head.params_.items())
        return (f"train: {self.head.kind} head on {len(self.labels)} classes ({sizes}); chosen {params}; "
                f"validation accuracy {self.val_accuracy:.4f} ({self.seconds:.1f} s)\nrun: {self.run_dir}")


def run_train(config: Config) -> TrainResult:
    started = time.perf_counter()
    warnings: list[str] = []
    dataset = dataset_from_config(config)
    with open_cache(config) as cache:
        cached = match_cached(dataset, cache)
        require_complete(cached)
        entries, conflicts = trainable(dataset, cached)
        if not entries:
            raise DatasetError(f"none of the {len(dataset.entries)} images can be used ({len(cached.failed)} could not "
                               f"be read or decoded, {len(conflicts)} label conflict(s)); fix: see what `make extract` "
                               "lists and warns about")
        splits = assign_splits(entries, cached.keys, val_percent=config.data.val_percent,
                               test_percent=config.data.test_percent)
        labels = sorted({e.label for e in entries if e.label is not None})
        class_of = {label: i for i, label in enumerate(labels)}
        rows = cache.row_index()
        samples = [{"image": e.relpath, "key": cached.keys[e.relpath], "label": e.label, "split": splits[e.relpath]}
                   for e in entries if e.relpath in splits]
        data, keys = {}, {}
        for split in ("train", "val"):
            chosen = [s for s in samples if s["split"] == split and s["label"] is not None]
            if not chosen:
                raise DatasetError(f"the {split} split is empty; fix: add images or adjust data.val_percent")
            keys[split] = [s["key"] for s in chosen]
            labels_of = [class_of[s["label"]] for s in chosen]
            if split == "val" and config.head.tta != "none":  # scored as the report will: clean and mirror
                data[split] = scoring_features(cache, keys[split], config.head.tta), np.array(labels_of)
            else:
                rows_of = FeatureRows.of(cache, [rows[key] for key in keys[split]], labels_of)
                data[split] = rows_of, rows_of.labels
        view_indices = augment.wanted_views(config.augment.views, config.head.tta)
        views = training_views(cache, keys["train"], np.array([class_of[s["label"]] for s in samples
                                                               if s["split"] == "train" and s["label"] is not None]),
                               view_indices) if view_indices else None
        fingerprint, cache_file = cache.fingerprint, str(cache.path)
    head = make_head(config.head)
    if views is not None and not getattr(head, "learns_from_views", False):
        warnings.append(f"head.kind = {head.kind!r} does not use augmented views; fix: use head.kind = \"logreg\" "
                        "to let validation decide whether views help")
        views = None
    # heads read (or stream) their splits from the cache themselves: a big split is never held twice
    (train_X, train_y), (val_X, val_y) = data["train"], data["val"]
    head.fit(train_X, train_y, val_X, val_y, n_classes=len(labels), **({"views": views} if views else {}))
    val_chunks = val_X.chunks() if isinstance(val_X, FeatureRows) else [(val_X, val_y)]
    correct = sum(int(np.sum(head.predict_proba(X).argmax(1) == y)) for X, y in val_chunks)
    val_accuracy = correct / len(val_y)
    split_sizes = {split: sum(s["split"] == split for s in samples) for split in ("train", "val", "test")}
    seconds = time.perf_counter() - started
    run_dir = new_run_dir(config)
    head.save(run_dir)
    info = {"head": head.kind, "params": head.params_, "val_accuracy": val_accuracy, "split_sizes": split_sizes,
            "failed_images": len(cached.failed), "label_conflicts": conflicts, "fingerprint": fingerprint,
            "cache": cache_file, "dataset": config.dataset_name, "train_seconds": seconds,
            "features": {"pool_blocks": config.backbone.pool_blocks, "views": config.augment.views,
                         "views_used": len(views[1]) if views else 0, "view_recipe": augment.RECIPE.fingerprint_id(),
                         "tta": config.head.tta},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_run(run_dir, config, labels, samples, info, head.history_)
    return TrainResult(run_dir, head, labels, split_sizes, val_accuracy, seconds, dataset.warnings + conflicts + warnings)

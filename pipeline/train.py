"""The train stage: a head on cached features only; rerun it as often as you like.

It never builds or runs the backbone and, for the logistic-regression head, never imports
TensorFlow: it reads the cache, assigns splits from content hashes and fits the head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config
from .dataset import assign_splits
from .errors import DatasetError
from .features import FeatureRows, dataset_from_config, match_cached, open_cache, require_complete, trainable
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
        data = {}
        for split in ("train", "val"):
            chosen = [s for s in samples if s["split"] == split and s["label"] is not None]
            if not chosen:
                raise DatasetError(f"the {split} split is empty; fix: add images or adjust data.val_percent")
            data[split] = FeatureRows.of(cache, [rows[s["key"]] for s in chosen], [class_of[s["label"]] for s in chosen])
        fingerprint, cache_file = cache.fingerprint, str(cache.path)
    # heads read (or stream) their splits from the cache themselves: a big split is never held twice
    train_rows, val_rows = data["train"], data["val"]
    head = make_head(config.head).fit(train_rows, train_rows.labels, val_rows, val_rows.labels, n_classes=len(labels))
    correct = sum(int(np.sum(head.predict_proba(X).argmax(1) == y)) for X, y in val_rows.chunks())
    val_accuracy = correct / len(val_rows)
    split_sizes = {split: sum(s["split"] == split for s in samples) for split in ("train", "val", "test")}
    seconds = time.perf_counter() - started
    run_dir = new_run_dir(config)
    head.save(run_dir)
    info = {"head": head.kind, "params": head.params_, "val_accuracy": val_accuracy, "split_sizes": split_sizes,
            "failed_images": len(cached.failed), "label_conflicts": conflicts, "fingerprint": fingerprint,
            "cache": cache_file, "dataset": config.dataset_name, "train_seconds": seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_run(run_dir, config, labels, samples, info, head.history_)
    return TrainResult(run_dir, head, labels, split_sizes, val_accuracy, seconds, dataset.warnings + conflicts)

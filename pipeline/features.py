"""Joins a dataset with its cache: which images are cached, under which content hash.

Every stage after extract goes through here, and none of it needs the backbone: a file is
matched to its cached row by path, size, mtime and ctime, so nothing is re-hashed or re-decoded.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from . import augment, backbones, demo
from .cache import FeatureCache, cache_path
from .config import Config
from .dataset import Dataset, ImageEntry, assign_splits, discover, shown
from .errors import CacheError, DatasetError
from .runs import Sample


def dataset_from_config(config: Config) -> Dataset:
    data = config.data
    if data.embedded == "digits":
        demo.ensure_digits(Path(data.root))
    map_files = {split: Path(path) for split, path in (
        ("all", data.map_file), ("train", data.train_map), ("val", data.val_map), ("test", data.test_map)) if path}
    return discover(data.root, layout=data.layout, map_files=map_files or None,
                    allow_outside_root=data.allow_outside_root,
                    ignore=[Path(config.cache.dir).resolve(), Path(config.run.dir).resolve()])


def open_cache(config: Config) -> FeatureCache:
    """The cache this config's extract wrote; a clear error when there is none yet."""
    fp = backbones.fingerprint(config)
    if fp is None and config.backbone.allow_random_fallback:
        backbones.warn_random_weights(f"no ImageNet weights for {config.backbone.name} on this machine")
        fp = backbones.fingerprint(backbones.with_random_weights(config))
    if fp is None:
        raise CacheError(f"no ImageNet weights for {config.backbone.name} on this machine, so nothing can "
                         "have been extracted with them; fix: run `make extract` first")
    path = cache_path(config.cache.dir, config.dataset_name, fp)
    if not path.exists():  # a wrong data.root also names a cache that is not there: say the cause first
        dataset_from_config(config)
    return FeatureCache(path, fp)


@dataclass
class CachedImages:
    keys: dict[str, str]  # relpath -> content hash, for images with a feature row
    failed: dict[str, str]  # relpath -> why it could not be decoded
    missing: list[str]  # relpaths the cache has not seen in their current state


def match_cached(dataset: Dataset, cache: FeatureCache) -> CachedImages:
    index, rows, failures = cache.file_index(), cache.row_index(), cache.failures()
    result = CachedImages({}, {}, [])
    for entry in dataset.entries:
        record = index.get(entry.relpath)
        try:
            current = record is not None and record.matches(os.stat(entry.path))
        except OSError:
            current = False
        if current and record.key in rows:
            result.keys[entry.relpath] = record.key
        elif current and record.key in failures:
            result.failed[entry.relpath] = failures[record.key][1]
        else:
            result.missing.append(entry.relpath)
    return result


def require_complete(cached: CachedImages) -> None:
    """Training on a partly extracted dataset would silently drop images: refuse instead."""
    if cached.missing:
        example = cached.missing[0]
        raise DatasetError(f"{len(cached.missing)} image(s) are new or changed since the last extract "
                           f"(e.g. {example}); fix: run `make extract` with the same config first")


def label_conflicts(entries: Iterable[ImageEntry], keys: Mapping[str, str]) -> dict[str, list[ImageEntry]]:
    """Content hash -> its copies, for identical images filed under more than one label.

    No head can learn both labels for one image, and a split by content hash keeps the copies
    together, so they would be scored against each other: train leaves them out.
    """
    copies: dict[str, list[ImageEntry]] = defaultdict(list)
    for entry in entries:
        if entry.label is not None and entry.relpath in keys:
            copies[keys[entry.relpath]].append(entry)
    return {key: group for key, group in copies.items() if len({entry.label for entry in group}) > 1}


def describe_conflict(group: list[ImageEntry]) -> str:
    filed = " and ".join(f"{shown(entry.relpath)} ({shown(entry.label)})" for entry in group)
    return f"label conflict: one image is filed as {filed}; it is left out of training; fix: delete the wrong copy"


def trainable(dataset: Dataset, cached: CachedImages) -> tuple[list[ImageEntry], list[str]]:
    """The images train uses (cached, not in a label conflict), and one warning per conflict."""
    conflicts = label_conflicts(dataset.entries, cached.keys)
    entries = [entry for entry in dataset.entries
               if entry.relpath in cached.keys and cached.keys[entry.relpath] not in conflicts]
    return entries, [describe_conflict(group) for group in conflicts.values()]


@dataclass
class SampleSet:
    """What train learns from: every usable image with its content hash, label and split, and the classes."""
    samples: list[Sample]  # as samples.jsonl stores them
    labels: list[str]  # class names, in the order of a head's outputs
    conflicts: list[str]  # one warning per image filed under two labels (left out)
    failed: int  # images that could not be decoded
    warnings: list[str]  # the dataset's own (empty classes, ...)

    def class_of(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def labelled_samples(config: Config, cache: FeatureCache) -> SampleSet:
    """The config's images joined with its cache and split by content hash, as train and
    load_features both see them; refused when extract has not seen every image yet."""
    dataset = dataset_from_config(config)
    cached = match_cached(dataset, cache)
    require_complete(cached)
    entries, conflicts = trainable(dataset, cached)
    if not entries:
        raise DatasetError(f"none of the {len(dataset.entries)} images can be used ({len(cached.failed)} could not "
                           f"be read or decoded, {len(conflicts)} label conflict(s)); fix: see what `make extract` "
                           "lists and warns about")
    splits = assign_splits(entries, cached.keys, val_percent=config.data.val_percent,
                           test_percent=config.data.test_percent)
    samples = [Sample(e.relpath, cached.keys[e.relpath], e.label, splits[e.relpath]) for e in entries
               if e.relpath in splits]
    labels = sorted({e.label for e in entries if e.label is not None})
    return SampleSet(samples, labels, conflicts, len(cached.failed), list(dataset.warnings))


@dataclass
class Split:
    """One split's cached features: X (n, d) float32, y (n,) class indices, and the images they are."""
    X: np.ndarray
    y: np.ndarray
    samples: list[Sample]


@dataclass
class Features:
    """Per split, the features a head trains and is scored on, as train and report read them."""
    labels: list[str]
    splits: dict[str, Split]
    root: Path  # the dataset folder that samples' "image" paths are relative to

    def __getitem__(self, split: str) -> Split:
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(f"no {split!r} split here; this dataset has {', '.join(self.splits)}") from None


def load_features(config: Config, splits: Iterable[str] = ("train", "val", "test")) -> Features:
    """Every labelled image's cached features per split, in memory: what a notebook fits
    scikit-learn estimators on (the heads included). Rows are clean features, or with
    head.tta = "flip" each averaged with its mirror's, as the report scores them. Splits
    without images are left out. Reads the cache only: run `extract` first."""
    with open_cache(config) as cache:
        found = labelled_samples(config, cache)
        class_of = found.class_of()
        result = {}
        for split in splits:
            chosen = [s for s in found.samples if s.split == split and s.label is not None]
            if chosen:
                X = scoring_features(cache, [s.key for s in chosen], config.head.tta)
                result[split] = Split(X, np.array([class_of[s.label] for s in chosen]), chosen)
    return Features(found.labels, result, Path(config.data.root))


CHUNK_ROWS = 8192  # rows per read when streaming a split: 40 MiB of float32 at 1,280-d


@dataclass(frozen=True)
class FeatureRows:
    """One split's feature rows in a cache file, with their class indices, read on demand.

    Heads get this instead of an array so that none of them needs several copies of a big
    split: `read()` fills one preallocated float32 array chunk by chunk (no float64 upcast),
    and `chunks()` streams shuffled chunks, so a head trained on it needs memory flat in N.
    """
    cache_path: Path
    fingerprint: dict
    rows: np.ndarray  # row numbers in the cache, ascending (so that chunks read contiguous slabs)
    labels: np.ndarray  # class index of each row, aligned with `rows`
    feature_dim: int

    @classmethod
    def of(cls, cache: FeatureCache, rows, labels) -> "FeatureRows":
        rows, labels = np.asarray(rows, np.int64), np.asarray(labels, np.int64)
        order = np.argsort(rows, kind="stable")
        return cls(cache.path, cache.fingerprint, rows[order], labels[order], cache.feature_dim)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """The size of the whole split as a float32 matrix."""
        return len(self.rows) * self.feature_dim * 4

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole split: one float32 array, read in chunks straight into place."""
        with FeatureCache(self.cache_path, self.fingerprint) as cache:
            return cache.read_features(self.rows), self.labels

    def chunks(self, chunk_rows: int = CHUNK_ROWS, seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(X, y) chunks of at most `chunk_rows`; with a seed, chunks in shuffled order and rows
        shuffled within each, which is as good as a full shuffle for minibatch training."""
        rng = np.random.default_rng(seed) if seed is not None else None
        starts = np.arange(0, len(self.rows), chunk_rows)
        if rng is not None:
            rng.shuffle(starts)
        with FeatureCache(self.cache_path, self.fingerprint) as cache:
            for start in starts:
                X = cache.read_features(self.rows[start:start + chunk_rows])
                y = self.labels[start:start + chunk_rows]
                if rng is not None:
                    mix = rng.permutation(len(y))
                    X, y = X[mix], y[mix]
                yield X, y

    def moments(self, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and variance, accumulated in float64 over chunks (Chan et al.)."""
        count, mean, m2 = 0, np.zeros(self.feature_dim), np.zeros(self.feature_dim)
        for X, _ in self.chunks(chunk_rows):
            n = len(X)
            chunk_mean = X.mean(axis=0, dtype=np.float64)
            chunk_m2 = ((X - chunk_mean.astype(np.float32)) ** 2).sum(axis=0, dtype=np.float64)
            delta = chunk_mean - mean
            total = count + n
            mean = mean + delta * n / total
            m2 = m2 + chunk_m2 + delta ** 2 * count * n / total
            count = total
        return mean, m2 / max(count, 1)


def scoring_features(cache: FeatureCache, keys: list[str], tta: str) -> np.ndarray:
    """The rows a head scores: clean ones, or with flip TTA each clean row averaged with its mirror's.

    Held-out images are always scored from their clean rows (and mirror); random views never are.
    """
    rows = cache.row_index()
    clean = cache.read_features([rows[key] for key in keys])
    if tta == "none":
        return clean
    recipe_id = augment.RECIPE.fingerprint_id()
    views = cache.view_index(recipe_id)
    missing = [key for key in keys if (key, augment.MIRROR) not in views]
    if missing:
        raise CacheError(f"{len(missing)} image(s) have no mirrored view in {cache.path} for head.tta = \"flip\"; "
                         "fix: run `make extract` with head.tta = \"flip\" (it adds only the mirrored views)")
    mirrored = cache.read_view_features(recipe_id, [views[(key, augment.MIRROR)] for key in keys])
    return (clean + mirrored) / 2


@dataclass(frozen=True)
class TrainingViews:
    """Augmented views of training images, as a head learns from them: one row per view, its
    class, and the training row it is a view of (so that cross-validation keeps an image's
    views in its own fold)."""
    features: np.ndarray  # (n_views, d) float32
    labels: np.ndarray  # (n_views,) class indices
    sources: np.ndarray  # (n_views,) the row of the training rows each view is of

    def __len__(self) -> int:
        return len(self.labels)


def training_views(cache: FeatureCache, keys: list[str], classes: np.ndarray, indices: tuple[int, ...],
                   positions: np.ndarray | None = None) -> TrainingViews:
    """Feature rows and classes of the given views of training images (never of validation or test
    ones); `positions` are the keys' rows among the training rows the head gets (default: their order)."""
    recipe_id = augment.RECIPE.fingerprint_id()
    views = cache.view_index(recipe_id) if indices else {}
    positions = np.arange(len(keys)) if positions is None else np.asarray(positions, np.int64)
    wanted = [(key, index, label, position) for key, label, position in zip(keys, classes, positions)
              for index in indices]
    missing = [key for key, index, *_ in wanted if (key, index) not in views]
    if missing:
        raise CacheError(f"{len(set(missing))} training image(s) lack some of their {len(indices)} view(s) in "
                         f"{cache.path}; fix: run `make extract` with the same augment.views and head.tta")
    features = cache.read_view_features(recipe_id, [views[(key, index)] for key, index, *_ in wanted])
    return TrainingViews(features, np.array([label for _, _, label, _ in wanted], dtype=np.int64),
                         np.array([position for *_, position in wanted], dtype=np.int64))

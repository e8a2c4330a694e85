"""The extract stage: every image once through the frozen backbone, into the cache.

Only what the cache lacks is computed. A file whose path, size and mtime match the index
is not even re-read; a renamed or touched file is re-hashed but not re-decoded; only new
content reaches the backbone. Decoding runs in a thread pool ahead of inference, so the
backbone (which releases the GIL) is kept busy. Each batch is one journaled commit, written
by a commit thread while the backbone computes the next batch (one commit in flight at a
time, in order), so a crash loses at most the two batches in flight.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Container, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from . import augment, backbones, execution, images, stages
from .cache import CacheWriter, FileRecord, ViewRows, cache_path
from .config import Config
from .dataset import ImageEntry, assign_splits, shown
from .errors import ConfigError, DatasetError, ImageError
from .features import dataset_from_config, match_cached, trainable

_INDEX_COMMIT_EVERY = 4096  # index-only entries (renamed files) are committed in groups


@dataclass
class ExtractSummary:
    cache_path: Path
    total: int
    extracted: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason), all current failures
    seconds: float = 0.0
    backbone_batches: int = 0
    warnings: list[str] = field(default_factory=list)  # one line each: empty classes, label conflicts, ...
    failed_shards: list[str] = field(default_factory=list)  # Dask engine: one line per shard that kept failing
    execution: str = ""  # how the backbone ran, and why that way (measured, remembered, forced)
    hint: str = ""  # a faster setting this machine allows, in one line
    views_per_image: int = 0  # views each image has in the cache (augment.views, and the mirror for flip TTA)
    views_extracted: int = 0

    def describe(self) -> str:
        rate = f", {self.extracted / self.seconds:.1f} img/s" if self.extracted and self.seconds else ""
        lines = [f"extract: {self.total} images: {self.extracted} extracted, {self.reused} already cached, "
                 f"{len(self.failed)} failed ({self.seconds:.1f} s{rate})", f"cache: {self.cache_path}"]
        if self.views_per_image:
            lines.insert(1, f"extract: {self.views_per_image} view(s) per image: {self.views_extracted} extracted, "
                            "the rest already cached")
        if self.execution:
            lines.append(self.execution)
        if self.hint:
            lines.append(self.hint)
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) could not be used and are left out:")
            lines += [f"  {shown(path)}: {reason}" for path, reason in self.failed[:20]]
            if len(self.failed) > 20:
                lines.append(f"  ... and {len(self.failed) - 20} more (all recorded in the cache under /failures)")
        if self.failed_shards:
            lines.append(f"{len(self.failed_shards)} shard(s) kept failing; every other shard was merged:")
            lines += [f"  {line}" for line in self.failed_shards]
            lines.append(f"extract: incomplete, {len(self.failed_shards)} shard(s) failed; fix: see why above, "
                         "then run extract again, which computes only what is missing")
        else:
            lines.append(f"extract: completed, {len(self.failed)} skipped" if self.failed else "extract: completed")
        return "\n".join(lines)


@dataclass
class Loaded:
    entry: ImageEntry
    record: FileRecord
    image: np.ndarray | None = None  # None when the content is already cached
    error: str | None = None
    views: dict[int, np.ndarray] = field(default_factory=dict)  # view index -> pixels, for views not cached yet


def run_extract(config: Config, *, rebuild: bool = False, progress: bool = True,
                make_extractor: Callable | None = None) -> ExtractSummary:
    started = time.perf_counter()
    make_extractor = make_extractor or functools.partial(backbones.FeatureExtractor, cache_dir=config.cache.dir)
    dataset = dataset_from_config(config)
    config = backbones.resolve_weights(config)
    fp = backbones.fingerprint(config)
    extractor = None
    if fp is None:  # ImageNet weights not downloaded yet: building the model fetches them
        extractor = make_extractor(config.backbone)
        fp = backbones.fingerprint(config)
    path = cache_path(config.cache.dir, config.dataset_name, fp)
    with CacheWriter(path, fp, dtype=config.cache.dtype, rebuild=rebuild) as cache:
        summary = ExtractSummary(path, total=len(dataset.entries) + len(dataset.skipped))
        views = ViewNeeds(augment.wanted_views(config.augment.views, config.head.tta), cache)
        summary.views_per_image = len(views.wanted)
        if config.extract.engine == "dask":  # imports Dask (and starts a cluster) only when there is work
            from .dask_engine import extract_on_dask

            if views.wanted:
                raise ConfigError("augment.views and head.tta = \"flip\" are extracted by the local engine only; "
                                  "fix: run this extract with --set extract.engine=local (later runs keep the views)")

            extract_on_dask(config, fp, cache, dataset.entries, summary, progress=progress)
        else:
            stale, index, known = stale_files(dataset.entries, cache, views)
            summary.reused = len(dataset.entries) - len(stale)

            def get_extractor():
                nonlocal extractor
                if extractor is None:
                    extractor = make_extractor(config.backbone)
                    extractor.expect(len(stale) * (1 + len(views.wanted)))
                cache.ensure_feature_dim(extractor.feature_dim)
                return extractor

            bar = tqdm(total=len(stale), unit="img", desc="extract", disable=not progress or not stale,
                       dynamic_ncols=True, file=sys.stderr)
            counts = extract_files(stale, cache, config, known=known, index=index, get_extractor=get_extractor,
                                   on_image=bar.update, views=views, bar=bar)
            bar.close()
            summary.extracted, summary.backbone_batches = counts.extracted, counts.backbone_batches
            summary.views_extracted = counts.views_extracted
            summary.reused += counts.reused
            summary.execution = getattr(extractor, "description", "")
            summary.hint = backbones.bfloat16_hint(config.backbone) if summary.extracted else ""
        if summary.extracted or summary.views_extracted:
            cache.add_extract_timing(time.perf_counter() - started, summary.extracted)
        cached = match_cached(dataset, cache)
    summary.failed = sorted([*cached.failed.items(), *dataset.skipped])
    entries, conflicts = trainable(dataset, cached)
    summary.warnings = dataset.warnings + conflicts
    try:  # a class too small to split fails train: say so now, not after the next extract
        assign_splits(entries, cached.keys, val_percent=config.data.val_percent, test_percent=config.data.test_percent)
    except DatasetError as exc:
        summary.warnings.append(f"train will refuse this dataset: {exc}")
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass
class ExtractCounts:
    extracted: int = 0  # new feature rows committed
    reused: int = 0  # stale files whose content turned out to be cached already
    backbone_batches: int = 0
    views_extracted: int = 0


class ViewNeeds:
    """Which augmented views the config wants, and which the cache already holds."""

    def __init__(self, wanted: tuple[int, ...], cache):
        self.wanted, self.recipe = wanted, augment.RECIPE
        self.done = set(cache.view_index(self.recipe.fingerprint_id())) if wanted else set()
        self.rows = set(cache.row_index()) if wanted else set()  # content with a clean row

    def missing(self, key: str) -> tuple[int, ...]:
        return tuple(index for index in self.wanted if (key, index) not in self.done)


def stale_files(entries: Iterable[ImageEntry], cache, views: ViewNeeds | None = None
                ) -> tuple[list[tuple[ImageEntry, os.stat_result | None]], dict[str, FileRecord], set[str]]:
    """The entries the cache's stat index cannot vouch for (new, changed, missing wanted views, or to
    be re-checked), with their stat; and the index and the known keys (nothing left to compute: rows
    with all their wanted views, and failures) they were judged by."""
    index, rows, failures = cache.file_index(), cache.row_index(), cache.failures()
    known = {key for key in rows if views is None or not views.missing(key)} | set(failures)
    stale = [(entry, stat) for entry in entries
             if (stat := _stat(entry.path)) is None or not _is_current(index.get(entry.relpath), stat, known)]
    return stale, index, known


def extract_files(jobs: Iterable[tuple[ImageEntry, os.stat_result | None]], sink, config: Config, *,
                  known: Container[str], index: Mapping[str, FileRecord], get_extractor: Callable,
                  on_image: Callable[[], object] = lambda: None, views: ViewNeeds | None = None,
                  bar=None) -> ExtractCounts:
    """Read, hash, decode and extract `jobs` into `sink` (a CacheWriter, or a shard file that has
    its `commit`), one batch per commit. Content in `known` or extracted earlier here is not
    computed again; `index` (path -> record) keeps a re-checked failure from being indexed twice.
    With `views`, the wanted views each content lacks go into the same commits as its clean row."""
    counts = ExtractCounts()
    added: set[str] = set()
    size = backbones.get_spec(config.backbone.name).input_size
    load = make_loader(size, config.data.max_image_pixels, _Either(known, added),
                       views if views is not None and views.wanted else None)
    pending_pixels = 0  # images waiting for the backbone in `batch`: clean ones and views
    workers = config.extract.workers or execution.usable_cores()
    batch: list[Loaded] = []
    pending_files: list[tuple[str, FileRecord]] = []
    pending_failures: list[tuple[str, str, str]] = []

    def is_known(key: str) -> bool:
        return key in added or key in known

    in_flight = []  # the commit being written while the backbone runs: at most one
    backbone = None  # the extractor, got for the first batch of pixels

    def finish_commit():
        """Wait for the commit in flight; its error, if any, is raised here as it was there."""
        while in_flight:
            in_flight.pop().result()

    def commit():
        nonlocal backbone
        if not (batch or pending_files or pending_failures):
            return
        fresh = {}
        for item in batch:  # the same new content twice in one batch is computed once
            fresh.setdefault(item.record.key, item)
        keys = [key for key, item in fresh.items() if item.image is not None]
        view_ids = [(key, index) for key, item in fresh.items() for index in sorted(item.views)]
        pixels = [fresh[key].image for key in keys] + [fresh[key].views[index] for key, index in view_ids]
        feature_rows = np.zeros((0, 0), np.float32)
        if pixels:  # in backbone batches: a photo with its views is more than one image
            if backbone is None:
                finish_commit()  # getting the model may create the feature dataset: no commit may be writing
                backbone = get_extractor()
            step = config.backbone.batch_size
            feature_rows = np.concatenate([backbone(np.stack(pixels[start:start + step]))
                                           for start in range(0, len(pixels), step)])
            counts.backbone_batches += -(-len(pixels) // step)
        files = pending_files + [(item.entry.relpath, item.record) for item in batch]
        view_rows = None
        if view_ids:
            view_rows = ViewRows(views.recipe.fingerprint(), [key for key, _ in view_ids],
                                 [index for _, index in view_ids], feature_rows[len(keys):])
            views.done.update(view_ids)
            views.rows.update(keys)
        finish_commit()
        in_flight.append(committer.submit(sink.commit, keys, feature_rows[:len(keys)], files, list(pending_failures),
                                          **({"views": view_rows} if view_rows is not None else {})))
        added.update(fresh)
        added.update(key for key, _, _ in pending_failures)
        counts.extracted += len(keys)
        counts.views_extracted += len(view_ids)
        counts.reused += sum(item.image is None for item in fresh.values())  # only views were missing
        batch.clear(), pending_files.clear(), pending_failures.clear()

    with ThreadPoolExecutor(1, thread_name_prefix="commit") as committer, \
            ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        for item in images.prefetch(pool, load, jobs, depth=4 * config.backbone.batch_size):
            if item.error is not None:
                if not is_known(item.record.key):
                    pending_failures.append((item.record.key, item.entry.relpath, item.error))
                if index.get(item.entry.relpath) != item.record:  # re-checked failures stay one entry
                    pending_files.append((item.entry.relpath, item.record))
            elif (item.image is None and not item.views) or is_known(item.record.key):
                counts.reused += 1
                pending_files.append((item.entry.relpath, item.record))
            else:
                batch.append(item)
                pending_pixels += (item.image is not None) + len(item.views)
            if pending_pixels >= config.backbone.batch_size or len(pending_files) >= _INDEX_COMMIT_EVERY:
                commit()
                pending_pixels = 0
            on_image()
            if bar is not None and views is not None and views.wanted:
                bar.set_postfix(views=counts.views_extracted, refresh=False)
        commit()
        finish_commit()
    return counts


class _Either:
    """`key in` two containers, without copying either."""

    def __init__(self, first: Container[str], second: Container[str]):
        self.first, self.second = first, second

    def __contains__(self, key) -> bool:
        return key in self.second or key in self.first


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _is_current(record: FileRecord | None, stat: os.stat_result, known: set[str]) -> bool:
    return (record is not None and record.key in known and not record.key.startswith(_RECHECK)
            and record.matches(stat))


_RECHECK = "!"  # starts the key of a failure that depends on the machine or the config, not the bytes


def _recheck_key(*reason) -> str:
    """Such a failure is recorded (train leaves the file out) but tried again on every run."""
    return _RECHECK + hashlib.sha256(":".join(map(str, reason)).encode()).hexdigest()[:63]


def make_loader(size: int, max_pixels: int, known: Container[str], views: ViewNeeds | None = None):
    """Read a file once: hash it, and decode it (and make its wanted views) only for what is not cached yet."""

    def load(job: tuple[ImageEntry, os.stat_result | None]) -> Loaded:
        entry, stat = job
        size_bytes, mtime_ns, ctime_ns = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) if stat else (-1, -1, -1)
        try:
            data = entry.path.read_bytes()
        except OSError as exc:  # e.g. permissions, which can be fixed without touching the file
            reason = f"cannot read the file ({exc.strerror or exc})"
            marker = _recheck_key("unreadable", entry.relpath)
            return Loaded(entry, FileRecord(size_bytes, mtime_ns, marker, ctime_ns), error=reason)
        record = FileRecord(size_bytes, mtime_ns, images.content_hash(data), ctime_ns)
        if record.key in known:
            return Loaded(entry, record)
        try:
            if views is None:
                return Loaded(entry, record, image=images.decode_image(data, size, max_pixels=max_pixels))
            image = None if record.key in views.rows else images.decode_image(data, size, max_pixels=max_pixels)
            wanted = views.missing(record.key)
            made = augment.make_views(data, record.key, wanted, size, max_pixels=max_pixels) if wanted else {}
            return Loaded(entry, record, image=image, views=made)
        except images.ImageTooLarge as exc:  # decodes once data.max_image_pixels is raised
            return Loaded(entry, replace(record, key=_recheck_key("too large", record.key, max_pixels)),
                           error=str(exc))
        except ImageError as exc:
            return Loaded(entry, record, error=str(exc))

    return load


stages.callable_module(__name__, "pipeline.extract:run_extract")  # `from pipeline import extract; extract(...)`

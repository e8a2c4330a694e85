"""Shards: the engine-free core of extracting on a cluster.

The driver plans shards from the cache's stat index, so files that did not change never
leave it. A worker runs the extract loop's own loader and extractor (`extract_files`) over
one shard and writes a shard file in the cache's layout (/rows, /files, /failures) under a
temporary name, syncs it and renames it: a shard file is complete or absent. The driver stays
the only writer of the cache: it merges each finished shard in one journaled, locked commit
(keys already cached are dropped) and then deletes the shard file. Complete shard files found
at the start of a run (the driver was killed after the workers finished them) are merged
first, so a rerun computes only the shards that are missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Container

import numpy as np

from .cache import CacheWriter, FeatureCache, FileRecord, fingerprint_id
from .config import Config
from .dataset import ImageEntry
from .errors import CacheError
from .extract import extract_files

log = logging.getLogger(__name__)

_COMPLETE = ".h5"  # a shard file's suffix once renamed into place; anything else in the folder is debris


@dataclass(frozen=True)
class Shard:
    """Stale files for one task: small to send (paths and stats, never pixels or features)."""
    id: str
    jobs: tuple[tuple[ImageEntry, os.stat_result | None], ...]
    previous: dict[str, FileRecord]  # what the index says of these paths, so a re-checked failure stays one entry

    @property
    def relpaths(self) -> list[str]:
        return [entry.relpath for entry, _ in self.jobs]


@dataclass(frozen=True)
class ShardResult:
    """What a task returns: counts and where it ran, never features."""
    shard_id: str
    images: int
    extracted: int
    reused: int  # content found cached (in `known`, or twice in the shard)
    host: str
    pid: int
    seconds: float
    model_builds: int = 0  # how many times this worker process has built the backbone so far


def shard_dir(cache_path: Path) -> Path:
    """Shard files live beside their cache (on the filesystem every worker shares)."""
    return cache_path.with_name(cache_path.name + ".shards")


def plan_shards(stale: list[tuple[ImageEntry, os.stat_result | None]], index: dict[str, FileRecord],
                fingerprint: dict, shard_size: int) -> list[Shard]:
    """Cut the stale files into shards; an id is the hash of the fingerprint and (path, size, mtime) list."""
    shards = []
    for start in range(0, len(stale), shard_size):
        jobs = tuple(stale[start:start + shard_size])
        digest = hashlib.sha256(fingerprint_id(fingerprint).encode())
        for entry, stat in jobs:
            digest.update(json.dumps([entry.relpath, *((stat.st_size, stat.st_mtime_ns) if stat else (-1, -1))])
                          .encode())
        previous = {entry.relpath: index[entry.relpath] for entry, _ in jobs if entry.relpath in index}
        shards.append(Shard(digest.hexdigest()[:20], jobs, previous))
    return shards


def run_shard(shard: Shard, config: Config, fingerprint: dict, directory: Path, get_extractor: Callable,
              known: Container[str] = frozenset()) -> ShardResult:
    """A worker's task: extract one shard into `<directory>/<id>.h5`, complete or not at all.

    Content in `known` (the cache's keys when the shard was planned) is hashed but not decoded.
    A shard whose file already exists (a retry after the worker wrote it) is not computed again.
    """
    started = time.perf_counter()
    host, pid = socket.gethostname(), os.getpid()
    final = Path(directory) / f"{shard.id}{_COMPLETE}"
    extracted = reused = 0
    if not final.exists():
        temp = final.with_name(f"{shard.id}.{host}-{pid}.part")
        with CacheWriter(temp, fingerprint, dtype=config.cache.dtype, rebuild=True) as writer:
            def extractor():
                model = get_extractor()
                writer.ensure_feature_dim(model.feature_dim)
                return model

            counts = extract_files(shard.jobs, writer, config, known=known, index=shard.previous,
                                   get_extractor=extractor)
            extracted, reused = counts.extracted, counts.reused
        os.replace(temp, final)  # CacheWriter synced the file when it closed
        _sync_folder(final.parent)
        temp.with_name(temp.name + ".lock").unlink(missing_ok=True)
    return ShardResult(shard.id, len(shard.jobs), extracted, reused, host, pid, time.perf_counter() - started)


def complete_shard_files(directory: Path) -> list[Path]:
    """Finished shard files waiting to be merged; half-written ones (workers killed mid-shard) are deleted."""
    if not directory.is_dir():
        return []
    complete = []
    for path in sorted(directory.iterdir()):
        if path.name.endswith(_COMPLETE) and "." not in path.name[:-len(_COMPLETE)]:
            complete.append(path)
        else:
            path.unlink(missing_ok=True)
    return complete


def merge_shard(cache: CacheWriter, path: Path, fingerprint: dict, known: set[str]) -> int:
    """Append a shard file's new rows, index entries and failures in one commit, then delete it.

    Idempotent: a driver killed between the commit and the delete merges the file again, and
    its keys are then all in `known`. Returns the number of new feature rows.
    """
    try:
        with FeatureCache(path, fingerprint) as shard:
            rows = shard.row_index()
            keys = [key for key in rows if key not in known]
            features = shard.read_features([rows[key] for key in keys]) if keys else None
            files = list(shard.file_index().items())
            failures = [(key, where, why) for key, (where, why) in shard.failures().items() if key not in known]
    except CacheError as exc:  # cannot happen to a renamed file short of disk damage: recompute it
        log.warning("shard file %s cannot be read and is dropped; its images are extracted again (%s)", path, exc)
        path.unlink(missing_ok=True)
        return 0
    if keys:
        cache.ensure_feature_dim(features.shape[1])
    cache.commit(keys, features if keys else np.zeros((0, 0), np.float32), files, failures)
    known.update(keys)
    known.update(key for key, _, _ in failures)
    path.unlink()
    return len(keys)


class KnownKeys:
    """The cache's keys as one sorted array: cheap to send to every worker once, `in` by bisection."""

    def __init__(self, keys):
        self.keys = np.sort(np.array(list(keys), dtype="S64"))

    def __contains__(self, key) -> bool:
        probe = np.bytes_(key.encode() if isinstance(key, str) else key)
        at = int(np.searchsorted(self.keys, probe))
        return at < len(self.keys) and self.keys[at] == probe


def _sync_folder(directory: Path) -> None:
    """The rename itself survives a power cut only once the folder is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

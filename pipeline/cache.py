"""The HDF5 feature store: one file per (dataset, backbone fingerprint), append-only.

Layout (documented in README):

    /                 attrs: format, format_version, fingerprint (JSON), fingerprint_id
    /rows/key         (n,)   S64   sha256 of the image bytes; a row counts once its key is set
    /rows/feature     (n, d) float32|float16 bottleneck vectors
    /files/path       (m,)   str   image path relative to the dataset root
    /files/size       (m,)   int64 } with mtime_ns, lets a rerun skip re-hashing
    /files/mtime_ns   (m,)   int64 } files whose size and mtime did not change
    /files/key        (m,)   S64   the content hash that path had (later entries win)
    /failures/key, /failures/path, /failures/reason   images that did not decode

Labels and splits are not stored: relabelling or re-splitting needs no extraction.

Crash safety: each batch is committed in two flushes, features first, then the keys and
the index entries that make those rows visible. A `kill -9` at any point leaves a file
whose visible rows were all flushed whole; the next writer truncates any tail beyond the
last key. The file uses HDF5's default (v0) superblock, which a killed writer does not
leave marked as open, so it reopens without repair. One writer at a time is enforced
with a lock file beside the cache; readers never take HDF5 locks and see only rows
whose keys were committed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .errors import CacheError

FORMAT = "bottleneck-cache"
FORMAT_VERSION = 1
_KEY = "S64"
_STR = h5py.string_dtype()
_FEATURE_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    size: int
    mtime_ns: int
    key: str


def fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, dataset_name: str, fingerprint: dict) -> Path:
    """Cache files are named by dataset, backbone and fingerprint, so setups never share one."""
    return Path(cache_dir) / f"{dataset_name}__{fingerprint['backbone']}-{fingerprint_id(fingerprint)}.h5"


class FeatureCache:
    """Read access to a cache file: which images are in it, and their feature rows."""

    def __init__(self, path: str | Path, fingerprint: dict | None = None, *, mode: str = "r"):
        self.path = Path(path)
        if mode == "r" and not self.path.is_file():
            raise CacheError(f"no feature cache at {self.path}; fix: run `make extract` (or "
                             "`python -m pipeline extract`) with the same config first")
        try:
            self._file = h5py.File(self.path, mode, locking=False)
        except OSError as exc:
            raise CacheError(f"cache file {self.path} is damaged or not HDF5 ({exc}); fix: run extract "
                             "with --rebuild to start it afresh") from None
        if fingerprint is not None:
            self._check_fingerprint(fingerprint)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        stored = self._file.attrs.get("fingerprint")
        if self._file.attrs.get("format") != FORMAT or stored is None:
            raise CacheError(f"{self.path} is not a feature cache made by this tool; fix: move it away or "
                             "run extract with --rebuild")
        if json.loads(stored) != fingerprint:
            raise CacheError(f"{self.path} was made with another backbone setup ({stored}); refusing to mix "
                             "features; fix: run extract with --rebuild, or use that file's settings")

    @property
    def fingerprint(self) -> dict:
        return json.loads(self._file.attrs["fingerprint"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def feature_dim(self) -> int:
        return int(self._file["rows/feature"].shape[1])

    def row_index(self) -> dict[str, int]:
        """Committed content hash -> row number."""
        keys = self._file["rows/key"][...]
        return {key.decode(): row for row, key in enumerate(keys) if key}

    def file_index(self) -> dict[str, FileRecord]:
        """Path -> what that path held when last hashed; later entries override earlier ones."""
        group = self._file["files"]
        n = min(len(group[name]) for name in ("path", "size", "mtime_ns", "key"))
        paths = group["path"].asstr()[:n]
        sizes, mtimes, keys = group["size"][:n], group["mtime_ns"][:n], group["key"][:n]
        return {p: FileRecord(int(s), int(m), k.decode()) for p, s, m, k in zip(paths, sizes, mtimes, keys) if k}

    def failures(self) -> dict[str, tuple[str, str]]:
        """Content hash -> (path, reason) for images that could not be decoded."""
        group = self._file["failures"]
        n = min(len(group[name]) for name in ("key", "path", "reason"))
        keys, paths, reasons = group["key"][:n], group["path"].asstr()[:n], group["reason"].asstr()[:n]
        return {k.decode(): (p, r) for k, p, r in zip(keys, paths, reasons) if k}

    def read_features(self, rows: Sequence[int]) -> np.ndarray:
        """Feature rows in the order asked, as float32 (h5py wants increasing indices)."""
        rows = np.asarray(rows, dtype=np.int64)
        dataset = self._file["rows/feature"]
        if rows.size == 0:
            return np.zeros((0, dataset.shape[1]), np.float32)
        unique, inverse = np.unique(rows, return_inverse=True)
        return dataset[unique].astype(np.float32, copy=False)[inverse]


class CacheWriter(FeatureCache):
    """The single writer of a cache file: creates it, resumes it, appends committed batches."""

    def __init__(self, path: str | Path, fingerprint: dict, feature_dim: int | None = None, *,
                 dtype: str = "float32", rebuild: bool = False):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(path)
        if rebuild and path.exists():
            path.unlink()
        self._dtype = dtype
        super().__init__(path, fingerprint if path.exists() else None, mode="a")
        if "format" not in self._file.attrs:
            self._create(fingerprint)
        self._truncate_uncommitted()
        if feature_dim is not None:
            self.ensure_feature_dim(feature_dim)

    def _create(self, fingerprint: dict) -> None:
        f = self._file
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        f.attrs["fingerprint_id"] = fingerprint_id(fingerprint)
        rows = f.create_group("rows")
        rows.create_dataset("key", (0,), maxshape=(None,), chunks=(4096,), dtype=_KEY)
        files = f.create_group("files")
        for name, dtype in (("path", _STR), ("size", "i8"), ("mtime_ns", "i8"), ("key", _KEY)):
            files.create_dataset(name, (0,), maxshape=(None,), chunks=(4096,), dtype=dtype)
        failures = f.create_group("failures")
        for name, dtype in (("key", _KEY), ("path", _STR), ("reason", _STR)):
            failures.create_dataset(name, (0,), maxshape=(None,), chunks=(256,), dtype=dtype)
        f.flush()

    def ensure_feature_dim(self, feature_dim: int) -> None:
        """The feature dataset is made once the model says how wide its rows are."""
        rows = self._file["rows"]
        if "feature" not in rows:
            itemsize = np.dtype(self._dtype).itemsize
            chunk_rows = max(1, _FEATURE_CHUNK_BYTES // (feature_dim * itemsize))
            rows.create_dataset("feature", (0, feature_dim), maxshape=(None, feature_dim),
                                chunks=(chunk_rows, feature_dim), dtype=self._dtype)
            self._file.flush()
        elif rows["feature"].shape[1] != feature_dim:
            raise CacheError(f"{self.path} holds {rows['feature'].shape[1]}-d features, the model gives "
                             f"{feature_dim}-d; fix: run extract with --rebuild")

    def _truncate_uncommitted(self) -> None:
        """Drop a tail left by a killed writer: rows beyond the last committed key."""
        keys = self._file["rows/key"]
        committed = len(keys)
        while committed and not keys[committed - 1]:
            committed -= 1
        for dataset in (keys, self._file["rows"].get("feature")):
            if dataset is not None and dataset.shape[0] > committed:
                dataset.resize(committed, axis=0)
        self._file.flush()

    def commit(self, keys: Sequence[str], features: np.ndarray, files: Iterable[tuple[str, FileRecord]],
               failures: Iterable[tuple[str, str, str]] = ()) -> None:
        """Append one batch: feature rows, the index entries of their files, and failures."""
        keys_ds = self._file["rows/key"]
        start = len(keys_ds)
        if len(keys):
            feature_ds = self._file["rows/feature"]
            feature_ds.resize(start + len(keys), axis=0)
            feature_ds[start:] = features.astype(self._dtype, copy=False)
            self._file.flush()  # features are whole on disk before any key points at them
            keys_ds.resize(start + len(keys), axis=0)
            keys_ds[start:] = np.array(keys, dtype=_KEY)
        files = list(files)
        if files:
            _append(self._file["files"], {
                "path": [p for p, _ in files], "size": [r.size for _, r in files],
                "mtime_ns": [r.mtime_ns for _, r in files], "key": [r.key for _, r in files]})
        failures = list(failures)
        if failures:
            _append(self._file["failures"], {
                "key": [k for k, _, _ in failures], "path": [p for _, p, _ in failures],
                "reason": [r for _, _, r in failures]})
        self._file.flush()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._lock.close()


def _append(group: h5py.Group, columns: dict[str, list]) -> None:
    """Append to a group of equal-length columns; the key column is written last."""
    order = sorted(columns, key=lambda name: name == "key")
    for name in order:
        dataset = group[name]
        start = len(dataset)
        dataset.resize(start + len(columns[name]), axis=0)
        values = columns[name]
        dataset[start:] = np.array(values, dtype=_KEY) if name == "key" else np.array(values, dtype=dataset.dtype)


def _acquire_lock(path: Path):
    """One writer per cache file; the error names the process that holds it."""
    lock_path = path.with_name(path.name + ".lock")
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CacheError(f"{path} is being written by {holder}; fix: wait for that extract to finish "
                         "or stop it, then run again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle

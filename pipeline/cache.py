"""The HDF5 feature store: one file per (dataset, backbone fingerprint), append-only.

Layout (documented in README):

    user block        the first 512 bytes, which HDF5 skips: `bottleneck-cache file id <32 hex digits>`,
                      random per file, so that a journal is only ever rolled back onto its own file
    /                 attrs: format, format_version, fingerprint (JSON), fingerprint_id,
                             extract_timing (JSON: seconds and images extracted, summed)
    /rows/key         (n,)   S64   sha256 of the image bytes; a row counts once its key is set
    /rows/feature     (n, d) float32|float16 bottleneck vectors
    /files/path       (m,)   str   image path relative to the dataset root
    /files/size       (m,)   int64 } with mtime_ns and ctime_ns, lets a rerun skip
    /files/mtime_ns   (m,)   int64 } re-hashing files whose size and times did not
    /files/ctime_ns   (m,)   int64 } change (-1: recorded before ctime was)
    /files/key        (m,)   S64   the content hash that path had (later entries win)
    /failures/key, /failures/path, /failures/reason   images that did not decode
    /views/<recipe id>/key, index, feature   augmented views (augment.py), keyed by (content hash,
                             view index), one group per view recipe; attrs: recipe (JSON)

Labels and splits are not stored: relabelling or re-splitting needs no extraction.

Crash safety: HDF5 rewrites its own structures in place, so a write stopped halfway can
leave a file it cannot open. Every change is therefore one journaled update (journal.py):
a writer killed at any moment, or stopped by a full disk, leaves the file as it was after
its last complete update once the next reader or writer has rolled it back. A new file is
built beside the cache and renamed into place. Feature chunks carry Fletcher-32 checksums,
so damaged bytes raise an error instead of reading as features.

Concurrency: one writer per file, enforced with `<cache>.h5.lock`, which names it. Readers
hold a shared lock on the cache file while they have it open and the writer takes it
exclusively for each update, so a reader sees one committed state from open to close.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .errors import CacheError
from .journal import JournaledFile, journal_path, roll_back

log = logging.getLogger(__name__)

FORMAT = "bottleneck-cache"
FORMAT_VERSION = 1
_KEY = "S64"
_STR = h5py.string_dtype()
# Chunks small enough for HDF5's chunk cache, so that each commit rewrites (and journals)
# little: the last, partly filled chunk of every column is rewritten in place.
_FEATURE_CHUNK_BYTES = 1 << 18
_INDEX_CHUNK = 1024
READ_CHUNK_ROWS = 8192  # feature rows per read: 64 MiB of float32 at 2048-d, whatever the dataset's size
_USER_BLOCK = 512  # HDF5's smallest user block; it holds the file's id
_ID_TAG = b"bottleneck-cache file id "


@dataclass(frozen=True)
class FileRecord:
    """What a path held when it was hashed. The inode change time also catches edits that keep
    size and mtime (`exiftool -P`, `cp -p`); -1 where it was not recorded matches no file."""
    size: int
    mtime_ns: int
    key: str
    ctime_ns: int = -1

    def matches(self, stat: os.stat_result) -> bool:
        """The file looks unchanged since it was hashed, so it need not be read again."""
        return (self.size, self.mtime_ns, self.ctime_ns) == (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(frozen=True)
class ViewRows:
    """Feature rows of augmented views, committed with the batch they belong to."""
    recipe: dict  # the view recipe's fingerprint; its id names the group
    keys: Sequence[str]
    indices: Sequence[int]
    features: np.ndarray

    @property
    def recipe_id(self) -> str:
        return fingerprint_id(self.recipe)


def feature_chunks(feature_dim: int, dtype: str) -> tuple[int, int]:
    """HDF5 chunk shape of the feature rows: whole rows, about _FEATURE_CHUNK_BYTES each, uncompressed
    (gzip and lzf save little on bottleneck vectors and slow every commit; `make bench` measures it)."""
    return max(1, _FEATURE_CHUNK_BYTES // (feature_dim * np.dtype(dtype).itemsize)), feature_dim


def fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, dataset_name: str, fingerprint: dict) -> Path:
    """Cache files are named by dataset, backbone and fingerprint, so setups never share one."""
    return Path(cache_dir) / f"{dataset_name}__{fingerprint['backbone']}-{fingerprint_id(fingerprint)}.h5"


def _reads(method):
    """h5py's errors from a damaged file become one CacheError that names the file and the fix."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError, KeyError) as exc:
            raise _damaged(self.path, exc) from None

    return checked


class FeatureCache:
    """Read access to a cache file: which images are in it, and their feature rows.

    While open it holds a shared lock on the file, so the writer cannot change it underneath.
    """

    def __init__(self, path: str | Path, fingerprint: dict | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"no feature cache at {self.path}; fix: run `make extract` (or "
                             "`python -m pipeline extract`) with the same config first")
        self._file = None
        self._lock_fd = _shared_lock(self.path)
        _LOCK_FDS.add(self._lock_fd)
        try:
            self._file = _open_hdf5(self.path, self.path, "r", locking=False)
            if fingerprint is not None:
                self._check_fingerprint(fingerprint)
        except BaseException:
            self.close()
            raise

    @_reads
    def _check_fingerprint(self, fingerprint: dict) -> None:
        stored = self._file.attrs.get("fingerprint")
        if self._file.attrs.get("format") != FORMAT or stored is None:
            raise CacheError(f"{self.path} is not a feature cache made by this tool; fix: move it away or "
                             "run extract with --rebuild")
        if json.loads(stored) != fingerprint:
            raise CacheError(f"{self.path} was made with another backbone setup ({stored}); refusing to mix "
                             "features; fix: run extract with --rebuild, or use that file's settings")

    @property
    @_reads
    def fingerprint(self) -> dict:
        return json.loads(self._file.attrs["fingerprint"])

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            if self._lock_fd is not None:
                _LOCK_FDS.discard(self._lock_fd)
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @_reads
    def extract_timing(self) -> dict | None:
        """{"seconds", "images"} summed over the extract runs that computed features; None if never recorded."""
        stored = self._file.attrs.get("extract_timing")
        return json.loads(stored) if stored is not None else None

    @property
    @_reads
    def feature_dim(self) -> int:
        return int(self._file["rows/feature"].shape[1])

    @_reads
    def row_index(self) -> dict[str, int]:
        """Committed content hash -> row number."""
        keys = self._file["rows/key"][...]
        return {key.decode(): row for row, key in enumerate(keys) if key}

    @_reads
    def file_index(self) -> dict[str, FileRecord]:
        """Path -> what that path held when last hashed; later entries override earlier ones."""
        group = self._file["files"]
        n = min(len(group[name]) for name in ("path", "size", "mtime_ns", "key"))
        paths = group["path"].asstr()[:n]
        sizes, mtimes, keys = group["size"][:n], group["mtime_ns"][:n], group["key"][:n]
        ctimes = group["ctime_ns"][:n] if "ctime_ns" in group else np.full(n, -1)  # not yet upgraded
        return {p: FileRecord(int(s), int(m), k.decode(), int(c))
                for p, s, m, k, c in zip(paths, sizes, mtimes, keys, ctimes) if k}

    @_reads
    def failures(self) -> dict[str, tuple[str, str]]:
        """Content hash -> (path, reason) for images that could not be decoded."""
        group = self._file["failures"]
        n = min(len(group[name]) for name in ("key", "path", "reason"))
        keys, paths, reasons = group["key"][:n], group["path"].asstr()[:n], group["reason"].asstr()[:n]
        return {k.decode(): (p, r) for k, p, r in zip(keys, paths, reasons) if k}

    @_reads
    def read_features(self, rows: Sequence[int], chunk_rows: int = READ_CHUNK_ROWS) -> np.ndarray:
        """Feature rows in the order asked, as float32, read `chunk_rows` at a time straight into
        one preallocated array: its only full-size copy, whatever the stored dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        dataset = self._file["rows"].get("feature")
        out = np.empty((rows.size, 0 if dataset is None else dataset.shape[1]), np.float32)
        if rows.size == 0:  # also before the first batch made the feature dataset
            return out
        order = np.argsort(rows, kind="stable")  # h5py reads increasing rows; each slab once
        for start in range(0, rows.size, chunk_rows):
            at = order[start:start + chunk_rows]
            wanted = rows[at]
            low, high = int(wanted[0]), int(wanted[-1]) + 1
            if high - low <= 2 * len(wanted):  # dense enough: one contiguous slab beats a point selection
                out[at] = dataset[low:high][wanted - low]
            else:
                unique, inverse = np.unique(wanted, return_inverse=True)
                out[at] = dataset[unique][inverse]
        return out

    @_reads
    def view_index(self, recipe_id: str) -> dict[tuple[str, int], int]:
        """Committed (content hash, view index) -> row of the recipe's view group; empty when it has none."""
        group = self._file.get(f"views/{recipe_id}")
        if group is None:
            return {}
        n = min(len(group["key"]), len(group["index"]))
        keys, indices = group["key"][:n], group["index"][:n]
        return {(key.decode(), int(index)): row for row, (key, index) in enumerate(zip(keys, indices)) if key}

    @_reads
    def read_view_features(self, recipe_id: str, rows: Sequence[int]) -> np.ndarray:
        """View feature rows in the order asked, as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._file[f"views/{recipe_id}/feature"][unique].astype(np.float32, copy=False)[inverse]


class CacheWriter(FeatureCache):
    """The single writer of a cache file: creates it, resumes it, appends committed batches."""

    def __init__(self, path: str | Path, fingerprint: dict, feature_dim: int | None = None, *,
                 dtype: str = "float32", rebuild: bool = False):
        self.path = Path(path)
        self._dtype = dtype
        self._file = self._raw = self._owner = None
        self._updating = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._owner = _acquire_lock(self.path)
            _LOCK_FDS.add(self._owner.fileno())
            if rebuild:
                for stale in (self.path, journal_path(self.path)):
                    stale.unlink(missing_ok=True)
            if not self.path.exists():
                _create(self.path, fingerprint)
            self._raw = JournaledFile(self.path, file_identity(self.path))
            _LOCK_FDS.add(self._raw.fileno())
            with self._update():
                self._file = _open_hdf5(self.path, self._raw, "r+")
                self._check_fingerprint(fingerprint)
                if "ctime_ns" not in self._file["files"]:  # made before ctime was recorded
                    self._file["files"].create_dataset("ctime_ns", data=np.full(len(self._file["files/path"]), -1),
                                                       maxshape=(None,), chunks=(_INDEX_CHUNK,), dtype="i8")
                self._truncate_uncommitted()
                if feature_dim is not None:
                    self.ensure_feature_dim(feature_dim)
        except OSError as exc:  # no room or no permission to create the file or its lock
            self.close()
            raise _write_error(self.path, exc) from None
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _update(self):
        """One all-or-nothing change of the file, made while no reader has it open."""
        if self._updating:  # part of the enclosing update
            yield
            return
        if self._raw is None or self._raw.error is not None:
            raise CacheError(f"{self.path}: this writer stopped after an error; fix: run extract again")
        _lock_for_update(self._raw.fileno(), self.path)
        self._updating = True
        try:
            try:
                roll_back(self.path, self._raw.identity)  # what a writer killed mid-update left
                self._raw.begin()
                yield
                if self._file is not None:
                    self._file.flush()
                failure = self._raw.error
            except BaseException as exc:
                failure = self._raw.error or exc
            if failure is not None:
                write_failed = failure is self._raw.error
                self._abandon()
                raise _update_error(self.path, failure, write_failed) from None
            self._raw.end()
        finally:
            self._updating = False
            fcntl.flock(self._raw.fileno(), fcntl.LOCK_UN)

    def _abandon(self) -> None:
        """Undo a failed update. HDF5 still writes while closing, so its writes are dropped first."""
        self._raw.abandon()
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):
                file.close()
        with contextlib.suppress(OSError):  # else the journal stays, and the next open rolls back
            roll_back(self.path, self._raw.identity)

    def add_extract_timing(self, seconds: float, images: int) -> None:
        """What building this file cost, so `compare` can show it beside each head's training time."""
        timing = self.extract_timing() or {"seconds": 0.0, "images": 0}
        with self._update():
            self._file.attrs["extract_timing"] = json.dumps({"seconds": timing["seconds"] + seconds,
                                                             "images": timing["images"] + images})

    def ensure_feature_dim(self, feature_dim: int) -> None:
        """The feature dataset is made once the model says how wide its rows are."""
        rows = self._file["rows"]
        if "feature" not in rows:
            with self._update():
                rows.create_dataset("feature", (0, feature_dim), maxshape=(None, feature_dim),
                                    chunks=feature_chunks(feature_dim, self._dtype), dtype=self._dtype, fletcher32=True)
        elif rows["feature"].shape[1] != feature_dim:
            raise CacheError(f"{self.path} holds {rows['feature'].shape[1]}-d features, the model gives "
                             f"{feature_dim}-d; fix: run extract with --rebuild")

    def _truncate_uncommitted(self) -> None:
        """Drop rows beyond the last key: a tail that a writer killed before commits were journaled left."""
        groups = [self._file["rows"], *self._file.get("views", {}).values()]
        for group in groups:
            keys = group["key"]
            committed = len(keys)
            while committed and not keys[committed - 1]:
                committed -= 1
            for dataset in (keys, group.get("index"), group.get("feature")):
                if dataset is not None and dataset.shape[0] > committed:
                    dataset.resize(committed, axis=0)

    def commit(self, keys: Sequence[str], features: np.ndarray, files: Iterable[tuple[str, FileRecord]],
               failures: Iterable[tuple[str, str, str]] = (), views: ViewRows | None = None) -> None:
        """Append one batch, all or nothing: feature rows, their views, the index entries of their files,
        and failures."""
        files, failures = list(files), list(failures)
        with self._update():
            if views is not None and len(views.keys):
                self._append_views(views)
            keys_ds = self._file["rows/key"]
            start = len(keys_ds)
            if len(keys):
                feature_ds = self._file["rows/feature"]
                feature_ds.resize(start + len(keys), axis=0)
                feature_ds[start:] = features.astype(self._dtype, copy=False)
                keys_ds.resize(start + len(keys), axis=0)
                keys_ds[start:] = np.array(keys, dtype=_KEY)
            if files:
                _append(self._file["files"], {
                    "path": [p for p, _ in files], "size": [r.size for _, r in files],
                    "mtime_ns": [r.mtime_ns for _, r in files], "ctime_ns": [r.ctime_ns for _, r in files],
                    "key": [r.key for _, r in files]})
            if failures:
                _append(self._file["failures"], {
                    "key": [k for k, _, _ in failures], "path": [p for _, p, _ in failures],
                    "reason": [r for _, _, r in failures]})

    def _append_views(self, views: ViewRows) -> None:
        group = self._file.require_group("views").get(views.recipe_id)
        if group is None:
            dim = views.features.shape[1]
            group = self._file["views"].create_group(views.recipe_id)
            group.attrs["recipe"] = json.dumps(views.recipe, sort_keys=True)
            group.create_dataset("feature", (0, dim), maxshape=(None, dim), chunks=feature_chunks(dim, self._dtype),
                                 dtype=self._dtype, fletcher32=True)
            group.create_dataset("index", (0,), maxshape=(None,), chunks=(_INDEX_CHUNK,), dtype="i4")
            group.create_dataset("key", (0,), maxshape=(None,), chunks=(_INDEX_CHUNK,), dtype=_KEY)
        _append(group, {"feature": views.features.astype(self._dtype, copy=False), "index": list(views.indices),
                        "key": list(views.keys)})

    def close(self) -> None:
        try:
            if self._file is not None:
                with self._update():
                    file, self._file = self._file, None
                    file.close()
                os.fsync(self._raw.fileno())  # a finished extract survives a power cut
        finally:
            if self._raw is not None:
                _LOCK_FDS.discard(self._raw.fileno())
                self._raw.close()
            if self._owner is not None:
                _LOCK_FDS.discard(self._owner.fileno())
                self._owner.close()


def _create(path: Path, fingerprint: dict) -> None:
    """A new file is built beside the cache and renamed into place, so none is ever seen half-made."""
    building = path.with_name(path.name + ".new")
    with h5py.File(building, "w", locking=False, userblock_size=_USER_BLOCK) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        f.attrs["fingerprint_id"] = fingerprint_id(fingerprint)
        rows = f.create_group("rows")
        rows.create_dataset("key", (0,), maxshape=(None,), chunks=(_INDEX_CHUNK,), dtype=_KEY)
        files = f.create_group("files")
        for name, dtype in (("path", _STR), ("size", "i8"), ("mtime_ns", "i8"), ("ctime_ns", "i8"), ("key", _KEY)):
            files.create_dataset(name, (0,), maxshape=(None,), chunks=(_INDEX_CHUNK,), dtype=dtype)
        failures = f.create_group("failures")
        for name, dtype in (("key", _KEY), ("path", _STR), ("reason", _STR)):
            failures.create_dataset(name, (0,), maxshape=(None,), chunks=(256,), dtype=dtype)
    with open(building, "r+b") as f:
        f.write(_ID_TAG + uuid.uuid4().hex.encode() + b"\n")
    os.replace(building, path)


def file_identity(path: Path) -> bytes:
    """The random id a cache file was made with (b"" for files made before ids), read from its
    user block, which HDF5 never writes and no journal covers."""
    with open(path, "rb") as f:
        block = f.read(len(_ID_TAG) + 32)
    return block[len(_ID_TAG):] if block.startswith(_ID_TAG) and len(block) == len(_ID_TAG) + 32 else b""


def _open_hdf5(path: Path, target, mode: str, **options) -> h5py.File:
    try:
        return h5py.File(target, mode, **options)
    except OSError as exc:
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: BaseException) -> CacheError:
    detail = " ".join(str(exc).split())[:200]
    return CacheError(f"cache file {path} is damaged or not HDF5 ({detail}); fix: run extract with --rebuild "
                      "to start it afresh")


def _update_error(path: Path, failure: BaseException, write_failed: bool) -> BaseException:
    """A failed write (disk full) is not damage: the file is as after the last complete update."""
    if write_failed and isinstance(failure, OSError):
        return _write_error(path, failure)
    if isinstance(failure, (OSError, RuntimeError, KeyError)):
        return _damaged(path, failure)
    return failure


def _write_error(path: Path, exc: OSError) -> CacheError:
    return CacheError(f"could not write {path} ({exc.strerror or exc}); every batch committed before is kept; "
                      f"fix: free disk space (or make {path.parent} writable) and run extract again")


def _append(group: h5py.Group, columns: dict[str, list]) -> None:
    """Append to a group of equal-length columns; the key column is written last."""
    order = sorted(columns, key=lambda name: name == "key")
    for name in order:
        dataset = group[name]
        start = len(dataset)
        dataset.resize(start + len(columns[name]), axis=0)
        values = columns[name]
        dataset[start:] = np.array(values, dtype=_KEY) if name == "key" else np.array(values, dtype=dataset.dtype)


# Descriptors whose flocks belong to this process's readers and writers. A forked child shares
# them, and with them the locks: OpenVINO's telemetry forks one while converting a model, and a
# writer killed meanwhile left its cache "being written" for as long as that child lived.
_LOCK_FDS: set[int] = set()


def _drop_locks_in_child() -> None:
    """In a forked child: point every lock descriptor at /dev/null, so only the parent holds the locks."""
    if not _LOCK_FDS:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _shared_lock(path: Path) -> int:
    """A reader's lock. A journal found under it was left by a writer stopped mid-update: undo it first."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CacheError(f"cannot read the cache file {path} ({exc.strerror}); fix: make it readable") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if journal_path(path).exists():
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                roll_back(path, file_identity(path))
            except OSError as exc:
                raise CacheError(f"{path} was left mid-update by a stopped extract and cannot be repaired here "
                                 f"({exc}); fix: run extract again, which repairs it first") from None
            fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_for_update(fd: int, path: Path) -> None:
    """The writer waits for readers to close the file; it says so when that takes a moment."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("waiting for readers of %s (train, report, your own code) to close it", path)
        fcntl.flock(fd, fcntl.LOCK_EX)


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

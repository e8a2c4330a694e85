"""The HDF5 store: append, reopen, resume after a partial write, refuse mixing and damage."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.cache import CacheWriter, FeatureCache, FileRecord, cache_path, fingerprint_id
from pipeline.errors import CacheError

from conftest import REPO

FP = {"backbone": "mobilenet", "weights": "random:seed=0", "input_size": 224}


def _key(i):
    return f"{i:064x}"


def _write(path, start, n, dim=4):
    with CacheWriter(path, FP) as cache:
        cache.ensure_feature_dim(dim)
        keys = [_key(i) for i in range(start, start + n)]
        features = np.arange(start * dim, (start + n) * dim, dtype=np.float32).reshape(n, dim)
        cache.commit(keys, features, [(f"img/{i}.jpg", FileRecord(100 + i, 7, _key(i))) for i in range(start, start + n)],
                     [(_key(999), "bad.jpg", "truncated image data")] if start == 0 else [])


def test_append_and_reopen(tmp_path):
    path = cache_path(tmp_path, "flowers", FP)
    assert path.name == f"flowers__mobilenet-{fingerprint_id(FP)}.h5"
    _write(path, 0, 3)
    _write(path, 3, 2)
    with FeatureCache(path, FP) as cache:
        rows = cache.row_index()
        assert list(rows) == [_key(i) for i in range(5)]
        np.testing.assert_array_equal(cache.read_features([rows[_key(4)], rows[_key(0)]]),
                                      [[16, 17, 18, 19], [0, 1, 2, 3]])
        assert cache.file_index()["img/3.jpg"] == FileRecord(103, 7, _key(3))
        assert cache.failures() == {_key(999): ("bad.jpg", "truncated image data")}
        assert cache.fingerprint == FP
        with h5py.File(path, "r", locking=False) as raw:  # the documented layout
            assert raw.attrs["format"] == "bottleneck-cache"
            assert json.loads(raw.attrs["fingerprint"]) == FP
            assert raw["rows/feature"].shape == (5, 4) and raw["rows/key"].shape == (5,)


def test_later_index_entries_win(tmp_path):
    path = tmp_path / "c.h5"
    _write(path, 0, 2)
    with CacheWriter(path, FP) as cache:
        cache.commit([], np.zeros((0, 4)), [("img/0.jpg", FileRecord(1, 2, _key(1)))])
    with FeatureCache(path, FP) as cache:
        assert cache.file_index()["img/0.jpg"] == FileRecord(1, 2, _key(1))


def test_uncommitted_tail_is_dropped_on_resume(tmp_path):
    path = tmp_path / "c.h5"
    _write(path, 0, 3)
    with h5py.File(path, "a") as raw:  # a writer killed after features, before keys
        raw["rows/feature"].resize(5, axis=0)
        raw["rows/key"].resize(4, axis=0)  # and one key slot allocated but never written
    with FeatureCache(path, FP) as cache:
        assert len(cache.row_index()) == 3
    _write(path, 3, 2)
    with FeatureCache(path, FP) as cache:
        rows = cache.row_index()
        assert len(rows) == 5 and rows[_key(3)] == 3
        np.testing.assert_array_equal(cache.read_features([3]), [[12, 13, 14, 15]])


def test_other_fingerprint_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    _write(path, 0, 1)
    with pytest.raises(CacheError, match="another backbone setup"):
        FeatureCache(path, {**FP, "precision": "bfloat16"})
    with pytest.raises(CacheError, match="another backbone setup"):
        CacheWriter(path, {**FP, "input_size": 299})


def test_damaged_file_is_detected_and_rebuild_recovers(tmp_path):
    path = tmp_path / "c.h5"
    _write(path, 0, 3)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CacheError, match="--rebuild"):
        FeatureCache(path, FP)
    with CacheWriter(path, FP, rebuild=True) as cache:
        assert cache.row_index() == {}


def test_missing_cache_says_run_extract(tmp_path):
    with pytest.raises(CacheError, match="make extract"):
        FeatureCache(tmp_path / "none.h5", FP)


def test_second_writer_fails_fast_naming_the_first(tmp_path):
    """The first writer is a process of its own, started fresh (no fork of this one, which has TensorFlow loaded)."""
    path = tmp_path / "c.h5"
    hold = ("import sys, time\nfrom pipeline.cache import CacheWriter\n"
            f"with CacheWriter({str(path)!r}, {FP!r}):\n    print('ready', flush=True)\n    time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(CacheError, match=f"pid {holder.pid}"):
            CacheWriter(path, FP)
        with FeatureCache(path, FP) as reader:  # readers are not blocked by the writer
            assert reader.row_index() == {}
    finally:
        holder.kill()
        holder.wait()
    with CacheWriter(path, FP):  # a killed writer's lock is released by the OS
        pass

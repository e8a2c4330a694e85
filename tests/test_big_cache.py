"""Heads on caches bigger than memory: reads in chunks into one float32 array, the dense head
streamed from the cache, logistic regression refused in one line when it cannot fit.

A real HDF5 cache written by the real writer, with more rows than a read chunk.
"""

import numpy as np
import pytest

from pipeline.cache import CacheWriter, FeatureCache, FileRecord
from pipeline.config import LogRegConfig
from pipeline.errors import DatasetError
from pipeline.features import FeatureRows
from pipeline.heads.dense import DenseHead
from pipeline.heads.logreg import LogisticRegressionHead

FP = {"backbone": "synthetic", "weights": "test"}
ROWS, DIM, CLASSES = 3000, 24, 3


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory):
    """3,000 float16 rows in three learnable classes, committed in batches as extract does."""
    path = tmp_path_factory.mktemp("big") / "big.h5"
    rng = np.random.default_rng(0)
    means = rng.normal(0, 2, (CLASSES, DIM)).astype(np.float32)
    with CacheWriter(path, FP, DIM, dtype="float16") as cache:
        for start in range(0, ROWS, 500):
            labels = np.arange(start, start + 500) % CLASSES
            keys = [f"{i:064x}" for i in range(start, start + 500)]
            cache.commit(keys, means[labels] + rng.normal(0, 1, (500, DIM)).astype(np.float32),
                         [(f"{i}.jpg", FileRecord(1, 1, key, 1)) for i, key in enumerate(keys, start)])
    return path


def splits(path, rng):
    rows = rng.permutation(ROWS)  # train asks for rows in any order, some twice (copies of one image)
    rows = np.concatenate([rows, rows[:50]])
    labels = rows % CLASSES
    with FeatureCache(path, FP) as cache:
        return (FeatureRows.of(cache, rows[:2500], labels[:2500]), FeatureRows.of(cache, rows[2500:], labels[2500:]))


def test_a_chunked_read_of_a_cache_larger_than_the_chunk_equals_a_whole_read(big_cache):
    rng = np.random.default_rng(1)
    asked = np.concatenate([rng.permutation(ROWS), rng.integers(0, ROWS, 100)])
    with FeatureCache(big_cache, FP) as cache:
        whole = cache.read_features(asked, chunk_rows=10 * ROWS)
        chunked = cache.read_features(asked, chunk_rows=64)
        sparse = cache.read_features(asked[::37], chunk_rows=8)  # scattered rows: point selections
    with __import__("h5py").File(big_cache, "r") as f:
        stored = f["rows/feature"][...]
    assert chunked.dtype == np.float32 and chunked.flags.c_contiguous
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked, stored[asked].astype(np.float32))
    np.testing.assert_array_equal(sparse, stored[asked[::37]].astype(np.float32))

    train, _ = splits(big_cache, rng)
    X, y = train.read()
    streamed = list(train.chunks(chunk_rows=128))
    assert len(streamed) > 1
    np.testing.assert_array_equal(np.concatenate([x for x, _ in streamed]), X)
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in streamed]), y)
    np.testing.assert_array_equal(y, train.rows % CLASSES)
    np.testing.assert_array_equal(X, stored[train.rows].astype(np.float32))
    shuffled = list(train.chunks(chunk_rows=128, seed=3))  # another order, the same rows
    order = np.lexsort(np.concatenate([x for x, _ in shuffled]).T)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in shuffled])[order], X[np.lexsort(X.T)])
    mean, variance = train.moments(chunk_rows=128)
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(variance, X.astype(np.float64).var(0), rtol=1e-6)


def test_heads_train_on_rows_read_from_the_cache_as_on_arrays(big_cache):
    train, val = splits(big_cache, np.random.default_rng(2))
    (X, y), (X_val, y_val) = train.read(), val.read()
    config = LogRegConfig(c_values=[0.1, 1.0])
    from_cache = LogisticRegressionHead.from_config(config).fit(train, train.labels, val, val.labels)
    given = X.copy()
    from_arrays = LogisticRegressionHead.from_config(config).fit(X, y, X_val, y_val)
    np.testing.assert_array_equal(X, given)  # a caller's arrays are never standardised in place
    np.testing.assert_allclose(from_cache.coef_, from_arrays.coef_, rtol=1e-6, atol=1e-8)
    assert np.mean(from_cache.predict_proba(X_val).argmax(1) == y_val) > 0.95

    dense = DenseHead(epochs=4, patience=4, batch_size=128).fit(train, train.labels, val, val.labels)
    assert np.mean(dense.predict_proba(X_val).argmax(1) == y_val) > 0.95
    assert len(dense.history_) == 4 and all("val_loss" in epoch for epoch in dense.history_)


def test_logistic_regression_that_cannot_fit_in_memory_is_refused_in_one_line(big_cache):
    with FeatureCache(big_cache, FP) as cache:
        huge = FeatureRows(cache.path, FP, np.arange(ROWS), np.arange(ROWS) % CLASSES, feature_dim=10 ** 8)
    with pytest.raises(DatasetError) as refused:
        LogisticRegressionHead().fit(huge, huge.labels, huge, huge.labels)
    message = str(refused.value)
    assert "\n" not in message and "GiB" in message and 'head.kind = "dense"' in message


def test_cross_validation_that_cannot_fit_names_choosing_on_validation_when_that_fits(big_cache, monkeypatch):
    from pipeline.heads import logreg

    train, val = splits(big_cache, np.random.default_rng(3))
    monkeypatch.setattr(logreg, "available_memory", lambda: int(1.15 * (train.nbytes + val.nbytes)) + 1)
    with pytest.raises(DatasetError) as refused:
        LogisticRegressionHead(selection="cv").fit(train, train.labels, val, val.labels)
    message = str(refused.value)
    assert "\n" not in message and 'head.logreg.selection = "validation"' in message
    chosen_on_val = LogisticRegressionHead(selection="validation").fit(train, train.labels, val, val.labels)
    assert chosen_on_val.params_["selected_by"] == "validation"


def test_logistic_regression_holds_one_normalisation_of_the_rows_at_a_time(tmp_path):
    """Trying three normalisations must not hold three copies of the training matrix (a 1M-row
    cache was killed for memory that way): numpy's allocations, traced, stay near one copy."""
    import tracemalloc

    rows, dim = 20_000, 64
    path = tmp_path / "wide.h5"
    rng = np.random.default_rng(1)
    with CacheWriter(path, FP, dim, dtype="float16") as cache:
        labels = np.arange(rows) % CLASSES
        keys = [f"{i:064x}" for i in range(rows)]
        cache.commit(keys, rng.normal(0, 2, (CLASSES, dim))[labels] + rng.normal(0, 1, (rows, dim)),
                     [(f"{i}.jpg", FileRecord(1, 1, key, 1)) for i, key in enumerate(keys)])
    with FeatureCache(path, FP) as cache:
        train = FeatureRows.of(cache, np.arange(18_000), labels[:18_000])
        val = FeatureRows.of(cache, np.arange(18_000, rows), labels[18_000:])
    peaks = {}
    for normalizations in (["none"], ["none", "l2", "sqrt"]):
        head = LogisticRegressionHead(c_values=[1.0], normalizations=normalizations, max_iter=50)
        tracemalloc.start()
        try:
            head.fit(train, train.labels, val, val.labels)
            peaks[len(normalizations)] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert {entry["normalization"] for entry in head.history_} == {"none", "l2", "sqrt"}
    matrix = 18_000 * dim * 4
    # chunked reads and moments add fixed-size temporaries, large beside this small matrix; a second
    # copy of the rows would add a whole matrix per normalisation
    assert peaks[3] - peaks[1] < 0.1 * matrix, f"{(peaks[3] - peaks[1]) / matrix:.2f} matrices more"

"""Logistic regression on standardised features, its strength chosen on validation data.

Fitted with scikit-learn, stored as the four arrays that define it (mean, scale,
coefficients, intercepts) so that loading needs no pickle and an export can rebuild it
exactly as standardisation plus one softmax layer.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from threadpoolctl import threadpool_limits

from ..config import LogRegConfig
from ..errors import DatasetError
from ..features import FeatureRows

FILE_NAME = "head.h5"
_CHUNK_ROWS = 8192
_CHAINS = 2  # warm-started chains of C values, fitted side by side


class LogisticRegressionHead:
    kind = "logreg"

    def __init__(self, config: LogRegConfig = LogRegConfig()):
        self.config = config

    def fit(self, X: np.ndarray | FeatureRows, y: np.ndarray, X_val: np.ndarray | FeatureRows, y_val: np.ndarray,
            n_classes: int | None = None) -> "LogisticRegressionHead":
        """Try each C; keep the best on validation accuracy (then log loss).

        The features are standardised in one float32 array per split, which the head owns: read
        from the cache (FeatureRows) or copied from the arrays given. Nothing else of their size
        is made, so training needs about 1.1x the float32 training matrix, and splits that do
        not fit in memory are refused in one line before anything is read.

        The C values are fitted on two fixed chains (every other value, each warm-started from
        its previous, smaller C) that run side by side on their own core, in float32, each
        with one BLAS thread: for these small products BLAS threads cost more than they bring
        (on a busy 2-core machine two threads made a fit 7x slower than one). The chains do
        not depend on the core count, so the chosen C is the same on every machine.
        """
        n_classes = n_classes or int(max(y.max(), y_val.max())) + 1
        _check_memory(X, X_val)
        Z, y = _owned_float32(X, y)
        Z_val, y_val = _owned_float32(X_val, y_val)
        mean, variance = _moments(Z)
        scale = np.sqrt(variance)
        scale[scale == 0] = 1.0  # a constant feature, as StandardScaler leaves it
        for matrix in (Z, Z_val):
            _standardise_in_place(matrix, mean, scale)
        c_values = sorted(self.config.c_values)
        chains = [c_values[start::_CHAINS] for start in range(_CHAINS)]

        def fit_chain(chain: list[float]) -> list[tuple]:
            model = LogisticRegression(max_iter=self.config.max_iter, tol=self.config.tol, warm_start=True)
            fitted = []
            for c in chain:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)  # C is chosen on validation anyway
                    warnings.simplefilter("ignore", UserWarning)  # log_loss clipping near-certain probabilities
                    model.set_params(C=c).fit(Z, y)
                    proba = _expand(model.predict_proba(Z_val).astype(np.float64), model.classes_, n_classes)
                    score = (accuracy_score(y_val, proba.argmax(1)), -log_loss(y_val, proba, labels=range(n_classes)))
                fitted.append((c, score, model.coef_.astype(np.float64), model.intercept_.astype(np.float64),
                               model.classes_.copy()))
            return fitted

        workers = max(1, min(len(chains), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 1))
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            fitted = sorted((fit for chain in pool.map(fit_chain, [chain for chain in chains if chain]) for fit in chain),
                            key=lambda fit: fit[0])
        self.history_ = [{"C": c, "val_accuracy": score[0], "val_log_loss": -score[1]} for c, score, *_ in fitted]
        best = max(fitted, key=lambda fit: fit[1])  # the first of equals: the smallest C
        self.C_, _, coef, intercept, classes = best
        self.mean_, self.scale_ = mean, scale
        self.coef_, self.intercept_ = _softmax_form(coef, intercept, classes, n_classes)
        return self

    @property
    def params_(self) -> dict:
        return {"C": self.C_}

    def logits(self, X: np.ndarray) -> np.ndarray:
        """In float64, a chunk of rows at a time: never a float64 copy of all of X."""
        out = np.empty((len(X), len(self.intercept_)))
        for start in range(0, len(X), _CHUNK_ROWS):
            part = np.asarray(X[start:start + _CHUNK_ROWS], dtype=np.float64)
            out[start:start + len(part)] = ((part - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(X)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, directory: Path) -> None:
        with h5py.File(Path(directory) / FILE_NAME, "w") as f:
            for name in ("mean_", "scale_", "coef_", "intercept_"):
                f.create_dataset(name.rstrip("_"), data=getattr(self, name))
            f.attrs["C"] = self.C_

    @classmethod
    def load(cls, directory: Path) -> "LogisticRegressionHead":
        head = cls()
        with h5py.File(Path(directory) / FILE_NAME, "r") as f:
            for name in ("mean_", "scale_", "coef_", "intercept_"):
                setattr(head, name, f[name.rstrip("_")][...])
            head.C_ = float(f.attrs["C"])
        return head


def _expand(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every class, also those absent from the training labels."""
    full = np.zeros((len(proba), n_classes))
    full[:, classes] = proba
    return full


def _softmax_form(coef, intercept, classes, n_classes):
    """One logit row per class, so probabilities are always a softmax (binary included).

    A class never seen in training gets a logit of -inf-like magnitude so it is never chosen.
    """
    if len(classes) == 2 and coef.shape[0] == 1:  # sigmoid(z) == softmax([-z/2, z/2])
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    full_coef = np.zeros((n_classes, coef.shape[1]))
    full_intercept = np.full(n_classes, -1e4)
    full_coef[classes], full_intercept[classes] = coef, intercept
    return full_coef, full_intercept


def _owned_float32(X, y) -> tuple[np.ndarray, np.ndarray]:
    """A float32 array this head may overwrite: read from the cache, or a copy of the caller's."""
    if isinstance(X, FeatureRows):
        return X.read()
    return np.array(X, dtype=np.float32), np.asarray(y)


def _moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance in float64, a chunk at a time (StandardScaler would make a
    float64 temporary the size of X)."""
    mean = np.zeros(X.shape[1])
    for start in range(0, len(X), _CHUNK_ROWS):
        mean += X[start:start + _CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mean /= max(len(X), 1)
    m2 = np.zeros(X.shape[1])
    for start in range(0, len(X), _CHUNK_ROWS):
        m2 += ((X[start:start + _CHUNK_ROWS] - mean) ** 2).sum(axis=0)
    return mean, m2 / max(len(X), 1)


def _standardise_in_place(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> None:
    for start in range(0, len(X), _CHUNK_ROWS):
        part = X[start:start + _CHUNK_ROWS]
        part[...] = (part - mean) / scale


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(X, X_val) -> None:
    """Refuse, before reading, splits that cannot fit: better one line now than swapping for hours."""
    if not isinstance(X, FeatureRows):
        return  # the caller already holds the arrays
    need = int(1.15 * (X.nbytes + X_val.nbytes))
    have = available_memory()
    if have is not None and need > have:
        raise DatasetError(f"logistic regression on {len(X):,} x {X.feature_dim} features needs about "
                           f"{need / 2**30:.1f} GiB of memory and {have / 2**30:.1f} GiB is available; fix: set "
                           'head.kind = "dense", which streams its rows from the cache, or train on a machine '
                           "with more memory")

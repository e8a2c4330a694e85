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
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..config import LogRegConfig

FILE_NAME = "head.h5"
_CHAINS = 2  # warm-started chains of C values, fitted side by side


class LogisticRegressionHead:
    kind = "logreg"

    def __init__(self, config: LogRegConfig = LogRegConfig()):
        self.config = config

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
            n_classes: int | None = None) -> "LogisticRegressionHead":
        """Try each C; keep the best on validation accuracy (then log loss).

        The C values are fitted on two fixed chains (every other value, each warm-started from
        its previous, smaller C) that run side by side on their own core, in float32, each
        with one BLAS thread: for these small products BLAS threads cost more than they bring
        (on a busy 2-core machine two threads made a fit 7x slower than one). The chains do
        not depend on the core count, so the chosen C is the same on every machine.
        """
        n_classes = n_classes or int(max(y.max(), y_val.max())) + 1
        scaler = StandardScaler().fit(X)
        Z, Z_val = scaler.transform(X).astype(np.float32), scaler.transform(X_val).astype(np.float32)
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
        self.mean_, self.scale_ = scaler.mean_, scaler.scale_
        self.coef_, self.intercept_ = _softmax_form(coef, intercept, classes, n_classes)
        return self

    @property
    def params_(self) -> dict:
        return {"C": self.C_}

    def logits(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(np.asarray(X, dtype=np.float64))
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

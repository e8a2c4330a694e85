"""Logistic regression on standardised features, its strength chosen on validation data.

Fitted with scikit-learn, stored as the four arrays that define it (mean, scale,
coefficients, intercepts) so that loading needs no pickle and an export can rebuild it
exactly as standardisation plus one softmax layer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

from ..config import LogRegConfig

FILE_NAME = "head.h5"


class LogisticRegressionHead:
    kind = "logreg"
    learns_from_views = True

    def __init__(self, config: LogRegConfig = LogRegConfig()):
        self.config = config
        self.normalization_, self.view_weight_ = "none", 0.0

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
            n_classes: int | None = None, views: tuple[np.ndarray, np.ndarray] | None = None
            ) -> "LogisticRegressionHead":
        """Try each normalisation, view weight and C (warm-started, smallest first); keep the best on
        validation (accuracy, then log loss; on a tie the simpler option, tried first, stays).

        `views` are extra rows from augmented views of the training images; a weight of 0 leaves them
        out, so with 0 among `view_weights` the choice is never worse on validation than the plain head.
        """
        n_classes = n_classes or int(max(y.max(), y_val.max())) + 1
        weights = [0.0] if views is None else sorted(set(self.config.view_weights))
        best, self.history_ = None, []
        for normalization in dict.fromkeys(self.config.normalizations):
            clean, val = normalize(X, normalization), normalize(X_val, normalization)
            scaler = StandardScaler().fit(clean)  # from the clean rows only: views do not move the scale
            Z, Z_val = scaler.transform(clean), scaler.transform(val)
            Z_views = scaler.transform(normalize(views[0], normalization)) if views is not None else None
            for weight in weights:
                if weight:
                    rows, labels = np.vstack([Z, Z_views]), np.concatenate([y, views[1]])
                    sample_weight = np.concatenate([np.ones(len(Z)), np.full(len(Z_views), weight)])
                else:
                    rows, labels, sample_weight = Z, y, None
                model = LogisticRegression(max_iter=self.config.max_iter, warm_start=True)
                for c in sorted(self.config.c_values):
                    model.set_params(C=c)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)  # C is chosen on validation anyway
                        warnings.simplefilter("ignore", UserWarning)  # log_loss clipping near-certain probabilities
                        model.fit(rows, labels, sample_weight=sample_weight)
                        proba = _expand(model.predict_proba(Z_val), model.classes_, n_classes)
                        score = (accuracy_score(y_val, proba.argmax(1)),
                                 -log_loss(y_val, proba, labels=range(n_classes)))
                    self.history_.append({"C": c, "normalization": normalization, "view_weight": weight,
                                          "val_accuracy": score[0], "val_log_loss": -score[1]})
                    if best is None or score > best[0]:
                        best = (score, c, normalization, weight, scaler, model.coef_.copy(), model.intercept_.copy(),
                                model.classes_.copy())
        _, self.C_, self.normalization_, self.view_weight_, scaler, coef, intercept, classes = best
        self.mean_, self.scale_ = scaler.mean_, scaler.scale_
        self.coef_, self.intercept_ = _softmax_form(coef, intercept, classes, n_classes)
        return self

    @property
    def params_(self) -> dict:
        return {"C": self.C_, "normalization": self.normalization_, "view_weight": self.view_weight_}

    def logits(self, X: np.ndarray) -> np.ndarray:
        return ((normalize(X, self.normalization_) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

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
            f.attrs["normalization"] = self.normalization_
            f.attrs["view_weight"] = self.view_weight_

    @classmethod
    def load(cls, directory: Path) -> "LogisticRegressionHead":
        head = cls()
        with h5py.File(Path(directory) / FILE_NAME, "r") as f:
            for name in ("mean_", "scale_", "coef_", "intercept_"):
                setattr(head, name, f[name.rstrip("_")][...])
            head.C_ = float(f.attrs["C"])
            head.normalization_ = str(f.attrs.get("normalization", "none"))  # heads saved before it existed: none
            head.view_weight_ = float(f.attrs.get("view_weight", 0.0))
        return head


def normalize(X: np.ndarray, kind: str) -> np.ndarray:
    """A feature vector's normalisation before standardising: none, l2 (unit length), or sqrt
    (signed square root, then unit length: the power normalisation of Fisher vectors)."""
    X = np.asarray(X, dtype=np.float64)
    if kind == "sqrt":
        X = np.sign(X) * np.sqrt(np.abs(X))
    if kind in ("l2", "sqrt"):
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


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

"""Logistic regression on normalised, standardised features; normalisation, the weight of
augmented views and the strength C chosen by cross-validation over the training images (or on
the validation split, when it is large or `selection = "validation"`).

Fitted with scikit-learn, stored as the four arrays that define it (mean, scale,
coefficients, intercepts) so that loading needs no pickle and an export can rebuild it
exactly as standardisation plus one softmax layer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from threadpoolctl import threadpool_limits

from ..config import LogRegConfig
from ..errors import DatasetError
from ..execution import usable_cores
from ..features import FeatureRows, TrainingViews
from .base import FeatureHead

log = logging.getLogger(__name__)

FILE_NAME = "head.h5"
_CHUNK_ROWS = 8192
_CHAINS = 2  # warm-started chains of C values, fitted side by side
# cross-validation's fits stop at this tolerance (or head.logreg.tol, if looser): scores that choose
# a setting need less precision than the model kept, and it halves the search (README measures both)
_CV_TOL = 1e-3
# selection = "auto" cross-validates while the validation split has fewer rows than this: at 5,000 an
# accuracy's standard error is under 0.6 points, small beside what choosing among the settings gains
CROSS_VALIDATE_BELOW = 5000


class LogisticRegressionHead(FeatureHead):
    """Each parameter is the `head.logreg` key of the same name (see LogRegConfig)."""
    kind = "logreg"
    config_class = LogRegConfig
    learns_from_views = True
    folds_by_identity = True

    def __init__(self, *, c_values=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), max_iter: int = 1000,
                 normalizations=("none", "l2", "sqrt"), view_weights=(0.0, 0.3, 1.0), selection: str = "auto",
                 folds: int = 5, tol: float = 1e-4):
        self.c_values = c_values
        self.max_iter = max_iter
        self.normalizations = normalizations
        self.view_weights = view_weights
        self.selection = selection
        self.folds = folds
        self.tol = tol

    def fit(self, X: np.ndarray | FeatureRows, y: np.ndarray, X_val: np.ndarray | FeatureRows | None = None,
            y_val: np.ndarray | None = None, n_classes: int | None = None,
            views: TrainingViews | None = None, groups: Sequence[str] | None = None) -> "LogisticRegressionHead":
        """Try each normalisation, view weight and C; keep the best by accuracy, where accuracies
        within one standard error of the best are a tie that the lower log loss breaks (of equals,
        the simplest: normalisations in the order given, smaller weights, smaller C). Without that
        tolerance a one-image difference decided between settings whose log losses differ by a
        third (flowers5: C = 1 kept over C = 0.03, 0.79 against 0.845 on validation).

        With `selection = "cv"` (and "auto", the default, while the validation split has fewer
        than CROSS_VALIDATE_BELOW rows) each setting is scored by stratified k-fold
        cross-validation over the training rows: every row is held out once, in a fold drawn
        from a hash of its identity in `groups` (train passes each image's content hash, so the
        folds are the same on every machine, however its floats round; without `groups`, a
        hash of the row's features: independent of the rows' order, but not of rounding), and
        scored by a model fitted on the other folds. The
        chosen setting is then fitted on all training rows. The validation split plays no
        part in the choice, so its score is one the head was never tuned on. With
        `selection = "validation"` each setting is fitted on the training rows and scored on
        the validation split (choosing among many settings on a small validation split fits
        its noise: README, "Augmented views, TTA and richer features"; a large one does not, and
        "auto" uses it from CROSS_VALIDATE_BELOW rows on, where k-fold would cost k times the fits
        and a copy of the training rows).

        `views` are extra rows from augmented views of the training images, each weighted by the
        view weight; 0 leaves them out, and with 0 among `view_weights` a weight is kept only if
        it scores at least as well as the head the same rule picks without views, on what it is
        chosen on (the cross-validation score, or the validation split). In cross-validation a view is in its image's fold: a held-out image's
        views are never trained on. Standardisation is fitted on the clean rows only.

        The features are standardised in float32 arrays the head owns: read from the cache
        (FeatureRows) or copied from the arrays given; splits that do not fit in memory are
        refused in one line before anything is read.

        The C values are fitted on two fixed chains (every other value, each warm-started from
        its previous, smaller C) that run side by side on their own core, in float32, each
        with one BLAS thread: for these small products BLAS threads cost more than they bring
        (on a busy 2-core machine two threads made a fit 7x slower than one). The chains do
        not depend on the core count, so the chosen C is the same on every machine.
        Cross-validation's fits stop at a tolerance of 1e-3 (or `tol`, if looser); the model
        kept is fitted to `tol`.
        """
        config = self.checked_config()
        if views is not None and not isinstance(views, TrainingViews):
            raise TypeError(f"views is a {type(views).__name__}; fix: pass pipeline.features.TrainingViews(features, "
                            "labels, sources), sources being the training row each view is of (cross-validation "
                            "keeps an image's views in its fold)")
        cross_validate = config.selection == "cv" or (config.selection == "auto" and (
            X_val is None or len(X_val) < CROSS_VALIDATE_BELOW))
        X, y, X_val, y_val = self._prepare(X, y, X_val, y_val, n_classes, hold_out=not cross_validate)
        n_classes = len(self.classes_)
        _check_memory(X, X_val, cross_validate)
        weights = [0.0] if views is None else sorted(set(config.view_weights))
        c_values = sorted(config.c_values)
        chains = [chain for start in range(_CHAINS) if (chain := c_values[start::_CHAINS])]
        folds, view_labels = None, None if views is None else views.labels
        problems, scored = [], []  # problems: (normalization, weight, mean, scale) in the order of preference among equals
        for normalization in dict.fromkeys(config.normalizations):
            # one normalisation's matrices at a time, read (or copied) afresh and transformed in place:
            # three normalisations of a million rows must not hold three copies of them
            Z, labels = _owned_float32(X, y)
            if cross_validate and folds is None:  # drawn from the identities, or else the raw rows
                if groups is not None and len(groups) != len(labels):
                    raise ValueError(f"groups has {len(groups)} identities for {len(labels)} training rows; fix: "
                                     "pass one per row of X, in its order")
                folds = _fold_numbers(Z if groups is None else groups, labels, config.folds)
            mean, scale = _normalise_and_standardise(Z, normalization)
            Z_views = None if views is None else _standardised_copy(views.features, normalization, mean, scale)
            first = len(problems)
            problems += [(normalization, weight, mean, scale) for weight in weights]
            if cross_validate:
                scored += _cross_validated(Z, labels, Z_views, views, folds, first, weights, chains, n_classes, config)
            else:
                Z_val, y_val = _owned_float32(X_val, y_val)
                _normalize_in_place(Z_val, normalization)
                _standardise_in_place(Z_val, mean, scale)
                jobs = [(first + number, _weighted(Z, labels, Z_views, view_labels, weight), chain)
                        for number, weight in enumerate(weights) for chain in chains]
                scored += [(number, c, (correct / len(y_val), loss / len(y_val)), *fit)
                           for number, c, (correct, loss), *fit in _fit_chains(jobs, (Z_val, y_val), n_classes, config)]
                del Z_val, jobs
            del Z, Z_views
        scored.sort(key=lambda fit: fit[:2])
        on = "cv" if cross_validate else "val"
        self.history_ = [{"C": c, "normalization": problems[number][0], "view_weight": problems[number][1],
                          f"{on}_accuracy": score[0], f"{on}_log_loss": -score[1]}
                         for number, c, score, *_ in scored]
        held_rows = len(labels) if cross_validate else len(y_val)
        without_views = [fit for fit in scored if not problems[fit[0]][1]]
        floor = _within_noise_lowest_loss(without_views, held_rows)[2][0] if without_views else 0.0
        best = _within_noise_lowest_loss([fit for fit in scored if fit[2][0] >= floor], held_rows)
        number, self.C_ = best[:2]
        self.normalization_, self.view_weight_, self.mean_, self.scale_ = problems[number]
        self.selection_ = f"{config.folds}-fold cv" if cross_validate else "validation"
        if cross_validate:  # the chosen setting, fitted on every training row
            Z, labels = _owned_float32(X, y)
            _normalise_and_standardise(Z, self.normalization_, (self.mean_, self.scale_))
            Z_views = None if views is None else _standardised_copy(views.features, self.normalization_,
                                                                    self.mean_, self.scale_)
            rows = _weighted(Z, labels, Z_views, view_labels, self.view_weight_)
            best = _fit_chains([(number, rows, [self.C_])], None, n_classes, config)[0]
        coef, intercept, classes, self.n_iter_ = best[3:]
        self.coef_, self.intercept_ = _softmax_form(coef, intercept, classes, n_classes)
        return self

    @property
    def params_(self) -> dict:
        return {"C": self.C_, "normalization": self.normalization_, "view_weight": self.view_weight_,
                "selected_by": self.selection_}

    def logits(self, X: np.ndarray) -> np.ndarray:
        """In float64, a chunk of rows at a time: never a float64 copy of all of X."""
        out = np.empty((len(X), len(self.intercept_)))
        for start in range(0, len(X), _CHUNK_ROWS):
            part = normalize(np.asarray(X[start:start + _CHUNK_ROWS], dtype=np.float64), self.normalization_)
            out[start:start + len(part)] = ((part - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(self._checked_rows(X))
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
            f.attrs["selected_by"] = self.selection_

    def to_keras(self, features):
        """The head as stock Keras layers on a features tensor: the same normalisation, standardisation
        and softmax, with the same numbers (what export puts behind the backbone)."""
        import keras

        x = features
        if self.normalization_ == "sqrt":  # Keras operations in a functional graph: plain Keras loads them
            x = keras.ops.sign(x) * keras.ops.sqrt(keras.ops.abs(x))
        if self.normalization_ in ("l2", "sqrt"):
            x = keras.layers.UnitNormalization(name="l2_normalise")(x)
        # squared in float32, so that the layer's float32 square root gives back exactly the stored scale
        # (never under keras.config.epsilon(), which the layer divides by at least: the head floors it there)
        scale = self.scale_.astype(np.float32)
        x = keras.layers.Normalization(mean=self.mean_, variance=scale * scale, name="standardise")(x)
        dense = keras.layers.Dense(len(self.intercept_), activation="softmax", name="probabilities")
        x = dense(x)
        dense.set_weights([self.coef_.T, self.intercept_])
        return x

    @classmethod
    def load(cls, directory: Path) -> "LogisticRegressionHead":
        head = cls()
        with h5py.File(Path(directory) / FILE_NAME, "r") as f:
            for name in ("mean_", "scale_", "coef_", "intercept_"):
                setattr(head, name, f[name.rstrip("_")][...])
            head.classes_, head.n_features_in_ = np.arange(len(head.intercept_)), head.mean_.shape[0]
            head.C_ = float(f.attrs["C"])
            head.normalization_ = str(f.attrs.get("normalization", "none"))  # heads saved before it existed: none
            head.view_weight_ = float(f.attrs.get("view_weight", 0.0))
            head.selection_ = str(f.attrs.get("selected_by", "validation"))  # heads saved before cv: validation
        return head


def normalize(X: np.ndarray, kind: str) -> np.ndarray:
    """A feature vector's normalisation before standardising, in X's float dtype: none (X itself),
    l2 (unit length), or sqrt (signed square root, then unit length: Fisher vectors' power
    normalisation). Anything but none returns a new array."""
    if kind == "none":
        return X
    if kind == "sqrt":
        X = np.sign(X) * np.sqrt(np.abs(X))
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12).astype(X.dtype)


def _fit_chains(jobs: list, held: tuple[np.ndarray, np.ndarray] | None, n_classes: int,
                config: LogRegConfig, tol: float | None = None) -> list[tuple]:
    """Each job's chain of C values, warm-started, the chains side by side on the usable cores;
    each fit scored on the held-out rows (when given) as its count of correct rows and its
    negative summed log loss. Returns (problem, C, score, coef, intercept, classes, n_iter)."""

    def fit_chain(job) -> list[tuple]:
        number, (rows, labels, sample_weight), chain = job
        model = LogisticRegression(max_iter=config.max_iter, tol=tol or config.tol, warm_start=True)
        fitted = []
        for c in chain:
            model.set_params(C=c).fit(rows, labels, sample_weight=sample_weight)
            score = (0, 0.0)
            if held is not None:
                Z_held, y_held = held
                proba = _expand(model.predict_proba(Z_held).astype(np.float64), model.classes_, n_classes)
                proba /= proba.sum(axis=1, keepdims=True)  # float32 rounding must not read as "not probabilities"
                score = (int(np.sum(proba.argmax(1) == y_held)),
                         -log_loss(y_held, proba, labels=range(n_classes), normalize=False))
            fitted.append((number, c, score, model.coef_.astype(np.float64), model.intercept_.astype(np.float64),
                           model.classes_.copy(), model.n_iter_.copy()))
        return fitted

    workers = min(len(jobs), usable_cores())
    # warning filters are process-wide, so they are set here, around every thread, not inside one
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore", ConvergenceWarning)  # C is chosen on held-out rows anyway
        return [fit for chain in pool.map(fit_chain, jobs) for fit in chain]


def _cross_validated(Z: np.ndarray, labels: np.ndarray, Z_views: np.ndarray | None, views: TrainingViews | None,
                     folds: np.ndarray, first: int, weights: list[float], chains: list[list[float]], n_classes: int,
                     config: LogRegConfig) -> list[tuple]:
    """Every (view weight, C) of one normalisation scored by k-fold cross-validation: each fold's
    rows held out in turn and scored by models fitted on the other folds (with the views of their
    images only). Returns (problem, C, (accuracy, -mean log loss)) over all held-out rows."""
    totals: dict[tuple[int, float], list] = {}
    held_rows = 0
    for fold in np.unique(folds):
        out = folds == fold
        if len(np.unique(labels[~out])) < 2:
            continue  # too few rows for this fold: a classifier needs two classes
        held = (Z[out], labels[out])
        Z_in, y_in = Z[~out], labels[~out]
        fold_views = None
        if views is not None:
            keep = ~out[views.sources]
            fold_views = (Z_views[keep], views.labels[keep])
        jobs = [(first + number, _weighted(Z_in, y_in, *(fold_views or (None, None)), weight), chain)
                for number, weight in enumerate(weights) for chain in chains]
        for number, c, (correct, loss), *_ in _fit_chains(jobs, held, n_classes, config, max(config.tol, _CV_TOL)):
            total = totals.setdefault((number, c), [0, 0.0])
            total[0] += correct
            total[1] += loss
        held_rows += int(out.sum())
        del held, Z_in, y_in, fold_views, jobs
    if not held_rows:  # a handful of rows: every setting scores alike, and the simplest is kept
        log.warning("logistic regression: %d training rows are too few to cross-validate; the simplest setting "
                    "is kept (the first normalisation, no views, the smallest C)", len(labels))
        return [(first + number, c, (0.0, 0.0)) for number in range(len(weights)) for chain in chains for c in chain]
    return [(number, c, (correct / held_rows, loss / held_rows)) for (number, c), (correct, loss) in totals.items()]


def _within_noise_lowest_loss(scored: list[tuple], held_rows: int) -> tuple:
    """Of the fits whose accuracy is within one standard error (sqrt(p(1 - p) / n), on the n
    held-out rows) of the best, the one with the lowest log loss; the first of equals."""
    top = max(fit[2][0] for fit in scored)
    noise = math.sqrt(top * (1 - top) / max(held_rows, 1))
    return max((fit for fit in scored if fit[2][0] >= top - noise - 1e-12), key=lambda fit: fit[2][1])


def _fold_numbers(identities: np.ndarray | Sequence[str], labels: np.ndarray, folds: int) -> np.ndarray:
    """Each row's fold: within each class, the distinct identities (content hashes, or the raw
    feature rows) ordered by their hash and dealt out in turn (from a fold that depends on the
    class), so every fold has its share of every class, the folds depend on the rows themselves,
    not their order, and copies of one image (the same file twice) share a fold: a held-out row
    is never scored by a model that trained on its copy."""
    if isinstance(identities, np.ndarray):
        identities = [row.tobytes() for row in np.ascontiguousarray(identities, dtype=np.float32)]
    digests = np.array([int.from_bytes(hashlib.blake2b(identity.encode() if isinstance(identity, str) else identity,
                                                       digest_size=8).digest(), "little")
                        for identity in identities], dtype=np.uint64)
    distinct, first, row_of = np.unique(digests, return_index=True, return_inverse=True)
    classes = labels[first]  # a copy's class is its first row's
    order = np.lexsort((distinct, classes))
    ordered = classes[order]
    rank = np.arange(len(order)) - np.searchsorted(ordered, ordered)  # place within its class
    numbers = np.empty(len(distinct), np.int64)
    numbers[order] = (rank + ordered) % folds
    return numbers[row_of.reshape(-1)]


def _weighted(Z: np.ndarray, labels: np.ndarray, Z_views: np.ndarray | None, view_labels: np.ndarray | None,
              weight: float) -> tuple:
    """(rows, labels, sample weights) to fit: the clean rows, and the views' rows at `weight` unless it is 0."""
    if not weight or Z_views is None:
        return Z, labels, None
    return (np.vstack([Z, Z_views]), np.concatenate([labels, view_labels]),
            np.concatenate([np.ones(len(Z)), np.full(len(Z_views), weight)]))


def _normalise_and_standardise(Z: np.ndarray, normalization: str,
                               moments: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Z normalised and standardised in place, with the given mean and scale or Z's own; returns them."""
    _normalize_in_place(Z, normalization)
    if moments is None:
        mean, variance = _moments(Z)
        moments = mean, _standard_scale(variance)
    _standardise_in_place(Z, *moments)
    return moments


def _standardised_copy(X: np.ndarray, normalization: str, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    Z = np.array(X, dtype=np.float32)
    _normalise_and_standardise(Z, normalization, (mean, scale))
    return Z


def _normalize_in_place(X: np.ndarray, kind: str) -> None:
    """`normalize`, a chunk of rows at a time, into X itself."""
    if kind != "none":
        for start in range(0, len(X), _CHUNK_ROWS):
            X[start:start + _CHUNK_ROWS] = normalize(X[start:start + _CHUNK_ROWS], kind)


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


def _check_memory(X, X_val, cross_validate: bool) -> None:
    """Refuse, before reading, splits that cannot fit: better one line now than swapping for hours.
    Cross-validation holds a fold's copy of the training rows where choosing on validation holds
    the validation split, so its refusal names that cheaper choice when it would fit."""
    if not isinstance(X, FeatureRows):
        return  # the caller already holds the arrays
    need = int(1.15 * (X.nbytes + (X.nbytes if cross_validate or X_val is None else X_val.nbytes)))
    have = available_memory()
    if have is None or need <= have:
        return
    cheaper = ""
    if cross_validate and X_val is not None and int(1.15 * (X.nbytes + X_val.nbytes)) <= have:
        cheaper = ('head.logreg.selection = "validation", which chooses on the validation split without a '
                   "fold's copy of the training rows, or ")
    raise DatasetError(f"logistic regression on {len(X):,} x {X.feature_dim} features needs about "
                       f"{need / 2**30:.1f} GiB of memory and {have / 2**30:.1f} GiB is available; fix: set "
                       f'{cheaper}head.kind = "dense", which streams its rows from the cache, or train on a machine '
                       "with more memory")


# what keras.layers.Normalization divides by at least (keras.config.epsilon()): the exported
# head standardises with that layer, so the head must never divide by less
EXPORTED_SCALE_FLOOR = 1e-7


def _standard_scale(variance: np.ndarray) -> np.ndarray:
    """Standard deviations as the exported Normalization layer will apply them.

    Features that barely vary on the training images (common with random weights, whose
    features are of the order of 1e-4) can have standard deviations under 1e-7; dividing by
    them here while the export divides by 1e-7 made the export differ from the report by
    0.007 on Inception V3. A constant feature gets 1, as StandardScaler gives it.
    """
    scale = np.sqrt(variance)
    return np.where(scale == 0, 1.0, np.maximum(scale, EXPORTED_SCALE_FLOOR))

"""What the heads trained on cached features share: scikit-learn's estimator contract.

A head is a scikit-learn classifier (`BaseEstimator`, `ClassifierMixin`): its settings are
keyword parameters named as in its config table, `get_params`/`set_params`/`clone` work, and
`cross_val_score` or `GridSearchCV` run on cached features. It is fitted with
`fit(X, y)`, or `fit(X, y, X_val, y_val)` with a validation split (what `train` does): the
dense head stops early on it, the logistic-regression head chooses its hyperparameters by
cross-validation over X (or on it, with `selection = "validation"`). A head that needs a
validation split and gets none holds out a fixed fifth of X for that.
Labels may be anything scikit-learn accepts (`classes_` keeps them); `train` passes class
indices with `n_classes`, so that a class absent from the training rows still has a column.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..features import FeatureRows

VALIDATION_SHARE = 0.2  # of X held out to choose hyperparameters when no validation split is given
_VALIDATION_SEED = 0


class FeatureHead(ClassifierMixin, BaseEstimator):
    """Base of the heads on cached features; a subclass names its kind and its config table."""

    kind: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)  # the Section its parameters are checked by
    learns_from_views: ClassVar[bool] = False  # fit(..., views=) uses augmented views of the training images
    folds_by_identity: ClassVar[bool] = False  # fit(..., groups=) draws cross-validation folds from row identities

    @classmethod
    def from_config(cls, config) -> "FeatureHead":
        """The head with the settings of its config table (`head.logreg`, `head.dense`)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def checked_config(self):
        """The parameters as their config table, checked like a config file's (ConfigError naming the key)."""
        return self.config_class(**{key: list(value) if isinstance(value, tuple) else value
                                    for key, value in self.get_params().items()})

    def _prepare(self, X, y, X_val, y_val, n_classes: int | None,
                 hold_out: bool = True) -> tuple[Any, np.ndarray, Any, np.ndarray]:
        """Checked inputs with labels as class indices; sets `classes_` and `n_features_in_`.

        Cached rows (FeatureRows) carry class indices already. Arrays are checked as
        scikit-learn checks them (2-d, finite, numeric); without a validation split a fixed
        random fifth of X becomes one (all of X when it is too small to split) if `hold_out`,
        else there is none (a head that cross-validates on X needs none).
        """
        if isinstance(X, FeatureRows):
            y = np.asarray(y)
            y_val = np.asarray(y if y_val is None else y_val)
            self.classes_ = np.arange(n_classes or int(max(y.max(), y_val.max())) + 1)
            self.n_features_in_ = X.feature_dim
            return X, y, X_val, y_val
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        if X_val is None and hold_out:
            X, y, X_val, y_val = _held_out(X, y)
        elif X_val is None:
            X_val, y_val = X[:0], y[:0]
        else:
            X_val = validate_data(self, X_val, dtype=[np.float32, np.float64], reset=False)
            y_val = np.asarray(y_val)
        if n_classes is not None:
            self.classes_ = np.arange(n_classes)
            return X, np.asarray(y, np.int64), X_val, np.asarray(y_val, np.int64)
        self.classes_ = np.unique(np.concatenate([y, y_val]))
        return X, np.searchsorted(self.classes_, y), X_val, np.searchsorted(self.classes_, y_val)

    def _checked_rows(self, X) -> np.ndarray:
        check_is_fitted(self, "classes_")
        return validate_data(self, X, dtype=[np.float32, np.float64], reset=False)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # checks that the head is fitted, and X
        return self.classes_[proba.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


def _held_out(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed random fifth of the rows as the validation split; all rows for both when there are fewer than five."""
    if len(X) < 5:
        return X, y, X, y
    order = np.random.default_rng(_VALIDATION_SEED).permutation(len(X))
    cut = max(1, round(VALIDATION_SHARE * len(X)))
    val, train = order[:cut], order[cut:]
    return X[train], y[train], X[val], y[val]

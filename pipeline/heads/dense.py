"""A small dense network on cached features: hidden layer(s), dropout, early stopping.

Class weights counter imbalance; the best epoch on validation loss is kept. Saved as a
`.keras` file with its normalisation inside, so it loads with plain Keras.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from ..config import DenseConfig
from ..features import CHUNK_ROWS, FeatureRows
from .base import FeatureHead

FILE_NAME = "head.keras"
_PREDICT_BATCH = 4096


class DenseHead(FeatureHead):
    """Each parameter is the `head.dense` key of the same name (see DenseConfig)."""
    kind = "dense"
    config_class = DenseConfig

    def __init__(self, *, hidden_units=(256,), dropout: float = 0.5, learning_rate: float = 0.001,
                 batch_size: int = 64, epochs: int = 200, patience: int = 10, class_weight: str = "balanced",
                 seed: int = 0):
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed

    def fit(self, X: np.ndarray | FeatureRows, y: np.ndarray, X_val: np.ndarray | FeatureRows | None = None,
            y_val: np.ndarray | None = None, n_classes: int | None = None) -> "DenseHead":
        """From arrays, or streamed from the cache (FeatureRows) in shuffled chunks through tf.data,
        so that memory stays flat however many rows there are."""
        import keras

        config = self.checked_config()
        X, y, X_val, y_val = self._prepare(X, y, X_val, y_val, n_classes)
        n_classes = len(self.classes_)
        keras.utils.set_random_seed(config.seed)
        if isinstance(X, FeatureRows):
            mean, variance = X.moments()
            normalise = keras.layers.Normalization(mean=mean, variance=variance, name="standardise")
            dim = X.feature_dim
        else:
            normalise = keras.layers.Normalization(name="standardise")
            normalise.adapt(np.asarray(X, np.float32))
            dim = X.shape[1]
        layers = [keras.Input((dim,), name="features"), normalise]
        for units in config.hidden_units:
            layers += [keras.layers.Dense(units, activation="relu"), keras.layers.Dropout(config.dropout)]
        layers.append(keras.layers.Dense(n_classes, activation="softmax", name="probabilities"))
        self.model_ = keras.Sequential(layers, name="dense_head")
        self.model_.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                            loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        weights = None
        if config.class_weight == "balanced":
            present = np.unique(y)
            weights = dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=y)))
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
        if isinstance(X, FeatureRows):
            fitted = self.model_.fit(_stream(X, config.batch_size, weights, config.seed),
                                     validation_data=_stream(X_val, _PREDICT_BATCH), epochs=config.epochs,
                                     callbacks=[stop], shuffle=False, verbose=0)
        else:
            fitted = self.model_.fit(X, y, validation_data=(X_val, y_val), epochs=config.epochs,
                                     batch_size=config.batch_size, class_weight=weights, callbacks=[stop],
                                     verbose=0)
        self.history_ = [dict(epoch=i + 1, **{k: float(v[i]) for k, v in fitted.history.items()})
                         for i in range(len(fitted.history["loss"]))]
        self.best_epoch_ = int(np.argmin(fitted.history["val_loss"])) + 1
        return self

    @property
    def params_(self) -> dict:
        return {"hidden_units": list(self.hidden_units), "dropout": self.dropout,
                "learning_rate": self.learning_rate, "best_epoch": self.best_epoch_}

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = self._checked_rows(X)
        return np.asarray(self.model_.predict(np.asarray(X, np.float32), batch_size=_PREDICT_BATCH, verbose=0),
                          np.float64)

    def to_keras(self, features):
        """The head as Keras layers on a features tensor: its own model, whole."""
        return self.model_(features)

    def save(self, directory: Path) -> None:
        self.model_.save(Path(directory) / FILE_NAME)

    @classmethod
    def load(cls, directory: Path) -> "DenseHead":
        import keras

        head = cls()
        head.model_ = keras.saving.load_model(Path(directory) / FILE_NAME, safe_mode=True)
        head.classes_ = np.arange(int(head.model_.output_shape[-1]))
        head.n_features_in_ = int(head.model_.input_shape[-1])
        return head


def _stream(rows: FeatureRows, batch_size: int, class_weight: dict | None = None, seed: int | None = None):
    """A tf.data pipeline over the cache: chunks in a new shuffled order each epoch (with a seed),
    cut into batches of (features, label, sample weight)."""
    import tensorflow as tf

    weight_of = np.ones(int(rows.labels.max()) + 1, np.float32)
    for label, weight in (class_weight or {}).items():
        weight_of[label] = weight
    epoch = iter(range(1 << 30))

    def batches():
        for X, y in rows.chunks(CHUNK_ROWS, seed=None if seed is None else seed + next(epoch)):
            for start in range(0, len(y), batch_size):
                labels = y[start:start + batch_size]
                yield X[start:start + batch_size], labels, weight_of[labels]

    signature = (tf.TensorSpec((None, rows.feature_dim), tf.float32), tf.TensorSpec((None,), tf.int64),
                 tf.TensorSpec((None,), tf.float32))
    steps = sum(-(-min(CHUNK_ROWS, len(rows) - start) // batch_size) for start in range(0, len(rows), CHUNK_ROWS))
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)

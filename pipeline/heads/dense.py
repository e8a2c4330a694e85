"""A small dense network on cached features: hidden layer(s), dropout, early stopping.

Class weights counter imbalance; the best epoch on validation loss is kept. Saved as a
`.keras` file with its normalisation inside, so it loads with plain Keras.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from ..config import DenseConfig

FILE_NAME = "head.keras"


class DenseHead:
    kind = "dense"

    def __init__(self, config: DenseConfig = DenseConfig()):
        self.config = config

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
            n_classes: int | None = None) -> "DenseHead":
        import keras

        n_classes = n_classes or int(max(y.max(), y_val.max())) + 1
        keras.utils.set_random_seed(self.config.seed)
        normalise = keras.layers.Normalization(name="standardise")
        normalise.adapt(X.astype(np.float32))
        layers = [keras.Input((X.shape[1],), name="features"), normalise]
        for units in self.config.hidden_units:
            layers += [keras.layers.Dense(units, activation="relu"), keras.layers.Dropout(self.config.dropout)]
        layers.append(keras.layers.Dense(n_classes, activation="softmax", name="probabilities"))
        self.model_ = keras.Sequential(layers, name="dense_head")
        self.model_.compile(optimizer=keras.optimizers.Adam(self.config.learning_rate),
                            loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        weights = None
        if self.config.class_weight == "balanced":
            present = np.unique(y)
            weights = dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=y)))
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.config.patience, restore_best_weights=True)
        fitted = self.model_.fit(X, y, validation_data=(X_val, y_val), epochs=self.config.epochs,
                                 batch_size=self.config.batch_size, class_weight=weights, callbacks=[stop], verbose=0)
        self.history_ = [dict(epoch=i + 1, **{k: float(v[i]) for k, v in fitted.history.items()})
                         for i in range(len(fitted.history["loss"]))]
        self.best_epoch_ = int(np.argmin(fitted.history["val_loss"])) + 1
        return self

    @property
    def params_(self) -> dict:
        config = self.config
        return {"hidden_units": config.hidden_units, "dropout": config.dropout,
                "learning_rate": config.learning_rate, "best_epoch": self.best_epoch_}

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.predict(np.asarray(X, np.float32), batch_size=4096, verbose=0), np.float64)

    def save(self, directory: Path) -> None:
        self.model_.save(Path(directory) / FILE_NAME)

    @classmethod
    def load(cls, directory: Path) -> "DenseHead":
        import keras

        head = cls()
        head.model_ = keras.saving.load_model(Path(directory) / FILE_NAME, safe_mode=True)
        return head

"""The from-scratch baseline: a small CNN trained on the raw images, with no ImageNet features.

It answers the question transfer learning raises: how much does it buy on *this* data?
(In the ml4a seed, about 49% from scratch against 78% with transfer on Caltech-101.) The
baseline sees the same images in the same content-hash splits as the transfer runs, gets
the same report, and lands in the same comparison table, clearly labelled. It is
optional: nothing else depends on it. TensorFlow is imported only when it runs.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import SEED, Config, Section, setting
from .dataset import assign_splits
from .errors import DatasetError
from .features import CachedImages, dataset_from_config, trainable
from .html_report import conflict_groups
from .pixel_models import decode_images, model_record
from .runs import RunInfo, Sample, new_run_dir, save_run

FROM_SCRATCH = "scratch_cnn"  # run.json "head" of a baseline run, which also says "from_scratch": true


@dataclass(frozen=True)
class BaselineSettings(Section, key="baseline"):
    """Deliberately small and conventional: a baseline, not a competitor to tune."""
    image_size: int = setting(96, at_least=16)  # pixels per side, squashed as for the backbones; 96 keeps a CPU epoch short
    filters: tuple[int, ...] = setting((32, 64, 128, 256), at_least=1)  # one conv block (conv, batch norm, relu, max pool) each
    dropout: float = setting(0.5, at_least=0, below=1)
    learning_rate: float = setting(0.001, above=0)
    batch_size: int = setting(32, at_least=1)
    epochs: int = setting(100, at_least=1)  # upper bound; early stopping on validation loss ends sooner
    patience: int = setting(10, at_least=0)
    seed: int = setting(0, **SEED)


@dataclass
class BaselineResult:
    run_dir: Path
    labels: list[str]
    split_sizes: dict[str, int]
    epochs_run: int
    best_epoch: int
    val_accuracy: float
    failed: dict[str, str]  # relpath -> why it could not be decoded
    seconds: float
    warnings: list[str]  # one line each: empty classes, label conflicts

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {v}" for k, v in self.split_sizes.items())
        lines = [f"baseline (from scratch, no transfer): small CNN on {len(self.labels)} classes ({sizes}); "
                 f"{self.epochs_run} epochs, best {self.best_epoch}; validation accuracy {self.val_accuracy:.4f} "
                 f"({self.seconds:.1f} s)", f"run: {self.run_dir}"]
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) could not be decoded and are left out, e.g. "
                         + "; ".join(f"{path}: {why}" for path, why in list(self.failed.items())[:3]))
        return "\n".join(lines)


def run_baseline(config: Config, settings: BaselineSettings = BaselineSettings(), *,
                 progress: bool = True) -> BaselineResult:
    """Decode every image once, split by content hash as `train` does, train the CNN, save a run."""
    started = time.perf_counter()
    dataset = dataset_from_config(config)
    decoded, failed = decode_images(dataset.entries, settings.image_size, config, progress=progress)
    keys = {relpath: key for relpath, (key, _) in decoded.items()}
    entries, conflict_warnings = trainable(dataset, CachedImages(keys, failed, []))  # as train leaves them out
    splits = assign_splits(entries, keys, val_percent=config.data.val_percent, test_percent=config.data.test_percent)
    labels = sorted({entry.label for entry in entries if entry.label is not None})
    samples = [Sample(e.relpath, keys[e.relpath], e.label, splits[e.relpath])
               for e in entries if e.relpath in splits]
    class_of = {label: i for i, label in enumerate(labels)}
    data = {}
    for split in ("train", "val"):
        chosen = [s for s in samples if s.split == split and s.label is not None]
        if not chosen:
            raise DatasetError(f"the {split} split is empty; fix: add images or adjust data.val_percent")
        data[split] = (np.stack([decoded[s.image][1] for s in chosen]),
                       np.array([class_of[s.label] for s in chosen]))
    del decoded
    model, history = train_cnn(*data["train"], *data["val"], n_classes=len(labels), settings=settings,
                               progress=progress)
    best = min(history, key=lambda h: h["val_loss"])
    split_sizes = {split: sum(s.split == split for s in samples) for split in ("train", "val", "test")}
    seconds = time.perf_counter() - started
    run_dir = new_run_dir(config, "scratch-cnn")  # beside the transfer runs
    record = model_record(settings.image_size)
    model.save(run_dir / record["file"])
    params = {**dataclasses.asdict(settings), "best_epoch": best["epoch"]}
    info = RunInfo(FROM_SCRATCH, params, best["val_accuracy"], split_sizes, config.dataset_name,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), failed_images=len(failed),
                   label_conflicts=conflict_warnings, label_conflict_files=conflict_groups(dataset.entries, keys),
                   train_seconds=seconds, model=record, from_scratch=True)
    save_run(run_dir, config, labels, samples, info, history)
    return BaselineResult(run_dir, labels, split_sizes, len(history), best["epoch"], best["val_accuracy"], failed,
                          seconds, dataset.warnings + conflict_warnings)


def input_pipeline(images: np.ndarray, labels: np.ndarray, *, batch_size: int, training: bool, seed: int = 0,
                   augment: bool = True):
    """tf.data batches of float32 pixels in 0..255; training ones shuffled (and augmented) per epoch.

    Augmentation (mirror, zoom-and-crop, brightness, contrast) is what keeps a CNN that
    sees a few hundred images from memorising them; it runs in tf.data, off the model, so
    the saved model has no augmentation layers. Fine-tuning uses the same pipeline.
    """
    import tensorflow as tf

    size = images.shape[1]
    zoomed = int(round(size * 1.15))

    def augmented(image, label):
        image = tf.cast(image, tf.float32)
        image = tf.image.random_flip_left_right(image)
        image = tf.image.resize(image, (zoomed, zoomed))
        image = tf.image.random_crop(image, (size, size, 3))
        image = tf.image.random_brightness(image, 0.15 * 255)
        image = tf.image.random_contrast(image, 0.8, 1.2)
        return tf.clip_by_value(image, 0, 255), label

    def plain(image, label):
        return tf.cast(image, tf.float32), label

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(augmented if training and augment else plain, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def build_cnn(image_size: int, n_classes: int, settings: BaselineSettings):
    import keras

    layers = [keras.Input((image_size, image_size, 3), name="pixels"), keras.layers.Rescaling(1 / 255)]
    for filters in settings.filters:
        layers += [keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
                   # momentum 0.9: with Keras' 0.99 the moving statistics lag for the first dozen epochs on a
                   # few hundred images, validation loss looks worse than it is, and early stopping ends too soon
                   keras.layers.BatchNormalization(momentum=0.9), keras.layers.ReLU(), keras.layers.MaxPooling2D()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(settings.dropout),
               keras.layers.Dense(n_classes, activation="softmax", name="probabilities")]
    model = keras.Sequential(layers, name="scratch_cnn")
    model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def train_cnn(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *, n_classes: int,
              settings: BaselineSettings, progress: bool = True):
    """The fitted model (best epoch's weights) and its per-epoch history, as the dense head records it."""
    import keras
    from sklearn.utils.class_weight import compute_class_weight

    keras.utils.set_random_seed(settings.seed)
    model = build_cnn(x.shape[1], n_classes, settings)
    present = np.unique(y)
    weights = dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=y)))
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True)
    bar = tqdm(total=settings.epochs, unit="epoch", desc="baseline", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            bar.set_postfix(val_loss=f"{logs.get('val_loss', float('nan')):.3f}",
                            val_acc=f"{logs.get('val_accuracy', float('nan')):.3f}", refresh=False)
            bar.update()

    try:
        fitted = model.fit(input_pipeline(x, y, batch_size=settings.batch_size, training=True, seed=settings.seed),
                           validation_data=input_pipeline(x_val, y_val, batch_size=settings.batch_size,
                                                          training=False),
                           epochs=settings.epochs, class_weight=weights, callbacks=[stop, Progress()], verbose=0,
                           shuffle=False)  # the input pipeline shuffles
    finally:
        bar.close()
    history = [dict(epoch=i + 1, **{k: float(v[i]) for k, v in fitted.history.items()})
               for i in range(len(fitted.history["loss"]))]
    return model, history

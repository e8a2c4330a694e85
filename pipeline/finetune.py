"""Fine-tuning: the top of the backbone trained together with a head that is already trained.

This is the second phase of the Keras transfer-learning guide. The first phase is `train`: a
head fitted on cached features. Fine-tuning starts from that run (the newest by default), so
no layer starts untrained: the model is exactly the exported one (preprocessing, backbone,
the head's standardisation and softmax as layers) and scores what the head scored before its
first step. Then the top of the backbone is unfrozen (`finetune.unfreeze`) and trained with a
low learning rate that warms up from zero, so the first steps' large gradients cannot wreck
the trained head, on augmented images (the baseline's tf.data pipeline), with class weights,
keeping the best epoch on validation accuracy.

BatchNormalization layers stay frozen and in inference mode (keras-team/keras#9214): with
batches of 32, their moving statistics would otherwise drift from the ImageNet ones the
features were computed with. In Keras 3 a layer set to `trainable = False` runs in inference
mode whatever `training` its model is called with; that is the mechanism used here (the
`training=False` a functional model records for a nested call is overridden by fit).

The fine-tuned backbone no longer computes the cached features, so the run is a whole-model
run (`pixel_models`): report, predict and export run `model.keras` on the images themselves.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import keras
import numpy as np
from tqdm import tqdm

from . import backbones
from .baseline import input_pipeline
from .cache import FeatureCache
from .config import Config, FinetuneConfig
from .errors import ConfigError, PipelineError
from .export import build_model
from .features import dataset_from_config
from .heads import load_head
from .html_report import conflict_groups
from .pixel_models import model_record, sample_pixels, whole_model
from .predict import run_backbone
from .runs import Run, RunInfo, load_run, new_run_dir, read_info, run_dirs, save_run

log = logging.getLogger(__name__)

KIND = "finetuned"  # run.json "head" of a fine-tuned run
_TIMED_STEPS = 3  # training steps timed (after the first, which traces and compiles) for the estimate


@dataclass
class FinetuneResult:
    run_dir: Path
    start_dir: Path
    labels: list[str]
    split_sizes: dict[str, int]
    unfrozen: str  # what was unfrozen, in words
    epochs_run: int
    best_epoch: int
    val_accuracy: float  # the fine-tuned model's, at its best epoch
    frozen_val_accuracy: float  # the head it started from
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def better_than_frozen(self) -> bool:
        return self.val_accuracy > self.frozen_val_accuracy

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {v}" for k, v in self.split_sizes.items())
        change = 100 * (self.val_accuracy - self.frozen_val_accuracy)
        lines = [f"finetune: {self.unfrozen}, {len(self.labels)} classes ({sizes}); {self.epochs_run} epochs, best "
                 f"{self.best_epoch}; validation accuracy {self.val_accuracy:.4f}, frozen head "
                 f"{self.frozen_val_accuracy:.4f} ({change:+.1f} points) ({self.seconds:.0f} s)",
                 f"run: {self.run_dir}"]
        if not self.better_than_frozen:
            lines.append(f"fine-tuning did not beat the frozen head on validation: keep using {self.start_dir} "
                         "(both runs are in `make compare`); try a lower finetune.learning_rate or a smaller "
                         "finetune.unfreeze")
        return "\n".join(lines)


def latest_head_run(config: Config) -> Path:
    """The newest run of the config's dataset that is a head on cached features (fine-tuning's starting point)."""
    for run_dir in reversed(run_dirs(config)):
        info = read_info(run_dir)
        if whole_model(info) is None:
            return run_dir
    raise PipelineError(f"no head trained on cached features under {Path(config.run.dir) / config.dataset_name}; "
                        "fix: run `make extract` and `make train` with the same config first")


def run_finetune(config: Config, start_dir: Path | None = None, *, progress: bool = True,
                 announce: Callable[[str], None] = log.info) -> FinetuneResult:
    """Fine-tune from a head run (default: the newest); `config.finetune` holds the recipe.

    The data, splits, backbone and head all come from the starting run, so the fine-tuned
    model is scored on exactly the images the frozen head was. `announce` gets the time
    estimate, measured on the first training steps.
    """
    started = time.perf_counter()
    settings = config.finetune
    start = load_run(start_dir or latest_head_run(config))
    if start_dir is not None and start.info.dataset != config.dataset_name:
        log.warning("%s is a run of %r, not of this config's %r: fine-tuning on that run's images, and the "
                    "fine-tuned run goes beside it", start.dir, start.info.dataset, config.dataset_name)
    if whole_model(start.info) is not None:
        raise ConfigError(f"{start.dir} is not a head trained on cached features; fix: pass --run with a run "
                          "written by `make train`")
    backbone_config = run_backbone(start)
    spec = backbones.get_spec(backbone_config.name)
    try:
        image_root = dataset_from_config(start.config).root
    except PipelineError:
        image_root = None
    class_of = {label: i for i, label in enumerate(start.labels)}
    data = {}
    for split in ("train", "val"):
        chosen = [s for s in start.samples if s.split == split and s.label is not None]
        pixels = sample_pixels(start, chosen, image_root, spec.input_size, config=start.config, progress=progress,
                               fix="run `make extract` and `make train` again, then fine-tune that run")
        data[split] = (pixels, np.array([class_of[s.label] for s in chosen]))

    keras.utils.set_random_seed(settings.seed)
    backbone = backbones.build_model(backbone_config)
    model = build_model(backbone_config, load_head(start.info.head, start.dir), len(start.labels),
                        backbone=backbone)
    unfrozen = unfreeze(backbone, spec.block_end, settings.unfreeze)
    steps = math.ceil(len(data["train"][0]) / settings.batch_size)
    model.compile(optimizer=keras.optimizers.Adam(learning_schedule(settings, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train = input_pipeline(*data["train"], batch_size=settings.batch_size, training=True, seed=settings.seed,
                           augment=settings.augment)
    val = input_pipeline(*data["val"], batch_size=settings.batch_size, training=False)
    frozen_loss, frozen_accuracy = model.evaluate(val, verbose=0)
    history = [{"epoch": 0, "val_loss": float(frozen_loss), "val_accuracy": float(frozen_accuracy)}]
    keep = KeepBest(settings.patience)
    timer = StepTimer(steps, settings.epochs, announce)
    bar = tqdm(total=settings.epochs * steps, unit="step", desc="finetune", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        fitted = model.fit(train, validation_data=val, epochs=settings.epochs, verbose=0, shuffle=False,  # tf.data does
                           class_weight=class_weights(data["train"][1], settings),
                           callbacks=[keep, timer, TrainingBar(bar, settings.epochs)])
    finally:
        bar.close()
    history += [dict(epoch=i + 1, **{k: float(v[i]) for k, v in fitted.history.items()})
                for i in range(len(fitted.history["loss"]))]
    best = history[keep.best_epoch]
    record = model_record(spec.input_size)
    run_dir = new_run_dir(start.config, f"{spec.name}-{KIND}")
    model.save(run_dir / record["file"])
    params = {"unfreeze": settings.unfreeze, "unfrozen_layers": unfrozen.layers, "learning_rate": settings.learning_rate,
              "warmup_epochs": settings.warmup_epochs, "schedule": settings.schedule, "augment": settings.augment,
              "batch_size": settings.batch_size, "best_epoch": keep.best_epoch}
    seconds = time.perf_counter() - started
    frozen = {"run": str(start.dir), "head": start.info.head, "params": start.info.params,
              "val_accuracy": start.info.val_accuracy}
    info = RunInfo(KIND, params, best["val_accuracy"], start.info.split_sizes, start.info.dataset,
                   start.info.fingerprint, None, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   failed_images=start.info.failed_images, label_conflicts=start.info.label_conflicts,
                   label_conflict_files=_conflict_files(start, image_root is not None),
                   train_seconds=start.info.train_seconds, extract_seconds=_extract_seconds(start),
                   finetune_seconds=seconds, model=record, finetuned_from=frozen,
                   frozen_val_accuracy=start.info.val_accuracy,
                   better_than_frozen=best["val_accuracy"] > start.info.val_accuracy,
                   kept_by="best validation accuracy, ties by loss; epoch 0 is the frozen head")
    # the head run's data settings, with the recipe this fine-tune used
    save_run(run_dir, replace(start.config, finetune=settings), start.labels, start.samples, info, history)
    result = FinetuneResult(run_dir, start.dir, start.labels, start.info.split_sizes,
                            f"{spec.name}: {unfrozen.describe()} + {start.info.head} head from {start.dir.name}",
                            len(history) - 1, keep.best_epoch, best["val_accuracy"], start.info.val_accuracy,
                            seconds)
    if not result.better_than_frozen:
        result.warnings.append(f"fine-tuned validation accuracy {result.val_accuracy:.4f} is not above the frozen "
                               f"head's {result.frozen_val_accuracy:.4f}; run.json keeps both")
    return result


@dataclass
class Unfrozen:
    layers: int  # weighted backbone layers now trainable (BatchNormalization not counted: it stays frozen)
    of: int  # weighted backbone layers in all
    blocks: int | None  # when unfreeze counted blocks

    def describe(self) -> str:
        what = f"top {self.blocks} block(s)" if self.blocks is not None else f"top {self.layers / self.of:.0%}"
        return f"{what} unfrozen ({self.layers} of {self.of} weighted layers, BatchNorm frozen)"


def unfreeze(backbone, block_end: str, amount: float) -> Unfrozen:
    """Make the top of the backbone trainable, every BatchNormalization layer excepted.

    `amount` below 1 is the share of the backbone's weighted layers (convolutions and dense
    layers; BatchNorm, which stays frozen, is not counted), from the top; a whole number is a
    count of blocks, each ending at a layer whose name matches `block_end`; more blocks than
    the backbone has unfreezes it all.
    """
    layers = backbone.layers
    weighted = [i for i, layer in enumerate(layers)
                if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    blocks = None
    if amount < 1:
        cut = weighted[len(weighted) - max(1, round(len(weighted) * amount))]
    else:
        blocks = int(amount)
        ends = [i for i, layer in enumerate(layers) if re.fullmatch(block_end, layer.name)]
        cut = ends[-blocks - 1] + 1 if blocks < len(ends) else 0
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    return Unfrozen(sum(layers[i].trainable for i in weighted), len(weighted), blocks)


def learning_schedule(settings: FinetuneConfig, steps_per_epoch: int):
    """Linear warm-up from zero to the peak rate, then cosine decay to zero at the last epoch (or constant)."""
    warmup = max(1, round(settings.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, settings.epochs * steps_per_epoch)
    if settings.schedule == "constant":
        return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=1, alpha=1.0,
                                                      warmup_target=settings.learning_rate, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=total - warmup,
                                                  warmup_target=settings.learning_rate, warmup_steps=warmup)


def class_weights(y: np.ndarray, settings: FinetuneConfig) -> dict | None:
    from sklearn.utils.class_weight import compute_class_weight

    if settings.class_weight == "none":
        return None
    present = np.unique(y)
    return dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=y)))


def _extract_seconds(start: Run) -> float | None:
    """What extracting the starting run's features cost, read from its cache's attributes (never its rows)."""
    try:
        with FeatureCache(start.info.cache) as cache:
            return (cache.extract_timing() or {}).get("seconds")
    except (PipelineError, OSError, TypeError):
        return None


def _conflict_files(start: Run, dataset_present: bool) -> list:
    """Images filed under two labels (the report lists them), from the starting run's cache index."""
    if not dataset_present:
        return []
    try:
        with FeatureCache(start.info.cache, start.info.fingerprint) as cache:
            keys = {path: record.key for path, record in cache.file_index().items()}
        return conflict_groups(dataset_from_config(start.config).entries, keys)
    except (PipelineError, OSError):
        return []


class KeepBest(keras.callbacks.Callback):
    """Early stopping on validation accuracy, ties broken by lower loss; restores the best epoch's weights.

    Accuracy on a few hundred validation images moves in steps of a fraction of a point and
    ties often; the loss breaks them. The weights kept are always a fine-tuned epoch's, even
    when none beats the frozen head (the run then says so).
    """

    def __init__(self, patience: int):
        super().__init__()
        self.patience = patience
        self.best_score, self.best_weights, self.best_epoch, self.wait = None, None, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        score = (logs["val_accuracy"], -logs["val_loss"])
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_weights, self.best_epoch, self.wait = score, self.model.get_weights(), epoch + 1, 0
        else:
            self.wait += 1
            self.model.stop_training = self.wait >= self.patience

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class StepTimer(keras.callbacks.Callback):
    """Times training steps after the first (which traces and compiles) and announces how long the run can take."""

    def __init__(self, steps_per_epoch: int, epochs: int, announce: Callable[[str], None]):
        super().__init__()
        self.steps, self.epochs, self.announce = steps_per_epoch, epochs, announce
        self.marks: list[float] = []
        self.epoch_started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.marks is None:
            return
        self.marks.append(time.perf_counter())
        if len(self.marks) == _TIMED_STEPS + 1:
            self._announce((self.marks[-1] - self.marks[0]) / _TIMED_STEPS)

    def on_epoch_end(self, epoch, logs=None):
        if self.marks is not None:  # fewer steps than timed: the whole first epoch, tracing included
            self._announce((time.perf_counter() - self.epoch_started) / self.steps)

    def _announce(self, step_seconds: float) -> None:
        self.marks = None
        self.announce(estimate_message(step_seconds, self.steps, self.epochs))


def estimate_message(step_seconds: float, steps_per_epoch: int, epochs: int) -> str:
    """"about 6 min on this CPU …" from a measured step; validation adds forward passes, about 15%."""
    import tensorflow as tf

    total = step_seconds * steps_per_epoch * epochs * 1.15
    device = "this GPU" if tf.config.list_physical_devices("GPU") else "this CPU"
    text = (f"finetune: about {_minutes(total)} on {device} at most ({epochs} epochs of {steps_per_epoch} steps, "
            f"{step_seconds:.2f} s a step; early stopping often ends sooner)")
    if device == "this CPU":
        text += "; a GPU makes this minutes or less"
    return text


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class TrainingBar(keras.callbacks.Callback):
    """One bar over every step, naming the epoch and showing the last validation scores."""

    def __init__(self, bar: tqdm, epochs: int):
        super().__init__()
        self.bar, self.epochs = bar, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.bar.set_description(f"finetune epoch {epoch + 1}/{self.epochs}", refresh=False)

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.bar.set_postfix(val_loss=f"{logs.get('val_loss', float('nan')):.3f}",
                             val_acc=f"{logs.get('val_accuracy', float('nan')):.3f}", refresh=False)

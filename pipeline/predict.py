"""The predict stage: score new images with a trained run, as the report would have scored them.

An image whose content is already in the run's cache (the same backbone fingerprint) is
scored from its cached row and never reaches the backbone; only new content is decoded
and run through it, in batches, with the same decoding as extract. The cache is only
read: predicting never competes with an extract for its lock. One bad image becomes one
line with its reason and never stops the others. A run whose whole model takes pixels (a
fine-tuned backbone, the from-scratch CNN) never opens the cache: the cached features are
the frozen backbone's, not its own, so every image goes through its model.

Output is one JSON object per image as in the CNTK tutorial, `{"image", "class",
"predictions"}`, where `class` is the predicted label, or "unknown" when its probability
is below the optional threshold (the report's `threshold_curve` shows what each threshold
costs in coverage and buys in accuracy on held-out data).
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from . import augment, backbones, execution, images, stages
from .cache import FeatureCache
from .config import BackboneConfig
from .data_issues import novelty_for_run
from .dataset import IMAGE_EXTENSIONS
from .errors import ConfigError, DatasetError, ImageError, PipelineError
from .features import scoring_features
from .heads import load_head
from .pixel_models import PREDICT_BATCH, load_model, predict_pixels, whole_model
from .report import UNKNOWN
from .runs import Run, load_run

log = logging.getLogger(__name__)
_TABLE_ROWS = 50  # the terminal table stops here; the JSON lines hold every image


@dataclass
class Prediction:
    image: str
    probabilities: np.ndarray | None = None  # one per label, in the run's label order
    label: str | None = None  # the predicted label, or "unknown" below the threshold
    error: str | None = None
    cached: bool = False
    novelty: float | None = None  # how unlike the training images it is (NoveltyModel); higher is stranger


@dataclass
class PredictResult:
    run_dir: Path
    labels: list[str]
    predictions: list[Prediction]
    out_path: Path | None  # the JSON lines file, once written
    threshold: float | None
    seconds: float
    novelty_threshold: float | None = None  # set when --unfamiliar maps images past it to "unknown"

    def describe(self, top: int = 3) -> str:
        scored = [p for p in self.predictions if p.error is None]
        cached = sum(p.cached for p in scored)
        failed = len(self.predictions) - len(scored)
        lines = [format_table(self.predictions, self.labels, top, self.threshold), "",
                 f"predict: {len(self.predictions)} images: {cached} from the cache, {len(scored) - cached} through "
                 f"the backbone, {failed} failed ({self.seconds:.1f} s)"]
        if self.threshold is not None:
            unknown = sum(p.label == UNKNOWN for p in scored)
            lines.append(f"threshold {self.threshold}: {unknown} image(s) below it are {UNKNOWN!r}"
                         + held_out_effect(self.run_dir, self.threshold))
        if self.novelty_threshold is not None:
            unfamiliar = sum(p.novelty is not None and p.novelty > self.novelty_threshold for p in scored)
            lines.append(f"unfamiliar: {unfamiliar} image(s) unlike the training images (novelty above "
                         f"{self.novelty_threshold:.4g}, calibrated on validation images) are {UNKNOWN!r}")
        if self.out_path is not None:
            lines.append(f"predictions: {self.out_path}")
        return "\n".join(lines)


def run_predict(run_dir: Path, inputs: Sequence[str], *, threshold: float | None = None, out_path: Path | None = None,
                progress: bool = True, make_extractor: Callable | None = None,
                unfamiliar: bool = False) -> PredictResult:
    """The predict stage: score the images and write them as JSON lines (default:
    `<run>/predictions/<time>.jsonl`)."""
    result = predict(run_dir, inputs, threshold=threshold, progress=progress, make_extractor=make_extractor,
                     unfamiliar=unfamiliar)
    result.out_path = (Path(out_path) if out_path
                       else result.run_dir / "predictions" / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    write_predictions(result.out_path, result.predictions, result.labels)
    return result


def predict(run: Run | Path | str, inputs: Sequence[str | Path], *, threshold: float | None = None,
            progress: bool = True, make_extractor: Callable | None = None, unfamiliar: bool = False) -> PredictResult:
    """Score image files, folders or glob patterns with a run, in memory; each gets its novelty
    score, and with `unfamiliar` those past the run's novelty threshold (novelty.h5, as in
    report/data_issues.json) become "unknown"."""
    started = time.perf_counter()
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"--threshold {threshold}: must be between 0 and 1, e.g. 0.5")
    run = load_run(run)
    inputs = [str(spec) for spec in inputs]
    record = whole_model(run.info)
    paths = find_images(inputs)
    predictions = [Prediction(str(path)) for path in paths]
    if record is None:  # a head on the frozen backbone's features, cached or computed here
        backbone = run_backbone(run)
        make_extractor = make_extractor or functools.partial(  # the same measured choice as extract
            backbones.FeatureExtractor, cache_dir=Path(run.info.cache).parent)
        features = _rows(run, paths, predictions, progress, size=backbones.get_spec(backbone.name).input_size,
                         batch_size=backbone.batch_size, compute=lambda: _told(make_extractor(backbone), len(paths)),
                         use_cache=True)
    else:  # the run's whole model on every image: its backbone is not the one whose features were cached
        features = _rows(run, paths, predictions, progress, size=record["input_size"], batch_size=PREDICT_BATCH,
                         compute=lambda: functools.partial(predict_pixels, load_model(run)), use_cache=False)
    scored = [p for p in predictions if p.error is None]
    if unfamiliar and record is not None:
        raise ConfigError(f"--unfamiliar: run {run.dir} is a whole model (pixels in), with no cached features to "
                          "measure novelty on; fix: use a head run on cached features")
    novelty = _novelty_model(run, required=unfamiliar) if scored and record is None else None
    if scored:
        probabilities = features if record else load_head(run.info.head, run.dir).predict_proba(features)
        strangeness = novelty.scores(features) if novelty is not None else [None] * len(scored)
        for prediction, row, score in zip(scored, probabilities, strangeness):
            best = int(row.argmax())
            below = threshold is not None and row[best] < threshold
            strange = unfamiliar and score > novelty.threshold
            prediction.probabilities = row
            prediction.novelty = None if score is None else round(float(score), 4)
            prediction.label = UNKNOWN if below or strange else run.labels[best]
    return PredictResult(run.dir, run.labels, predictions, None, threshold, time.perf_counter() - started,
                         novelty.threshold if unfamiliar and novelty is not None else None)


def _novelty_model(run: Run, *, required: bool):
    """The run's novelty model; without --unfamiliar a run whose model cannot be had still predicts."""
    try:
        return novelty_for_run(run)
    except PipelineError as exc:
        if required:
            raise
        log.warning("no novelty scores: %s", exc)
        return None


def _told(extractor, images: int):
    """The extractor, told the most images it will get: a few never pay for measuring paths."""
    extractor.expect(images)
    return extractor


def run_backbone(run: Run) -> BackboneConfig:
    """The backbone that made a run's features, refused if its weights or decoding changed since training."""
    trained = run.info.fingerprint
    config = run.config
    if trained["weights"].startswith("random:"):  # the offline demo fell back to random weights
        config = backbones.with_random_weights(config)
    now = backbones.fingerprint(config)
    if now is None:
        target = backbones.keras_weights_path(backbones.get_spec(config.backbone.name), config.backbone.alpha)
        raise PipelineError(f"run {run.dir} needs ImageNet weights that are not on this machine; fix: connect to "
                            f"the internet once, or put {target.name} in {target.parent}")
    if now != trained:
        changed = sorted(key for key in trained if now.get(key) != trained[key])
        raise PipelineError(f"run {run.dir} was trained on features this machine can no longer compute "
                            f"({', '.join(changed)} changed since, e.g. weights {trained['weights']!r}); fix: run "
                            "`make extract` and `make train` again, or restore the weights file it used")
    return config.backbone


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Files as given, image files below folders, and glob patterns (`**` included), in a stable order."""
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p.relative_to(path)))
        elif glob.has_magic(spec):
            found += sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if p.is_file() and _is_image_name(p))
        else:
            raise DatasetError(f"{spec}: no such file or folder; fix: pass an image file, a folder or a glob pattern")
    if not found:
        raise DatasetError(f"no images found in {', '.join(inputs)}; fix: pass image files (extensions: "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))}) or a folder holding them")
    return list(dict.fromkeys(found))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in path.parts)


@dataclass
class _Loaded:
    key: str | None = None
    pixels: np.ndarray | None = None  # only for content the cache does not hold
    error: str | None = None


def _rows(run: Run, paths: list[Path], predictions: list[Prediction], progress: bool, *, size: int, batch_size: int,
          compute: Callable[[], Callable[[np.ndarray], np.ndarray]], use_cache: bool) -> np.ndarray:
    """One row per image that could be scored (errors are set on the others), in input order.

    Rows come from the run's cache where `use_cache` and the cache holds the image's content,
    else from `compute()` (built on first need: the frozen backbone, or a whole model) on
    batches of decoded pixels.
    """
    rows, failures, cache = {}, {}, None
    tta = run.config.head.tta if use_cache else "none"  # flip TTA averages frozen features, never a whole model's
    if use_cache and Path(run.info.cache).is_file():
        cache = FeatureCache(run.info.cache, run.info.fingerprint)
        rows, failures = cache.row_index(), cache.failures()
        if tta == "flip":  # content without its mirrored view goes through the backbone, both ways
            mirrored = cache.view_index(augment.RECIPE.fingerprint_id())
            rows = {key: row for key, row in rows.items() if (key, augment.MIRROR) in mirrored}
    max_pixels = run.config.data.max_image_pixels

    def load(path: Path) -> _Loaded:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return _Loaded(error=f"cannot read the file ({exc.strerror or exc})")
        key = images.content_hash(data)
        if key in rows:
            return _Loaded(key)
        if key in failures:
            return _Loaded(key, error=failures[key][1])
        try:
            return _Loaded(key, images.decode_image(data, size, max_pixels=max_pixels))
        except ImageError as exc:
            return _Loaded(key, error=str(exc))

    fresh: dict[str, np.ndarray] = {}  # content hash -> feature row, computed here
    batch: dict[str, np.ndarray] = {}  # content hash -> pixels waiting for the backbone
    model = None
    stored = np.dtype(run.info.fingerprint["feature_dtype"]) if use_cache else None

    def flush():
        nonlocal model
        if batch:
            model = model or compute()
            pixels = np.stack(list(batch.values()))
            computed = model(pixels)
            if stored is not None:  # rounded as the cache stores them: the same score cached or not
                computed = computed.astype(stored).astype(np.float32)
            if tta == "flip":
                mirrored = model(np.ascontiguousarray(pixels[:, :, ::-1]))
                computed = (computed + (mirrored.astype(stored).astype(np.float32) if stored is not None
                                        else mirrored)) / 2
            fresh.update(zip(batch, computed))
            batch.clear()

    keys: list[str] = []
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    try:
        with ThreadPoolExecutor(execution.usable_cores(), thread_name_prefix="decode") as pool:
            for prediction, item in zip(predictions, images.prefetch(pool, load, paths, depth=4 * batch_size)):
                bar.update()
                if item.error is not None:
                    prediction.error = item.error
                    continue
                keys.append(item.key)
                prediction.cached = item.key in rows
                if item.pixels is not None and item.key not in fresh:
                    batch[item.key] = item.pixels
                    if len(batch) >= batch_size:
                        flush()
            flush()
        cached_keys = sorted({key for key in keys if key in rows and key not in fresh})
        from_cache = dict(zip(cached_keys, scoring_features(cache, cached_keys, tta))) if cached_keys else {}
    finally:
        bar.close()
        if cache is not None:
            cache.close()
    if not keys:
        return np.zeros((0, 0), np.float32)
    return np.stack([fresh[k] if k in fresh else from_cache[k] for k in keys])


def write_predictions(path: Path, predictions: list[Prediction], labels: list[str]) -> None:
    """JSON lines, CNTK style, probabilities highest first; an image that failed gets its reason instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for p in predictions:
            if p.error is not None:
                line = {"image": p.image, "error": p.error}
            else:
                order = np.argsort(-p.probabilities, kind="stable")
                line = {"image": p.image, "class": p.label,
                        "predictions": {labels[i]: round(float(p.probabilities[i]), 6) for i in order},
                        "novelty": p.novelty}
            out.write(json.dumps(line) + "\n")


def format_table(predictions: list[Prediction], labels: list[str], top: int, threshold: float | None) -> str:
    """Image, predicted class, then the top-k labels with their probabilities; failures with their reason."""
    shown = predictions[:_TABLE_ROWS]
    width = min(max((len(p.image) for p in shown), default=5), 48)
    lines = [f"{'image':<{width}}  {'class':<14}  {'novelty':>9}  top {top}"]
    for p in shown:
        name = p.image if len(p.image) <= width else "…" + p.image[-(width - 1):]
        if p.error is not None:
            lines.append(f"{name:<{width}}  error: {p.error}")
            continue
        order = np.argsort(-p.probabilities, kind="stable")[:top]
        ranked = "  ".join(f"{labels[i]} {p.probabilities[i]:.3f}" for i in order)
        novelty = "–" if p.novelty is None else f"{p.novelty:.4g}"
        lines.append(f"{name:<{width}}  {p.label:<14}  {novelty:>9}  {ranked}")
    if len(predictions) > _TABLE_ROWS:
        lines.append(f"... and {len(predictions) - _TABLE_ROWS} more (every image is in the JSON lines)")
    return "\n".join(lines)


def held_out_effect(run_dir: Path, threshold: float) -> str:
    """What the report measured at this threshold on held-out data, when the report has that point."""
    metrics_path = run_dir / "report" / "metrics.json"
    if not metrics_path.is_file():
        return "; run `make report` to see what thresholds cost on held-out data"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    points = [p for p in metrics.get("threshold_curve", []) if p["threshold"] <= threshold]
    if not points:
        return ""
    point = max(points, key=lambda p: p["threshold"])
    accuracy = "n/a" if point["accuracy"] is None else f"{point['accuracy']:.3f}"
    return (f" (on the report's {metrics['split']} split, threshold {point['threshold']} kept {point['coverage']:.0%} "
            f"of images at accuracy {accuracy}; see threshold_curve in {metrics_path})")


stages.callable_module(__name__, "pipeline.predict:predict")  # `from pipeline import predict; predict(...)`

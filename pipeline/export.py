"""The export stage: one self-contained model, backbone plus head, that answers as the report did.

Written to `<run>/export/` (or `--out`):

    model.keras    Keras model: float32 RGB pixels (n, size, size, 3) in 0..255, decoded and
                   resized as training did, in; probabilities out. Preprocessing is inside,
                   built from stock Keras layers only, so plain Keras loads it.
    saved_model/   TensorFlow SavedModel; `tf.saved_model.load` is all it needs. Signatures:
                     serving_default(image_bytes: string[n])  encoded image files, like the old
                         graph's DecodeJpeg/contents, decoded, EXIF-rotated and resized inside
                         the graph exactly as training decoded them (`tf_images`)
                     serving_images(images: float32[n, size, size, 3])  pixels already decoded
                   both return {"probabilities": float32[n, classes], "label": string[n]}.
    model.tflite   the pixel signature for TFLite, when TensorFlow's converter works here.
    labels.json, export.json   the classes, and what was checked with what result.

The logistic-regression head becomes a Normalization layer holding its mean and variance
and a softmax Dense layer holding its coefficients, the same numbers; the dense head is
already a Keras model and goes in whole. A fine-tuned or from-scratch run's `model.keras`
already takes pixels and is exported as it is. Before the export counts as done it is loaded
back and scored on the run's held-out images: its probabilities must match the report's
(their cached features through the head, or the run's own model on the decoded images)
within 1e-4.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import backbones, images, stages
from .cache import FeatureCache
from .errors import PipelineError
from .features import dataset_from_config, scoring_features
from .heads import load_head
from .pixel_models import load_model, predict_pixels, whole_model
from .predict import run_backbone
from .runs import Run, Sample, load_run

PARITY_TOLERANCE = 1e-4  # float32 throughout; a float16 cache or bfloat16 backbone rounds more
_LOOSE_TOLERANCE = 1e-2
_PARITY_IMAGES = 16
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclass
class ExportResult:
    out_dir: Path
    input_size: int
    labels: list[str]
    parity: dict
    tflite: dict = field(default_factory=dict)

    def describe(self) -> str:
        size, n = self.input_size, len(self.labels)
        lines = [f"export: {self.out_dir}",
                 f"  model.keras    Keras: float pixels (n, {size}, {size}, 3) in 0..255 -> probabilities over {n} "
                 "classes",
                 "  saved_model/   TensorFlow: serving_default(image_bytes) and serving_images(images)",
                 f"  model.tflite   {self.tflite['note']}", f"parity: {self.parity['note']}"]
        return "\n".join(lines)


def run_export(run_dir: Path, out_dir: Path | None = None, *, tflite: bool = True) -> ExportResult:
    """Write the model files, load them back, and refuse them if they disagree with the report."""
    run = load_run(run_dir)
    record = whole_model(run.info)
    if record is None:  # a head on the frozen backbone: put them together
        backbone = run_backbone(run)
        head = load_head(run.info.head, run.dir)
        size = backbones.get_spec(backbone.name).input_size
        model = build_model(backbone, head, len(run.labels), tta=run.config.head.tta)
    else:  # fine-tuned or from scratch: the run's model already takes pixels
        model, size = load_model(run), record["input_size"]
    out_dir = Path(out_dir) if out_dir else run.dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "saved_model", ignore_errors=True)  # a previous export of this run
    for stale in ("model.keras", "model.tflite", "export.json"):
        (out_dir / stale).unlink(missing_ok=True)
    model.save(out_dir / "model.keras")
    write_saved_model(model, run.labels, size, out_dir / "saved_model")
    (out_dir / "labels.json").write_text(json.dumps(run.labels, indent=1), encoding="utf-8")
    fingerprint = run.info.fingerprint
    exact = fingerprint is None or (fingerprint["precision"] == "float32" and (
        record is not None or fingerprint["feature_dtype"] == "float32"))  # a whole model reads no cached rows
    tolerance = PARITY_TOLERANCE if exact else _LOOSE_TOLERANCE
    samples, chosen = _held_out_samples(run)
    if record is None:
        references = _cached_probabilities(run, head, chosen)
    else:  # as the report scores it: the run's model on the images decoded in Python
        references = predict_pixels(model, np.stack([images.decode_image(data, size) for _, data in samples])) \
            if samples else None
    result = ExportResult(out_dir, size, run.labels, _check_saved_model(out_dir / "saved_model", samples, references,
                                                                       tolerance))
    if tflite:
        pixels = np.stack([images.decode_image(data, size) for _, data in samples]) if samples else None
        result.tflite = export_tflite(out_dir, size, pixels, references, tolerance)
    else:
        result.tflite = {"written": False, "note": "not written (--no-tflite)"}
    (out_dir / "export.json").write_text(json.dumps({
        "run": str(run.dir), "labels": run.labels,
        "inputs": {"image_bytes": "string[n]", "images": f"float32[n, {size}, {size}, 3] RGB 0..255"},
        "outputs": {"probabilities": f"float32[n, {len(run.labels)}]", "label": "string[n]"},
        "fingerprint": fingerprint, "parity": result.parity, "tflite": result.tflite}, indent=2), encoding="utf-8")
    if result.parity.get("max_abs_diff", 0.0) > tolerance:
        raise PipelineError(f"the exported model differs from the report by {result.parity['max_abs_diff']:.2g} on "
                            f"{result.parity['worst_image']} (tolerance {tolerance}); do not ship {out_dir}: please "
                            "report this with export.json")
    return result


def build_model(backbone_config, head, n_classes: int, backbone=None, tta: str = "none"):
    """Pixels in, probabilities out: preprocessing layers, the frozen backbone, the head.

    `backbone` is the Keras backbone to use when the caller needs a handle on it (fine-tuning
    unfreezes part of it); by default it is built from `backbone_config`. With flip TTA the
    backbone also sees the mirrored pixels (a fixed permutation kernel, exact) and the two
    feature vectors are averaged, as the report scored them.
    """
    import keras

    spec = backbones.get_spec(backbone_config.name)
    inputs = keras.Input((spec.input_size, spec.input_size, 3), name="images")
    x = inputs
    for layer in _preprocessing_layers(spec):
        x = layer(x)
    backbone = backbone or backbones.build_model(backbone_config)
    if tta == "flip":
        size = spec.input_size
        mirror = keras.layers.Dense(size, use_bias=False, trainable=False, name="mirror")
        mirror.build((None, size))
        mirror.set_weights([np.eye(size, dtype=np.float32)[::-1]])
        mirrored = keras.layers.Permute((1, 3, 2))(mirror(keras.layers.Permute((1, 3, 2))(x)))
        x = keras.layers.Average(name="flip_tta")([backbone(x, training=False), backbone(mirrored, training=False)])
    else:
        x = backbone(x, training=False)
    x = head.to_keras(x)  # the head's own layers, whatever its kind
    return keras.Model(inputs, x, name="classifier")


def _preprocessing_layers(spec: backbones.BackboneSpec) -> list:
    """The backbone's preprocess_input as stock layers (`spec.preprocessing` says which), checked against it
    on every pixel value."""
    import keras

    mode = spec.preprocessing
    layers = []
    if mode == "tf":
        layers = [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")]
    elif mode == "caffe":  # a permutation kernel and a bias: out = x[..., ::-1] - mean, exactly
        swap = keras.layers.Dense(3, name="preprocess", trainable=False)
        swap.build((None, 3))
        swap.set_weights([np.eye(3)[::-1], -np.array(_CAFFE_BGR_MEAN)])
        layers = [swap]
    ramp = np.stack([np.arange(256), np.arange(256)[::-1], np.arange(256) * 7 % 256], -1).astype(np.float32)
    expected = spec.preprocess_input()(ramp.copy())
    got = ramp
    for layer in layers:
        got = np.asarray(layer(got))
    if np.abs(np.asarray(got) - np.asarray(expected)).max() > 1e-5:
        raise PipelineError(f"{spec.preprocessing_id} changed in this Keras version; the export "
                            "cannot reproduce it: please report this")
    return layers


def write_saved_model(model, labels: list[str], size: int, path: Path) -> None:
    """The Keras model behind two signatures: encoded image files, or decoded pixels."""
    import keras
    import tensorflow as tf

    from . import tf_images

    names = tf.constant(labels)

    def from_pixels(images):
        probabilities = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": probabilities, "label": tf.gather(names, tf.argmax(probabilities, axis=1))}

    def from_bytes(image_bytes):
        pixels = tf.map_fn(lambda data: tf_images.decode_image(data, size), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
        return from_pixels(tf.cast(pixels, tf.float32))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", from_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("serving_images", from_pixels,
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    archive.write_out(str(path), verbose=False)


def _held_out_samples(run: Run) -> tuple[list[tuple[str, bytes]], list[Sample]]:
    """Up to 16 held-out images still on disk and unchanged, as (name, file bytes), and their samples."""
    held_out = [s for s in run.samples if s.split != "train"]
    try:
        paths = {entry.relpath: entry.path for entry in dataset_from_config(run.config).entries}
    except PipelineError:  # the dataset moved: nothing to compare against
        return [], []
    chosen, samples = [], []
    for sample in held_out:
        try:
            samples.append((sample.image, paths[sample.image].read_bytes()))
        except (KeyError, OSError):
            continue
        if images.content_hash(samples[-1][1]) != sample.key:  # edited since training
            samples.pop()
            continue
        chosen.append(sample)
        if len(chosen) == _PARITY_IMAGES:
            break
    return samples, chosen


def _cached_probabilities(run: Run, head, chosen: list[Sample]) -> np.ndarray | None:
    """The report's probabilities for a head run's samples: their cached features through the head."""
    if not chosen or not Path(run.info.cache).is_file():
        return None
    with FeatureCache(run.info.cache, run.info.fingerprint) as cache:
        features = scoring_features(cache, [s.key for s in chosen], run.config.head.tta)
    return head.predict_proba(features)


def _check_saved_model(path: Path, samples: list[tuple[str, bytes]], references: np.ndarray | None,
                       tolerance: float) -> dict:
    """Load the SavedModel back as a user would and score the held-out files' bytes with it."""
    import tensorflow as tf

    if not samples:
        return {"images": 0, "note": "not checked: none of the run's held-out images are readable and cached"}
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    got = serve(image_bytes=tf.constant([data for _, data in samples]))["probabilities"].numpy()
    diff = np.abs(got - references).max(axis=1)
    worst = int(diff.argmax())
    return {"images": len(samples), "max_abs_diff": float(diff[worst]), "worst_image": samples[worst][0],
            "tolerance": tolerance,
            "note": f"on {len(samples)} held-out images the SavedModel, fed their file bytes, is within "
                    f"{diff[worst]:.1e} of the report's probabilities (tolerance {tolerance:g})"}


def export_tflite(out_dir: Path, size: int, pixels: np.ndarray | None, references: np.ndarray | None,
                  tolerance: float) -> dict:
    """model.tflite from the pixel signature, kept only if it matches the report (or the Keras model) on real pixels."""
    import tensorflow as tf

    path = out_dir / "model.tflite"
    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(out_dir / "saved_model"),
                                                             signature_keys=["serving_images"])
        path.write_bytes(converter.convert())
        if pixels is None:  # no held-out images: compare with the Keras model on noise
            pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
            references = tf.saved_model.load(str(out_dir / "saved_model")).signatures["serving_images"](
                images=tf.constant(pixels, tf.float32))["probabilities"].numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter announces its move to ai_edge_litert
            runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("serving_images")
        got = np.concatenate([runner(images=pixels[i:i + 1].astype(np.float32))["probabilities"]
                              for i in range(len(pixels))])
    except Exception as exc:  # the converter and interpreter fail in many ways (missing ops, no MLIR, removed API)
        path.unlink(missing_ok=True)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return {"written": False, "note": f"skipped: TensorFlow's TFLite converter does not work here ({reason}); "
                                          "the .keras file and the SavedModel are complete without it"}
    diff = float(np.abs(got - references).max())
    if diff > tolerance:
        path.unlink()
        return {"written": False, "max_abs_diff": diff,
                "note": f"not written: TFLite's probabilities differ by {diff:.2g} (tolerance {tolerance:g})"}
    return {"written": True, "max_abs_diff": diff,
            "note": f"TFLite, pixels in; within {diff:.1e} on {len(pixels)} images (tolerance {tolerance:g})"}


stages.callable_module(__name__, "pipeline.export:run_export")  # `from pipeline import export; export(...)`

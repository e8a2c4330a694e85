"""The exported model answers as the report and predict did: same pixels, same probabilities.

Parity runs on real flowers5 photos with real MobileNet v1 0.25 ImageNet weights, including
a PNG with transparency, a grayscale JPEG and a large JPEG that the decoder scales down.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import backbones, images, tf_images
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.export import PARITY_TOLERANCE, export_tflite, run_export
from pipeline.heads.logreg import LogisticRegressionHead
from pipeline.predict import run_predict

from pipeline_helpers import encode

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
ODD_ONES = ("roses/grey.jpg", "tulips/transparent.png", "daisy/large.jpg")
# the graph the SavedModel runs on each image file, traced once for every test here
decode_in_graph = tf.function(lambda data: tf_images.decode_image(data, 224),
                              input_signature=[tf.TensorSpec([], tf.string)])


def _odd_images(photo: Image.Image) -> dict[str, bytes]:
    """A grayscale JPEG, an RGBA PNG fading to transparent, and a JPEG large enough for DCT scaling."""
    rgba = np.asarray(photo.convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(255, 0, rgba.shape[1]).astype(np.uint8)[None]
    return {"roses/grey.jpg": encode(photo.convert("L"), "JPEG", quality=90),
            "tulips/transparent.png": encode(Image.fromarray(rgba), "PNG"),
            "daisy/large.jpg": encode(photo.resize((1000, 760), Image.Resampling.BICUBIC), "JPEG", quality=92)}


@pytest.fixture(scope="module")
def flowers_run(tmp_path_factory, flowers5, keras_home):
    """A logreg run on 30 flowers5 photos plus the odd ones (in val, so the report scores them)."""
    tmp = tmp_path_factory.mktemp("export")
    root = tmp / "flowers"
    for name in CLASSES:
        photos = sorted((flowers5 / "train" / name).glob("*.jpg"))[:6]
        for split, chosen in (("train", photos[:4]), ("val", photos[4:])):
            (root / split / name).mkdir(parents=True)
            for photo in chosen:
                shutil.copy(photo, root / split / name / photo.name)
    first = Image.open(sorted((flowers5 / "train" / "roses").glob("*.jpg"))[0]).convert("RGB")
    for relpath, data in _odd_images(first).items():
        (root / "val" / relpath).write_bytes(data)
    args = [f"--set=data.root='{root}'", f"--set=cache.dir='{tmp / 'cache'}'", f"--set=run.dir='{tmp / 'runs'}'",
            "--set=backbone.name=mobilenet", "--set=backbone.alpha=0.25"]
    for stage in ("extract", "train", "report"):
        assert main([stage, *args]) == 0
    (run_dir,) = (tmp / "runs" / "flowers").iterdir()
    return run_dir, root, args, tmp


def test_decoding_in_the_graph_gives_the_training_pixels(flowers_run):
    """The resize (and everything before it) is the same in both paths, pixel for pixel."""
    run_dir, root, _, _ = flowers_run
    files = sorted((root / "val").rglob("*.*"))
    assert {f.relative_to(root / "val").as_posix() for f in files} >= set(ODD_ONES)
    for path in files:
        data = path.read_bytes()
        np.testing.assert_array_equal(decode_in_graph(data).numpy(), images.decode_image(data, 224), str(path))
    resize = tf.function(lambda pixels: tf_images.resize(pixels, 224), reduce_retracing=True)
    rng = np.random.default_rng(0)
    for height, width in [(224, 224), (1, 1), (3, 5000), (375, 500), (1000, 333), (224, 225), (150, 180)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        np.testing.assert_array_equal(resize(tf.constant(pixels)).numpy(), images.resize(pixels, 224))


def _variants() -> dict[str, bytes]:
    """Formats, modes and EXIF orientations that training decodes, each of which the graph must match."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((10, 10, 1))).astype(np.uint8))
    wide = photo.resize((300, 150))
    grey16 = (np.asarray(photo.convert("L"), np.uint16) * 257 + rng.integers(0, 257, (300, 400))).astype(np.uint16)
    corner = tuple(np.asarray(photo)[0, 0].tolist())
    variants = {
        "progressive JPEG": encode(photo, "JPEG", progressive=True),
        "4:4:4 JPEG": encode(photo, "JPEG", subsampling=0),
        "CMYK JPEG": encode(photo.convert("CMYK"), "JPEG"),
        "1/8-scaled JPEG": encode(photo.resize((1900, 1800)), "JPEG"),
        "RGB PNG": encode(photo, "PNG"),
        "LA PNG": encode(photo.convert("LA"), "PNG"),
        "palette PNG": encode(photo.convert("P"), "PNG"),
        "palette PNG, transparent entry": encode(photo.convert("P"), "PNG", transparency=3),
        "RGB PNG, transparent colour": encode(photo, "PNG", transparency=corner),
        "16-bit grey PNG": encode(Image.fromarray(grey16), "PNG"),
        "1-bit PNG": encode(photo.convert("1"), "PNG"),
        "1-bit PNG, transparent black": encode(photo.convert("1"), "PNG", transparency=0),
        "4-bit grey PNG, transparent grey": encode(photo.convert("L").point(lambda v: v // 17 * 17), "PNG", bits=4,
                                                    transparency=51),
        "GIF": encode(photo, "GIF"),
        "BMP": encode(photo, "BMP"),
        "WebP": encode(photo, "WEBP", quality=80),
    }
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        variants[f"JPEG, EXIF orientation {orientation}"] = encode(wide, "JPEG", exif=exif)
        variants[f"PNG, EXIF orientation {orientation}"] = encode(wide, "PNG", exif=exif)
    return variants


@pytest.mark.parametrize("name, data", _variants().items(), ids=list(_variants()))
def test_decoding_in_the_graph_matches_every_variant(name, data):
    np.testing.assert_array_equal(decode_in_graph(data).numpy(), images.decode_image(data, 224))


def test_files_the_graph_cannot_decode_as_training_did_are_refused():
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="TensorFlow ignores its palette; convert it to PNG"):
        decode_in_graph(encode(photo.convert("P"), "BMP"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        decode_in_graph(encode(photo, "TIFF"))


def _report_probabilities(run_dir) -> dict[str, list[float]]:
    lines = [json.loads(line) for line in (run_dir / "report" / "predictions.jsonl").read_text().splitlines()]
    labels = json.loads((run_dir / "labels.json").read_text())
    return {line["image"]: [line["predictions"][label] for label in labels] for line in lines}


@pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.python.interpreter")  # its move to ai_edge_litert
def test_exported_model_matches_predict_and_the_report(flowers_run, tmp_path):
    run_dir, root, args, _ = flowers_run
    result = run_export(run_dir)
    exported = result.out_dir
    assert result.parity["images"] == 13 and result.parity["max_abs_diff"] <= PARITY_TOLERANCE
    assert result.tflite["written"] and result.tflite["max_abs_diff"] <= PARITY_TOLERANCE

    val = sorted((root / "val").rglob("*.*"))
    relpaths = [path.relative_to(root).as_posix() for path in val]
    # the same files with a byte appended after the image data: new content for the cache, the same pixels
    fresh = []
    for path in val:
        copy = tmp_path / "new" / path.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes() + b"\0")
        fresh.append(copy)
    cached = run_predict(run_dir, [str(p) for p in val], progress=False, out_path=tmp_path / "cached.jsonl")
    extracted = run_predict(run_dir, [str(p) for p in fresh], progress=False, out_path=tmp_path / "fresh.jsonl")
    assert all(p.cached for p in cached.predictions) and not any(p.cached for p in extracted.predictions)
    by_predict = np.array([p.probabilities for p in cached.predictions])
    by_predict_fresh = np.array([p.probabilities for p in extracted.predictions])
    report = _report_probabilities(run_dir)
    by_report = np.array([report[relpath] for relpath in relpaths])

    serve = tf.saved_model.load(str(exported / "saved_model")).signatures["serving_default"]
    outputs = serve(image_bytes=tf.constant([p.read_bytes() for p in fresh]))
    by_export = outputs["probabilities"].numpy()
    assert by_export.dtype == np.float32 and by_export.shape == (13, 5)
    np.testing.assert_allclose(by_export, by_predict, rtol=0, atol=PARITY_TOLERANCE)
    np.testing.assert_allclose(by_export, by_predict_fresh, rtol=0, atol=PARITY_TOLERANCE)
    np.testing.assert_allclose(by_export, by_report, rtol=0, atol=PARITY_TOLERANCE)
    assert [label.decode() for label in outputs["label"].numpy()] == [p.label for p in cached.predictions]
    odd = [relpaths.index(f"val/{name}") for name in ODD_ONES]
    assert np.abs(by_export[odd] - by_predict[odd]).max() <= PARITY_TOLERANCE  # PNG, grayscale, scaled JPEG

    pixels = np.stack([images.decode_image(p.read_bytes(), 224) for p in val]).astype(np.float32)
    model = keras.saving.load_model(exported / "model.keras", safe_mode=True)
    by_keras = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(by_keras, by_predict, rtol=0, atol=PARITY_TOLERANCE)
    head = LogisticRegressionHead.load(run_dir)  # its four arrays are the export's numbers, in float32
    standardise, softmax = model.get_layer("standardise"), model.get_layer("probabilities")
    np.testing.assert_array_equal(np.ravel(standardise.mean), head.mean_.astype(np.float32))
    np.testing.assert_array_equal(np.sqrt(np.ravel(standardise.variance)), head.scale_.astype(np.float32))
    np.testing.assert_array_equal(softmax.get_weights()[0], head.coef_.T.astype(np.float32))
    np.testing.assert_array_equal(softmax.get_weights()[1], head.intercept_.astype(np.float32))
    runner = tf.lite.Interpreter(model_path=str(exported / "model.tflite")).get_signature_runner("serving_images")
    by_tflite = np.concatenate([runner(images=pixels[i:i + 1])["probabilities"] for i in range(len(pixels))])
    np.testing.assert_allclose(by_tflite, by_predict, rtol=0, atol=PARITY_TOLERANCE)
    assert json.loads((exported / "labels.json").read_text()) == list(CLASSES)


def test_saved_model_loads_with_plain_tensorflow_alone(flowers_run):
    """README's five lines, in a fresh interpreter where this package and Keras cannot be imported."""
    run_dir, root, _, _ = flowers_run
    if not (run_dir / "export" / "saved_model").is_dir():
        run_export(run_dir, tflite=False)
    image = root / "val" / "tulips" / "transparent.png"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["pipeline"] = sys.modules["keras"] = None  # importing either now fails
        import tensorflow as tf
        model = tf.saved_model.load({str(run_dir / 'export' / 'saved_model')!r})
        serve = model.signatures["serving_default"]
        out = serve(image_bytes=tf.constant([open({str(image)!r}, "rb").read()]))
        print(out["label"].numpy()[0].decode(), out["probabilities"].numpy()[0].max())
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    label, probability = done.stdout.split()
    (expected,) = run_predict(run_dir, [str(image)], progress=False, out_path=run_dir / "p.jsonl").predictions
    assert label == expected.label and abs(float(probability) - expected.probabilities.max()) <= PARITY_TOLERANCE


def test_dense_head_exports_with_the_same_numbers(flowers_run, capsys):
    run_dir, root, args, tmp = flowers_run
    dense_args = [*args, "--set=head.kind=dense", "--set=head.dense.epochs=5", "--set=head.dense.hidden_units=[32]"]
    assert main(["train", *dense_args]) == 0
    dense_run = max((tmp / "runs" / "flowers").iterdir(), key=lambda p: p.name)
    assert dense_run.name.endswith("-dense")
    assert main(["export", "--run", str(dense_run), "--no-tflite"]) == 0
    printed = capsys.readouterr().out
    assert "parity: on 13 held-out images" in printed and "not written (--no-tflite)" in printed
    parity = json.loads((dense_run / "export" / "export.json").read_text())["parity"]
    assert parity["max_abs_diff"] <= PARITY_TOLERANCE  # the SavedModel, fed the files' bytes, against the report
    assert_exported_keras_agrees_with_predict(dense_run, root)


def test_flip_tta_and_sqrt_normalisation_export_with_the_same_numbers(flowers_run, capsys):
    """The exported model mirrors the pixels, averages the two feature vectors and normalises them as
    the head did; its numbers equal the report's (cached clean and mirrored rows) and predict's."""
    run_dir, root, args, tmp = flowers_run
    tta_args = [*args, "--set=head.tta=flip", "--set=head.logreg.normalizations=[\"sqrt\"]"]
    assert main(["extract", *tta_args]) == 0  # adds only the mirrored views
    assert main(["train", *tta_args]) == 0
    tta_run = max((tmp / "runs" / "flowers").iterdir(), key=lambda p: p.name)
    assert json.loads((tta_run / "run.json").read_text())["params"]["normalization"] == "sqrt"
    assert main(["export", "--run", str(tta_run), "--no-tflite"]) == 0
    parity = json.loads((tta_run / "export" / "export.json").read_text())["parity"]
    assert parity["max_abs_diff"] <= PARITY_TOLERANCE
    assert_exported_keras_agrees_with_predict(tta_run, root)


def test_tflite_is_skipped_with_a_clear_message_when_the_converter_fails(flowers_run, tmp_path, monkeypatch):
    run_dir, _, _, _ = flowers_run
    if not (run_dir / "export" / "saved_model").is_dir():
        run_export(run_dir, tflite=False)

    def offline(*_, **__):
        raise RuntimeError("the converter could not run here")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", offline)
    shutil.copytree(run_dir / "export" / "saved_model", tmp_path / "saved_model")
    outcome = export_tflite(tmp_path, 224, None, None, PARITY_TOLERANCE)
    assert outcome == {"written": False, "note": "skipped: TensorFlow's TFLite converter does not work here (the "
                                                 "converter could not run here); the .keras file and the SavedModel "
                                                 "are complete without it"}
    assert not (tmp_path / "model.tflite").exists()


def _distinct_preprocessing() -> list[str]:
    """One registered backbone per distinct preprocessing and input size: each is a different graph
    for the export to rebuild (caffe-style BGR, in-model rescaling, -1..1 at 299 px, ...)."""
    ramp = np.stack([np.arange(256), np.arange(256)[::-1], np.arange(256) * 7 % 256], -1).astype(np.float32)
    first = {}
    for name, spec in backbones.REGISTRY.items():
        preprocessed = spec.preprocess_input()(ramp.copy())
        first.setdefault((np.asarray(preprocessed).round(4).tobytes(), spec.input_size), name)
    return sorted(first.values())




@pytest.mark.parametrize("name", [n for n in _distinct_preprocessing() if n != "mobilenet"])  # mobilenet: above
def test_every_kind_of_preprocessing_exports_with_parity(flowers_run, tmp_path, name):
    """Random weights (no ImageNet files here but MobileNet's), real photos, the SavedModel against the report."""
    _, root, _, _ = flowers_run
    args = [f"--set=data.root='{root}'", f"--set=cache.dir='{tmp_path / 'cache'}'", f"--set=run.dir='{tmp_path / 'runs'}'",
            f"--set=backbone.name={name}", "--set=backbone.weights=random", "--set=backbone.batch_size=13"]
    assert main(["extract", "--no-progress", *args]) == 0 and main(["train", *args]) == 0
    (run_dir,) = (tmp_path / "runs" / "flowers").iterdir()
    result = run_export(run_dir, tflite=False)
    assert result.parity["images"] == 13 and result.parity["max_abs_diff"] <= PARITY_TOLERANCE, result.parity


def test_mobilenet_v2_with_its_real_imagenet_weights_exports_with_parity(flowers_run, tmp_path):
    _, root, _, _ = flowers_run
    args = [f"--set=data.root='{root}'", f"--set=cache.dir='{tmp_path / 'cache'}'", f"--set=run.dir='{tmp_path / 'runs'}'",
            "--set=backbone.name=mobilenet_v2", "--set=backbone.alpha=0.35"]
    assert main(["extract", "--no-progress", *args]) == 0 and main(["train", *args]) == 0
    (run_dir,) = (tmp_path / "runs" / "flowers").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"]["weights"].startswith("imagenet:mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5:sha256=")
    result = run_export(run_dir, tflite=False)
    assert result.parity["images"] == 13 and result.parity["max_abs_diff"] <= PARITY_TOLERANCE, result.parity


def test_an_export_that_disagrees_with_its_report_is_refused(flowers_run, tmp_path, capsys):
    """As if the backbone had changed since the features were cached: the cached rows no longer match the model."""
    run_dir, _, _, _ = flowers_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "p.jsonl"))
    info = json.loads((copy / "run.json").read_text())
    cache = tmp_path / "cache.h5"
    shutil.copy(info["cache"], cache)
    (copy / "run.json").write_text(json.dumps({**info, "cache": str(cache)}))
    with h5py.File(cache, "r+") as f:
        f["rows/feature"][...] = f["rows/feature"][...][::-1]  # every image gets another image's features
    capsys.readouterr()
    assert main(["export", "--run", str(copy), "--no-tflite"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: the exported model differs from the report by ")
    assert f"do not ship {copy / 'export'}: please report this with export.json" in line
    parity = json.loads((copy / "export" / "export.json").read_text())["parity"]
    assert parity["max_abs_diff"] > PARITY_TOLERANCE


def assert_exported_keras_agrees_with_predict(run_dir: Path, root: Path) -> None:
    """The exported .keras file on the decoded validation photos gives what `predict` gives on their files."""
    val = sorted((root / "val").rglob("*.*"))
    model = keras.saving.load_model(run_dir / "export" / "model.keras", safe_mode=True)
    by_keras = model.predict(np.stack([images.decode_image(p.read_bytes(), 224) for p in val]).astype(np.float32),
                             verbose=0)
    by_predict = [p.probabilities for p in run_predict(run_dir, [str(p) for p in val], progress=False,
                                                       out_path=run_dir / "p.jsonl").predictions]
    np.testing.assert_allclose(by_keras, by_predict, rtol=0, atol=PARITY_TOLERANCE)

"""OpenVINO runtime: converted once and cached, the same features as TensorFlow, safe when
damaged, and one more set of candidates in the measured choice of execution path."""

import dataclasses
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline import backbones, execution, images, openvino_runtime
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.extract import run_extract
from pipeline.heads.logreg import LogisticRegressionHead

from conftest import REPO, tiny_config, write_image

pytest.importorskip("openvino")  # in the test extra, so CI runs these

MOBILENET = ["backbone.name=mobilenet", "backbone.alpha=0.25", "backbone.batch_size=8"]


class CountingConverter:
    """The real conversion, counted."""

    def __init__(self, monkeypatch):
        self.calls, self._convert = 0, openvino_runtime.convert
        monkeypatch.setattr(openvino_runtime, "convert", self)

    def __call__(self, *args):
        self.calls += 1
        return self._convert(*args)


@pytest.fixture(scope="module")
def photos(flowers5):
    """Real photos, four per class per split, decoded as extract decodes them."""
    def take(split, per_class, skip=0):
        chosen, labels = [], []
        for label, folder in enumerate(sorted((flowers5 / split).iterdir())):
            for path in sorted(folder.glob("*.jpg"))[skip:skip + per_class]:
                chosen.append(images.decode_image(path.read_bytes(), 224))
                labels.append(label)
        return np.stack(chosen), np.array(labels)

    return {"train": take("train", 8), "val": take("val", 4), "test": take("val", 4, skip=4)}


@pytest.fixture(scope="module")
def real_ir(keras_home, tmp_path_factory):
    """MobileNet v1 0.25 with its real ImageNet weights, converted once for this module."""
    backbone = load_config(None, MOBILENET).backbone
    ir_dir = tmp_path_factory.mktemp("openvino-ir")
    return backbone, ir_dir, openvino_runtime.OpenVINOExtractor(backbone, ir_dir)


def test_openvino_features_equal_tensorflow_features_on_real_photos(real_ir, photos):
    """Within the tolerance export parity uses: so the runtime stays out of the fingerprint."""
    backbone, _, openvino_extractor = real_ir
    tensorflow_extractor = backbones.FeatureExtractor(backbone)
    features = {split: (tensorflow_extractor(batch), openvino_extractor(batch)) for split, (batch, _) in photos.items()}
    for reference, converted in features.values():
        assert converted.dtype == np.float32 and converted.shape == reference.shape
        np.testing.assert_allclose(converted, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    # a batch split over streams, and a partial batch, give the rows of one whole call
    batch = photos["test"][0]
    np.testing.assert_allclose(openvino_extractor(batch[:3]), openvino_extractor(batch)[:3], rtol=1e-5, atol=1e-6)
    # a head trained on TensorFlow's rows answers the same on OpenVINO's
    head = LogisticRegressionHead().fit(features["train"][0], photos["train"][1], features["val"][0], photos["val"][1])
    reference, converted = (head.predict_proba(rows) for rows in features["test"])
    assert np.abs(reference - converted).max() < 1e-4


def test_the_ir_is_converted_once_reused_and_converted_again_for_another_fingerprint(tmp_path, monkeypatch):
    converter = CountingConverter(monkeypatch)
    backbone = load_config(None, MOBILENET + ["backbone.weights=random"]).backbone
    batch = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    first = openvino_runtime.OpenVINOExtractor(backbone, tmp_path)(batch)
    assert converter.calls == 1
    (xml,) = tmp_path.glob("mobilenet-*.xml")
    assert xml.with_suffix(".bin").is_file() and xml.with_suffix(".json").is_file()
    written = xml.stat().st_mtime_ns

    again = openvino_runtime.OpenVINOExtractor(backbone, tmp_path, "LATENCY")(batch)
    assert converter.calls == 1 and xml.stat().st_mtime_ns == written, "read from the IR, not converted"
    np.testing.assert_array_equal(again, first)

    reseeded = openvino_runtime.OpenVINOExtractor(dataclasses.replace(backbone, seed=1), tmp_path)(batch)
    assert converter.calls == 2 and len(list(tmp_path.glob("mobilenet-*.xml"))) == 2
    assert np.abs(reseeded - first).max() > 0.1 * np.abs(first).max(), "other weights, other IR"
    # precision and batch size are compile-time choices: the same IR serves them
    openvino_runtime.OpenVINOExtractor(dataclasses.replace(backbone, precision="bfloat16", batch_size=3), tmp_path)
    assert converter.calls == 2


@pytest.mark.parametrize("damage", ["truncated bin", "garbage xml", "flipped weight", "no manifest"])
def test_a_damaged_ir_is_converted_again_with_a_one_line_warning(real_ir, photos, tmp_path, monkeypatch, caplog,
                                                                  damage):
    backbone, ir_dir, good = real_ir
    shutil.copytree(ir_dir, tmp_path, dirs_exist_ok=True)
    (xml,) = tmp_path.glob("*.xml")
    bin_ = xml.with_suffix(".bin")
    if damage == "truncated bin":
        bin_.write_bytes(bin_.read_bytes()[:1000])
    elif damage == "garbage xml":
        xml.write_text("<net garbage")
    elif damage == "flipped weight":  # OpenVINO would read it and compute wrong numbers: the checksum catches it
        data = bytearray(bin_.read_bytes())
        data[len(data) // 2] ^= 0x40
        bin_.write_bytes(bytes(data))
    else:
        xml.with_suffix(".json").unlink()
    converter = CountingConverter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.openvino_runtime"):
        rebuilt = openvino_runtime.OpenVINOExtractor(backbone, tmp_path)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "\n" not in warning and str(xml) in warning and "converting the backbone again" in warning
    assert converter.calls == 1
    batch = photos["test"][0]
    np.testing.assert_array_equal(rebuilt(batch), good(batch))
    caplog.clear()
    openvino_runtime.OpenVINOExtractor(backbone, tmp_path)  # repaired: read, silently
    assert converter.calls == 1 and not caplog.records


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def with_cost(path: execution.ExecutionPath, clock: FakeClock, seconds: float) -> execution.ExecutionPath:
    """The real path, building and computing for real, but taking `seconds` per batch on the clock."""

    def build(loaded):
        run = path.build(loaded)

        def timed(batch):
            rows = run(batch)
            clock.now += seconds
            return rows

        return timed

    return dataclasses.replace(path, build=build)


def test_auto_chooses_among_the_runtimes_by_measured_time_and_remembers_it(tmp_path):
    backbone = load_config(None, MOBILENET + ["backbone.weights=random", "backbone.batch_size=2"]).backbone
    assert backbone.runtime == "auto"
    names = [path.name for path in execution.candidates(backbone)]
    assert names == ["tensorflow-graph", "tensorflow-xla", "openvino-throughput", "openvino-latency"]
    costs = {"tensorflow-graph": 0.4, "tensorflow-xla": 0.5, "openvino-throughput": 0.3, "openvino-latency": 0.2}
    clock = FakeClock()
    loaded = backbones.load_backbone(backbone, tmp_path)
    paths = [with_cost(path, clock, costs[path.name]) for path in execution.candidates(backbone)]
    memory = execution.ChoiceMemory(tmp_path / execution.MEMORY_FILE_NAME)
    chooser = execution.PathChooser(loaded, paths, memory=memory, key=execution.machine_key(loaded, paths), clock=clock)
    pixels = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    rows = [chooser(pixels) for _ in range(len(paths) * execution.TRIAL_ROUNDS)]
    assert chooser.chosen.name == "openvino-latency" and "openvino-latency 0.200 s/batch" in chooser.description
    for other in rows[1:]:  # every path computed the same rows (random weights: tiny values, compare relatively)
        np.testing.assert_allclose(other, rows[0], rtol=1e-4, atol=1e-4 * np.abs(rows[0]).max())
    (record,) = json.loads(memory.path.read_text())["choices"]
    assert record["winner"] == "openvino-latency" and set(record["seconds_per_batch"]) == set(costs)
    assert record["key"]["paths"]["openvino-latency"].startswith("openvino 20"), "a new OpenVINO is measured again"
    assert list(tmp_path.glob("openvino/mobilenet-*.xml")), "the IR is kept beside the cache"

    again = backbones.FeatureExtractor(backbone, cache_dir=tmp_path)
    assert "openvino-latency" in again.description and "remembered" in again.description
    np.testing.assert_allclose(again(pixels), rows[0], rtol=1e-4, atol=1e-4 * np.abs(rows[0]).max())


def test_the_runtime_can_be_forced_and_openvino_is_only_a_candidate_where_installed(monkeypatch):
    def names(*settings):
        backbone = load_config(None, MOBILENET + ["backbone.weights=random", *settings]).backbone
        return [path.name for path in execution.candidates(backbone)]

    assert names("backbone.runtime=tensorflow") == ["tensorflow-graph", "tensorflow-xla"]
    assert names("backbone.runtime=openvino") == ["openvino-throughput", "openvino-latency"]
    assert names("backbone.compile=xla") == ["tensorflow-xla"], "a forced TensorFlow compile leaves OpenVINO out"
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    assert names() == ["tensorflow-graph", "tensorflow-xla"]
    with pytest.raises(ConfigError, match=r"backbone.runtime = 'openvino'.*pip install -e '\.\[openvino\]'"):
        names("backbone.runtime=openvino")


def test_without_openvino_chosen_nothing_imports_it(tmp_path, tiny_dataset):
    code = ("import sys; from pipeline.extract import run_extract; from conftest import tiny_config; "
            f"run_extract(tiny_config(__import__('pathlib').Path({str(tmp_path)!r}), "
            f"__import__('pathlib').Path({str(tiny_dataset)!r})), progress=False); "
            "assert 'openvino' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", check=True,
                   env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def test_extract_on_openvino_shares_the_cache_with_tensorflow(tmp_path, tiny_dataset):
    """Same fingerprint, same file: rows from either runtime sit side by side."""
    small_batches = {"backbone.batch_size": 2}  # 12 full batches: enough for the trial between the two hints
    on_openvino = run_extract(tiny_config(tmp_path, tiny_dataset, **small_batches, **{"backbone.runtime": "openvino"}),
                              progress=False)
    assert on_openvino.execution.startswith("backbone path: openvino-") and on_openvino.extracted == 24
    assert list((tmp_path / "cache" / "openvino").glob("mobilenet-*.xml"))
    write_image(tiny_dataset / "cat" / "new.png", seed=999)
    on_tensorflow = run_extract(tiny_config(tmp_path, tiny_dataset, **small_batches), progress=False)
    assert on_tensorflow.cache_path == on_openvino.cache_path and on_tensorflow.extracted == 1

"""Backbones: one signature for all, preprocessing paired with each model, honest fingerprints."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline import backbones
from pipeline.config import load_config
from pipeline.errors import PipelineError

from conftest import REPO

EXPECTED = {  # name: (input size, feature width) with the default alpha
    "inception_v3": (299, 2048),
    "mobilenet": (224, 1024),
    "mobilenet_v2": (224, 1280),
    "resnet50": (224, 2048),
    "efficientnet_b0": (224, 1280),
    "efficientnet_v2_b0": (224, 1280),
    "efficientnet_v2_s": (384, 1280),
    "convnext_tiny": (224, 768),
    "convnext_small": (224, 768),
    "mobilenet_v3_small": (224, 576),
    "mobilenet_v3_large": (224, 960),
    "resnet50_v2": (224, 2048),
}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no weights here
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # and no download, anywhere
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_backbone_shares_one_signature_and_its_own_preprocessing(name):
    config = load_config(None, [f"backbone.name={name}", "backbone.weights=random"]).backbone
    extractor = backbones.FeatureExtractor(config)
    size, width = EXPECTED[name]
    assert (extractor.input_size, extractor.feature_dim) == (size, width)
    assert (backbones.get_spec(name).input_size, backbones.get_spec(name).feature_dim) == (size, width)
    batch = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    features = extractor(batch)
    assert features.shape == (2, width) and features.dtype == np.float32
    # the compiled function equals the model applied to that model's own preprocess_input
    spec = backbones.get_spec(name)
    model = backbones.build_model(config)  # same seed, same weights
    preprocess = spec.preprocess_input()
    expected = np.asarray(model(preprocess(batch.astype(np.float32)), training=False))
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    # finetune.unfreeze counts blocks by block_end; pool_blocks pools the named layers
    layer_names = [layer.name for layer in model.layers]
    assert sum(bool(re.fullmatch(spec.block_end, layer)) for layer in layer_names) > 2
    assert set(spec.blocks) <= set(layer_names)


def test_every_registered_backbone_is_tested_and_has_its_own_stable_fingerprint():
    assert set(backbones.REGISTRY) == set(EXPECTED), "a new backbone needs its (input size, width) in EXPECTED"
    prints = {name: backbones.fingerprint(load_config(None, [f"backbone.name={name}", "backbone.weights=random"]))
              for name in EXPECTED}
    assert len({str(fp) for fp in prints.values()}) == len(EXPECTED)
    for name, fp in prints.items():
        assert fp["backbone"] == name and fp["input_size"] == EXPECTED[name][0]
        assert backbones.fingerprint(load_config(None, [f"backbone.name={name}", "backbone.weights=random"])) == fp


@pytest.mark.parametrize("name", ["efficientnet_v2_b0", "efficientnet_v2_s", "convnext_tiny", "convnext_small",
                                  "mobilenet_v3_small", "mobilenet_v3_large", "resnet50_v2"])
def test_the_weights_file_recorded_is_the_one_keras_downloads(offline, name):
    """Keras' own download (checked against its own hash) stays the path; the record names the same file."""
    config = load_config(None, [f"backbone.name={name}"]).backbone
    with pytest.raises(PipelineError) as info:
        backbones.build_model(config)
    assert f"/{backbones.get_spec(name).weights_file_name(config.alpha)}:" in str(info.value)  # in Keras' URL


def test_bfloat16_policy_is_used_and_close_to_float32():
    base = load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25", "backbone.weights=random"]).backbone
    batch = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    fp32 = backbones.FeatureExtractor(base)(batch)
    bf16_model = backbones.build_model(dataclasses.replace(base, precision="bfloat16"))
    assert bf16_model.layers[2].compute_dtype == "bfloat16"
    bf16 = backbones.FeatureExtractor(dataclasses.replace(base, precision="bfloat16"))(batch)
    assert bf16.dtype == np.float32
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.98


@pytest.mark.parametrize("flags, native", [("fpu sse avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_tile amx_bf16", True)])
def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert backbones.cpu_has_native_bfloat16(cpuinfo) is native
    assert backbones.cpu_has_native_bfloat16(tmp_path / "missing") is None


def test_fingerprint_changes_with_everything_that_changes_the_numbers(tmp_path):
    base = load_config(None, ["backbone.name=mobilenet", "backbone.weights=random"])
    fp = backbones.fingerprint(base)
    variants = ["backbone.alpha=0.5", "backbone.seed=1", "backbone.precision=bfloat16", "cache.dtype=float16",
                "backbone.name=mobilenet_v2"]
    seen = {str(fp)}
    for override in variants:
        other = backbones.fingerprint(load_config(None, ["backbone.name=mobilenet", "backbone.weights=random",
                                                         override]))
        assert str(other) not in seen, override
        seen.add(str(other))
    assert backbones.fingerprint(load_config(None, ["backbone.name=inception_v3", "backbone.alpha=0.5",
                                                    "backbone.weights=random"])) == backbones.fingerprint(
        load_config(None, ["backbone.name=inception_v3", "backbone.weights=random"])), "alpha is MobileNet-only"
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"one")
    first = backbones.fingerprint(load_config(None, [f"backbone.weights='{weights}'"]))
    weights.write_bytes(b"two")
    assert backbones.fingerprint(load_config(None, [f"backbone.weights='{weights}'"])) != first


def test_imagenet_identity_is_the_weights_file_hash(keras_home):
    config = load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25"])
    fp = backbones.fingerprint(config)
    assert fp["weights"].startswith("imagenet:mobilenet_2_5_224_tf_no_top.h5:sha256=")
    sums = (keras_home / "models" / "SHA256SUMS").read_text()
    assert fp["weights"].rsplit("=", 1)[1] in sums


def test_fingerprint_does_not_import_tensorflow():
    code = ("import sys; from pipeline import backbones; from pipeline.config import load_config; "
            "backbones.fingerprint(load_config(None, ['backbone.weights=random'])); "
            "assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_missing_imagenet_weights_say_so_in_one_line(offline, caplog):
    config = load_config(None, ["backbone.name=inception_v3"])
    assert backbones.fingerprint(config) is None
    with pytest.raises(PipelineError) as info:
        backbones.build_model(config.backbone)
    message = str(info.value)
    assert "\n" not in message and "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "backbone.weights" in message
    # only a config that allows it (the embedded demo) falls back, and it says so loudly
    assert backbones.resolve_weights(config) is config
    demo = load_config(REPO / "configs" / "default.toml")
    resolved = backbones.resolve_weights(demo)
    assert resolved.backbone.weights == "random"
    assert "MEANINGLESS" in caplog.text  # through logging: the CLI shows it on stderr, a notebook may silence it


def test_unknown_weights_file_is_a_config_error():
    with pytest.raises(PipelineError, match="no such file"):
        backbones.fingerprint(load_config(None, ["backbone.weights=/nope/weights.h5"]))


def test_a_float32_extract_on_a_cpu_with_native_bfloat16_is_told_what_one_setting_buys(monkeypatch):
    config = load_config(None, ["backbone.name=mobilenet", "backbone.alpha=0.25", "backbone.weights=random"]).backbone
    monkeypatch.setattr(backbones, "cpu_has_native_bfloat16", lambda: True)
    hint = backbones.bfloat16_hint(config)
    assert hint.startswith("hint: ") and 'backbone.precision = "bfloat16"' in hint and "\n" not in hint
    assert backbones.bfloat16_hint(dataclasses.replace(config, precision="bfloat16")) == "", "already bfloat16"
    monkeypatch.setattr(backbones, "cpu_has_native_bfloat16", lambda: False)
    assert backbones.bfloat16_hint(config) == "", "emulated bfloat16 would be slower: no hint"

"""The frozen ImageNet backbones, behind one signature, each paired with its preprocessing.

Everything that decides the numbers a backbone produces (architecture, width, weights'
identity, input size, preprocessing, resize, precision, stored dtype) goes into its
fingerprint, which names the cache file. The fingerprint is computed without importing
TensorFlow, so a stage with nothing to extract starts in a fraction of a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from . import execution, images
from .config import BackboneConfig, Config
from .errors import ConfigError, PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything about one keras.applications backbone. A new backbone is one record in
    REGISTRY below (and its tests): config, fingerprints, extract, export and classify read it."""
    name: str
    constructor: str  # attribute of keras.applications
    module: str  # keras.applications submodule whose preprocess_input belongs to the model
    input_size: int
    feature_dim: int  # length of the pooled last block's features (at alpha 1.0)
    # what preprocess_input does, rebuilt from stock layers by export: "tf" scales to -1..1, "caffe" is BGR
    # minus ImageNet's mean, "none" when the model preprocesses inside (never applied twice)
    preprocessing: Literal["tf", "caffe", "none"]
    weights_file: Callable[[float], str]  # alpha -> the file Keras downloads for weights="imagenet", no top
    block_end: str  # regex matching the last layer of each block, for `finetune.unfreeze` counted in blocks
    has_alpha: bool = False
    blocks: tuple[str, ...] = ()  # layers ending the last blocks, last first: what backbone.pool_blocks pools

    def weights_file_name(self, alpha: float) -> str:
        """The file Keras downloads for `weights="imagenet"` without the top."""
        return self.weights_file(alpha)

    @property
    def preprocessing_id(self) -> str:
        """Names the preprocessing in fingerprints."""
        return f"keras.applications.{self.module}.preprocess_input"

    def preprocess_input(self) -> Callable:
        """Keras' own preprocess_input for this model: the one place it is looked up."""
        return importlib.import_module(f"keras.applications.{self.module}").preprocess_input


_MOBILENET_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("inception_v3", "InceptionV3", "inception_v3", input_size=299, feature_dim=2048,
                     preprocessing="tf", block_end=r"mixed\d+", blocks=("mixed10", "mixed9"),
                     weights_file=lambda alpha: "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        BackboneSpec("mobilenet", "MobileNet", "mobilenet", input_size=224, feature_dim=1024, preprocessing="tf",
                     block_end=r"conv_pw_\d+_relu", has_alpha=True, blocks=("conv_pw_13_relu", "conv_pw_12_relu"),
                     weights_file=lambda alpha: f"mobilenet_{_MOBILENET_ALPHA_TEXT.get(alpha, alpha)}_224_tf_no_top.h5"),
        BackboneSpec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", input_size=224, feature_dim=1280,
                     preprocessing="tf", block_end=r"block_\d+_project_BN", has_alpha=True,
                     blocks=("out_relu", "block_16_project_BN"),
                     weights_file=lambda alpha: f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_224_no_top.h5"),
        BackboneSpec("resnet50", "ResNet50", "resnet50", input_size=224, feature_dim=2048, preprocessing="caffe",
                     block_end=r"conv\d_block\d+_out", blocks=("conv5_block3_out", "conv5_block2_out"),
                     weights_file=lambda alpha: "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        BackboneSpec("efficientnet_b0", "EfficientNetB0", "efficientnet", input_size=224, feature_dim=1280,
                     preprocessing="none", block_end=r"block\d[a-z]_project_bn",
                     blocks=("top_activation", "block7a_project_bn"), weights_file=lambda alpha: "efficientnetb0_notop.h5"),
        # EfficientNetV2, ConvNeXt and MobileNetV3 rescale inside the model (include_preprocessing=True, Keras'
        # default): their preprocess_input is the identity, so "none" and nothing is applied twice
        BackboneSpec("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", input_size=224, feature_dim=1280,
                     preprocessing="none", block_end=r"block\d[a-z]_project_bn", blocks=("top_activation", "block6h_add"),
                     weights_file=lambda alpha: "efficientnetv2-b0_notop.h5"),
        BackboneSpec("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", input_size=384, feature_dim=1280,
                     preprocessing="none", block_end=r"block\d[a-z]_project_bn", blocks=("top_activation", "block6o_add"),
                     weights_file=lambda alpha: "efficientnetv2-s_notop.h5"),
        # headless ConvNeXt pools then layer-normalizes (an auto-named layer), so it offers the last block only
        BackboneSpec("convnext_tiny", "ConvNeXtTiny", "convnext", input_size=224, feature_dim=768, preprocessing="none",
                     block_end=r"convnext_[a-z]+_stage_\d+_block_\d+_identity",
                     weights_file=lambda alpha: "convnext_tiny_notop.h5"),
        BackboneSpec("convnext_small", "ConvNeXtSmall", "convnext", input_size=224, feature_dim=768, preprocessing="none",
                     block_end=r"convnext_[a-z]+_stage_\d+_block_\d+_identity",
                     weights_file=lambda alpha: "convnext_small_notop.h5"),
        # headless MobileNetV3 pools its last 1x1 convolution (576 or 960 wide; the 1024/1280 layer belongs to the
        # top); its last activation is auto-named, so it offers the last block only. Width 1.0, not minimalistic.
        BackboneSpec("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", input_size=224, feature_dim=576,
                     preprocessing="none", block_end=r"expanded_conv(_\d+)?_project_bn",
                     weights_file=lambda alpha: "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
        BackboneSpec("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", input_size=224, feature_dim=960,
                     preprocessing="none", block_end=r"expanded_conv(_\d+)?_project_bn",
                     weights_file=lambda alpha: "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
        BackboneSpec("resnet50_v2", "ResNet50V2", "resnet_v2", input_size=224, feature_dim=2048, preprocessing="tf",
                     block_end=r"conv\d_block\d+_out", blocks=("post_relu", "conv5_block3_out"),
                     weights_file=lambda alpha: "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"backbone.name = {name!r} is unknown; fix: use one of {', '.join(REGISTRY)}") from None


def keras_weights_path(spec: BackboneSpec, alpha: float) -> Path:
    """Where Keras keeps (or will download) the ImageNet weights: $KERAS_HOME/models/."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / spec.weights_file_name(alpha)


def weights_identity(backbone: BackboneConfig) -> str | None:
    """What the weights are, by content; None when ImageNet weights still need downloading."""
    spec = get_spec(backbone.name)
    if backbone.weights == "random":
        return f"random:seed={backbone.seed}:keras={importlib.metadata.version('keras')}"
    if backbone.weights == "imagenet":
        path = keras_weights_path(spec, backbone.alpha)
        return f"imagenet:{path.name}:sha256={_file_sha256(path)}" if path.is_file() else None
    path = Path(backbone.weights)
    if not path.is_file():
        raise ConfigError(f"backbone.weights = {backbone.weights!r}: no such file; fix: use 'imagenet', "
                          "'random' or the path of a Keras weights file")
    return f"file:{path.name}:sha256={_file_sha256(path)}"


def fingerprint(config: Config) -> dict | None:
    """Every setting that changes the cached numbers; None if the weights are not here yet."""
    backbone = config.backbone
    spec = get_spec(backbone.name)
    identity = weights_identity(backbone)
    if identity is None:
        return None
    pooled = {"pooled_blocks": list(pooled_blocks(backbone))} if backbone.pool_blocks > 1 else {}
    return {
        **pooled,  # only when more than the last block, so one-block caches keep their names
        "backbone": spec.name,
        "alpha": backbone.alpha if spec.has_alpha else None,
        "weights": identity,
        "input_size": spec.input_size,
        "decode": images.DECODE_ID,
        "preprocessing": spec.preprocessing_id,
        "precision": backbone.precision,
        "feature_dtype": config.cache.dtype,
    }


def pooled_blocks(backbone: BackboneConfig) -> tuple[str, ...]:
    """The layers whose pooled outputs make a feature vector, last block first."""
    spec = get_spec(backbone.name)
    if backbone.pool_blocks < 1 or backbone.pool_blocks > max(1, len(spec.blocks)):
        raise ConfigError(f"backbone.pool_blocks = {backbone.pool_blocks}: {spec.name} offers 1 to "
                          f"{max(1, len(spec.blocks))}; fix: set it in that range")
    return spec.blocks[:backbone.pool_blocks]


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def build_model(backbone: BackboneConfig, *, include_top: bool = False):
    """The Keras model from keras.applications, frozen, global-average-pooled when headless."""
    import keras

    spec = get_spec(backbone.name)
    weights = backbone.weights
    if weights == "random":
        keras.utils.set_random_seed(backbone.seed)
        weights = None
    kwargs = {"include_top": include_top, "weights": weights}
    if not include_top:
        kwargs.update(pooling="avg", input_shape=(spec.input_size, spec.input_size, 3))
    if spec.has_alpha:
        kwargs["alpha"] = backbone.alpha
    previous_policy = keras.config.dtype_policy()
    if backbone.precision == "bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = getattr(keras.applications, spec.constructor)(**kwargs)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        if backbone.weights != "imagenet":
            raise PipelineError(f"backbone.weights = {backbone.weights!r} does not fit {spec.name}: {exc}") from None
        target = keras_weights_path(spec, backbone.alpha)
        raise PipelineError(
            f"could not get ImageNet weights for {spec.name} ({str(exc).splitlines()[0][:160]}); fix: connect "
            f"to the internet once, or put {target.name} in {target.parent}, or set backbone.weights to a "
            "local weights file"
        ) from None
    finally:
        keras.config.set_dtype_policy(previous_policy)
    if not include_top and backbone.pool_blocks > 1:  # each block average-pooled, concatenated, last block first
        outputs = [keras.layers.GlobalAveragePooling2D(name=f"pool_{name}")(model.get_layer(name).output)
                   for name in pooled_blocks(backbone)]
        model = keras.Model(model.inputs, keras.layers.Concatenate(name="pooled_blocks")(outputs),
                            name=f"{model.name}_pooled_{backbone.pool_blocks}")
    model.trainable = False
    return model


def resolve_weights(config: Config) -> Config:
    """Fall back to random weights for the embedded demo when ImageNet weights can't be had."""
    backbone = config.backbone
    if backbone.weights != "imagenet" or not backbone.allow_random_fallback:
        return config
    if keras_weights_path(get_spec(backbone.name), backbone.alpha).is_file():
        return config
    try:
        build_model(backbone)
        return config
    except PipelineError as exc:
        warn_random_weights(str(exc))
        return with_random_weights(config)


def with_random_weights(config: Config) -> Config:
    return replace(config, backbone=replace(config.backbone, weights="random"))


def warn_random_weights(reason: str) -> None:
    """Loud on purpose: numbers from random weights must never be mistaken for results."""
    log.warning("\n%s\nWARNING: %s\nWARNING: the demo goes on with RANDOM weights: its accuracy will be "
                "MEANINGLESS.\n%s\n", "!" * 78, reason, "!" * 78)


def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16, AMX, Arm BF16); None where
    the kernel does not say (no /proc/cpuinfo). Without it TensorFlow emulates bfloat16."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    flags = {flag for line in lines if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bfloat16_hint(backbone: BackboneConfig) -> str:
    """One line for a float32 extract on a CPU that computes bfloat16 natively: the default stays
    float32 (README, Performance: the fingerprint would otherwise depend on the machine), but the
    user should know what one setting buys here."""
    import tensorflow as tf

    if backbone.precision != "float32" or not cpu_has_native_bfloat16() or tf.config.list_physical_devices("GPU"):
        return ""
    return ('hint: this CPU computes bfloat16 natively (AVX512-BF16/AMX): backbone.precision = "bfloat16" extracted '
            "Inception V3 2.3x faster on such a CPU (validation accuracy within a point); it makes a separate cache")


@functools.cache
def _warn_if_bfloat16_is_emulated() -> None:
    if cpu_has_native_bfloat16() is False:
        log.warning('warning: this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16), so backbone.precision = '
                    '"bfloat16" runs slower than float32 here, not faster; fix: set backbone.precision = "float32"')


def load_backbone(backbone: BackboneConfig, cache_dir: Path | None = None) -> "execution.LoadedBackbone":
    """The frozen model paired with its own preprocessing: what every execution path runs."""
    spec = get_spec(backbone.name)
    model = build_model(backbone)
    return execution.LoadedBackbone(model, spec.preprocess_input(), backbone, spec.input_size, int(model.output_shape[-1]),
                                    cache_dir=Path(cache_dir) if cache_dir is not None else None)


class FeatureExtractor:
    """A frozen backbone as one function: a uint8 image batch in, float32 rows out.

    Preprocessing runs inside the same function, so it can never drift from the model. How
    the function is executed (plain graph, XLA, another runtime) is chosen by measurement on
    this machine, see `execution`, and remembered in `cache_dir` (None: measured in this
    process only); `path` names one path to run (the benchmark times each).
    `description` says which path runs and why, once known.
    """

    def __init__(self, backbone: BackboneConfig, *, cache_dir: Path | None = None, path: str | None = None):
        import tensorflow as tf

        paths = [execution.PATHS[path]] if path else execution.candidates(backbone)
        execution.use_usable_cores_in_tensorflow()
        loaded = load_backbone(backbone, cache_dir)
        self.input_size, self.feature_dim, self.batch_size = loaded.input_size, loaded.feature_dim, backbone.batch_size
        if backbone.precision == "bfloat16" and not tf.config.list_physical_devices("GPU"):
            _warn_if_bfloat16_is_emulated()
        memory = execution.ChoiceMemory(loaded.cache_dir / execution.MEMORY_FILE_NAME) if loaded.cache_dir else None
        self._chooser = execution.PathChooser(loaded, paths, memory=memory, key=execution.machine_key(loaded, paths))

    def expect(self, images: int) -> None:
        """How many images this run will send: a run too small to measure the paths on skips the trial."""
        self._chooser.expect(images // self.batch_size)

    @property
    def description(self) -> str:
        return self._chooser.description

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._chooser(batch)

"""OpenVINO as a runtime for the frozen backbone: the same uint8 batch in, float32 rows out.

Optional (`pip install '.[openvino]'`): nothing here imports OpenVINO until an extractor is
built, and `available()` asks only whether it is installed. The backbone, with its
preprocessing inside, is converted once from the same `tf.function` the TensorFlow path
runs (`openvino.convert_model` on its concrete function: no SavedModel round trip, which
Keras 3 models would need) and kept as OpenVINO's IR beside the caches,
`<cache.dir>/openvino/<backbone>-<id>.xml` and `.bin`, so later runs only read it (a
fraction of a second, against seconds to build the Keras model and convert it).

The IR holds the float32 graph; precision is a compile-time hint (`bf16` for
`backbone.precision = "bfloat16"`), which OpenVINO honours only on CPUs with bfloat16
instructions (elsewhere it computes float32, and says so here). The IR's name is the
identity of what it computes (backbone, width, weights' hash, input size, preprocessing)
and the OpenVINO version; a JSON manifest beside it, written last, records that identity
and the SHA-256 of both files. An IR whose manifest is missing or disagrees, or that
OpenVINO cannot read, is converted again after a one-line warning: a damaged file costs
one conversion, never a crash and never wrong numbers.

Its configurations join the measured choice of `execution` as paths of their own
(`openvino-throughput`, `openvino-latency`): with `backbone.runtime = "auto"` wherever
OpenVINO is installed and the backbone runs on a CPU, and anywhere with `"openvino"`.
Their features equal TensorFlow's within float rounding (1e-5 relative on real MobileNet
features), so, like graph and XLA, the runtime is not part of the cache's fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from . import backbones, execution
from .config import BackboneConfig

log = logging.getLogger(__name__)

IR_FOLDER = "openvino"  # under cache.dir
PerformanceHint = Literal["LATENCY", "THROUGHPUT"]
PERFORMANCE_HINTS: tuple[PerformanceHint, ...] = ("THROUGHPUT", "LATENCY")
_PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}


def available() -> bool:
    """Whether OpenVINO is installed, without importing it."""
    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str:
    return importlib.metadata.version("openvino")


@functools.cache
def _core():
    """One OpenVINO Core per process: it holds the plugins and their thread pools."""
    import openvino

    return openvino.Core()


def cpu_computes_bfloat16() -> bool:
    """Whether OpenVINO's CPU plugin has bfloat16 kernels here (AVX512-BF16, AMX); without them
    a bf16 hint runs float32."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@functools.cache
def _say_bfloat16_is_float32() -> None:
    log.warning("warning: this CPU has no bfloat16 instructions, so OpenVINO computes the bfloat16 backbone in "
                "float32 (as precise, no faster)")


def ir_identity(backbone: BackboneConfig) -> dict | None:
    """What the converted graph computes, and with which converter; None while ImageNet
    weights are still to be downloaded. Precision, decoding and stored dtype are not in it:
    the IR is the float32 graph on already-decoded pixels."""
    spec = backbones.get_spec(backbone.name)
    weights = backbones.weights_identity(backbone)
    if weights is None:
        return None
    return {"backbone": spec.name, "alpha": backbone.alpha if spec.has_alpha else None, "weights": weights,
            "input_size": spec.input_size, "preprocessing": spec.preprocessing_id,
            "input": "uint8 NHWC RGB", "openvino": openvino_version(),
            **({"pooled_blocks": list(backbones.pooled_blocks(backbone))} if backbone.pool_blocks > 1 else {})}


@dataclass(frozen=True)
class IRFiles:
    xml: Path
    bin: Path
    manifest: Path

    @classmethod
    def for_identity(cls, ir_dir: Path, identity: dict) -> IRFiles:
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        stem = Path(ir_dir) / f"{identity['backbone']}-{digest}"
        return cls(stem.with_suffix(".xml"), stem.with_suffix(".bin"), stem.with_suffix(".json"))


def load_or_convert(backbone: BackboneConfig, ir_dir: Path | None,
                    float32_backbone: execution.LoadedBackbone | None = None):
    """The backbone as an OpenVINO model: read from its IR when a good one is there, else
    converted from TensorFlow (from `float32_backbone` when given, already built) and saved
    for the next run. Without `ir_dir` it is converted and kept in memory only."""
    identity = ir_identity(backbone)
    if identity is None:  # building the Keras model downloads the ImageNet weights
        backbones.build_model(backbone)
        identity = ir_identity(backbone)
    files = IRFiles.for_identity(ir_dir, identity) if ir_dir is not None else None
    model = _read_ir(files, identity) if files is not None else None
    if model is None:
        model = convert(backbone, float32_backbone)
        if files is not None:
            try:
                _save_ir(model, files, identity)
            except OSError as exc:  # a read-only or full cache folder costs a conversion per run, nothing else
                log.warning("warning: could not keep the OpenVINO IR in %s (%s); it is converted again next run",
                            files.xml.parent, exc.strerror or exc)
    return model


def _read_ir(files: IRFiles, identity: dict):
    if not (files.xml.exists() or files.bin.exists() or files.manifest.exists()):
        return None
    try:
        manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
        if manifest.get("identity") != identity:
            raise ValueError("its manifest names another model")
        for path in (files.xml, files.bin):
            if _sha256(path) != manifest["sha256"][path.suffix]:
                raise ValueError(f"{path.name} does not match its checksum")
        return _core().read_model(files.xml, files.bin)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        log.warning("warning: OpenVINO IR %s is unusable (%s); converting the backbone again", files.xml, reason)
        return None


def convert(backbone: BackboneConfig, float32_backbone: execution.LoadedBackbone | None = None):
    """The float32 backbone with its preprocessing, from TensorFlow's function to OpenVINO."""
    import openvino

    started = time.perf_counter()
    source = float32_backbone or backbones.load_backbone(dataclasses.replace(backbone, precision="float32"))
    model = openvino.convert_model(source.graph_function().get_concrete_function())
    log.info("converted %s to OpenVINO in %.1f s", backbone.name, time.perf_counter() - started)
    return model


def _save_ir(model, files: IRFiles, identity: dict) -> None:
    """Both files under temporary names, renamed into place, then the manifest: a crash leaves
    no manifest or a complete IR, and if two writers interleave, the checksums refuse the mix."""
    import openvino

    files.xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=files.xml.parent, prefix=".converting-") as tmp:
        xml, bin_ = Path(tmp) / "model.xml", Path(tmp) / "model.bin"
        openvino.save_model(model, xml, compress_to_fp16=False)  # float16 weights would change the features
        manifest = {"identity": identity, "sha256": {".xml": _sha256(xml), ".bin": _sha256(bin_)}}
        files.manifest.unlink(missing_ok=True)
        os.replace(bin_, files.bin)
        os.replace(xml, files.xml)
        manifest_tmp = Path(tmp) / "manifest.json"
        manifest_tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(manifest_tmp, files.manifest)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class OpenVINOExtractor:
    """The backbone on OpenVINO's CPU plugin, with FeatureExtractor's signature.

    With the THROUGHPUT hint OpenVINO runs several streams (a share of the cores each); a
    batch is split into one chunk per stream and the chunks run at once, so the rows are the
    same as in one call and only the schedule differs. LATENCY runs the batch as one request.
    """

    def __init__(self, backbone: BackboneConfig, ir_dir: Path | None, performance_hint: PerformanceHint = "THROUGHPUT",
                 *, float32_backbone: execution.LoadedBackbone | None = None):
        spec = backbones.get_spec(backbone.name)
        model = load_or_convert(backbone, ir_dir, float32_backbone)
        precision = _PRECISION_HINTS[backbone.precision]
        self._compiled = _core().compile_model(model, "CPU", {"PERFORMANCE_HINT": performance_hint,
                                                              "INFERENCE_PRECISION_HINT": precision})
        self.input_size = spec.input_size
        self.feature_dim = int(self._compiled.output(0).get_partial_shape()[-1].get_length())
        self.batch_size = backbone.batch_size
        self.performance_hint = performance_hint
        self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # what it computes in
        if backbone.precision == "bfloat16" and not cpu_computes_bfloat16():
            _say_bfloat16_is_float32()
        requests = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = [self._compiled.create_infer_request() for _ in range(max(1, requests))]

    @property
    def name(self) -> str:
        return f"openvino-{self.performance_hint.lower()}"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if len(batch) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        chunks = np.array_split(batch, min(len(self._requests), len(batch)))
        requests = self._requests[:len(chunks)]
        for request, chunk in zip(requests, chunks):
            request.start_async([chunk])
        for request in requests:
            request.wait()
        return np.concatenate([np.array(request.get_output_tensor(0).data, np.float32) for request in requests])


def usable(backbone: BackboneConfig) -> bool:
    """Installed, and (for `auto`) the backbone runs on a CPU: with a GPU, TensorFlow's paths
    run there and OpenVINO's CPU plugin is tried only when `backbone.runtime = "openvino"`."""
    if not available():
        return False
    if backbone.runtime == "openvino":
        return True
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")


def _build_path(loaded: execution.LoadedBackbone, performance_hint: PerformanceHint) -> OpenVINOExtractor:
    float32 = loaded if loaded.config.precision == "float32" else None  # bfloat16: the float32 graph is built
    ir_dir = loaded.cache_dir / IR_FOLDER if loaded.cache_dir is not None else None
    return OpenVINOExtractor(loaded.config, ir_dir, performance_hint, float32_backbone=float32)


for _hint in PERFORMANCE_HINTS:
    execution.register(execution.ExecutionPath(
        f"openvino-{_hint.lower()}", "openvino", "", functools.partial(_build_path, performance_hint=_hint),
        available=usable, version=lambda: f"openvino {openvino_version()}"))

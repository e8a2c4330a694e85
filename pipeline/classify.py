"""`python -m pipeline classify IMAGE`: the backbone with its own ImageNet top, names included.

The first sanity check before transfer learning: does the frozen network see a panda in
the panda photo? It decodes exactly as extract does and prints the top-k of the 1000
ImageNet classes. Names come, in this order, from `--imagenet-labels DIR`, Keras' class
index if it is already downloaded, the 2015 label maps that TensorFlow's Inception graph
shipped (found beside the checkout in `../shared/imagenet`, or in `./imagenet`), and last
Keras' own download of its class index (which needs the internet).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import backbones, images
from .config import Config
from .errors import ImageError, PipelineError

KERAS_CLASS_INDEX = "imagenet_class_index.json"  # what keras.applications' decode_predictions downloads
SYNSET_MAP = "imagenet_2012_challenge_label_map_proto.pbtxt"  # the 1000 ILSVRC-2012 synsets
HUMAN_MAP = "imagenet_synset_to_human_label_map.txt"  # synset<TAB>English names
DEFAULT_LABEL_DIRS = (Path(__file__).resolve().parents[2] / "shared" / "imagenet", Path("imagenet"))
N_CLASSES = 1000


@dataclass
class Classification:
    image: str
    top: list[tuple[int, float]]  # (class index, probability), best first
    error: str | None = None


def run_classify(config: Config, paths: Sequence[Path], *, top: int = 5,
                 label_dir: Path | None = None) -> tuple[list[Classification], list[str]]:
    """Top-k ImageNet classes per image, and the 1000 names (checked before the model is built)."""
    import tensorflow as tf

    spec = backbones.get_spec(config.backbone.name)
    names = imagenet_names(label_dir, backbones.keras_weights_path(spec, config.backbone.alpha).parent)
    model = backbones.build_model(config.backbone, include_top=True)
    preprocess = spec.preprocess_input()
    results = []
    for path in paths:
        try:
            _, pixels = images.read_and_decode(Path(path), spec.input_size, max_pixels=config.data.max_image_pixels)
        except ImageError as exc:
            results.append(Classification(str(path), [], str(exc)))
            continue
        batch = preprocess(tf.cast(pixels[None], tf.float32))
        probabilities = np.asarray(tf.cast(model(batch, training=False), tf.float32))[0]
        order = np.argsort(-probabilities, kind="stable")[:top]
        results.append(Classification(str(path), [(int(i), float(probabilities[i])) for i in order]))
    if all(r.error is not None for r in results):
        raise ImageError(f"{results[0].image}: {results[0].error}")
    return results, names


def format_classifications(results: list[Classification], names: list[str]) -> str:
    lines = []
    for result in results:
        lines.append(result.image + (f": error: {result.error}" if result.error else ""))
        lines += [f"  {rank}. {p:.4f}  {names[i]} (class {i})" for rank, (i, p) in enumerate(result.top, 1)]
    return "\n".join(lines)


def imagenet_names(label_dir: Path | None, keras_models_dir: Path) -> list[str]:
    """The 1000 class names in the order of Keras' outputs."""
    if label_dir is not None:
        return names_from_label_maps(Path(label_dir))
    cached = keras_models_dir / KERAS_CLASS_INDEX
    if cached.is_file():
        return _names_from_keras_index(cached)
    for folder in DEFAULT_LABEL_DIRS:
        if (folder / SYNSET_MAP).is_file() and (folder / HUMAN_MAP).is_file():
            return names_from_label_maps(folder)
    return _download_keras_index()


def names_from_label_maps(folder: Path) -> list[str]:
    """Keras' class i is the i-th of the 1000 ILSVRC-2012 synsets in sorted order."""
    try:
        synsets = sorted(set(re.findall(r'target_class_string:\s*"(n\d+)"', (folder / SYNSET_MAP).read_text())))
        human = dict(line.split("\t", 1) for line in (folder / HUMAN_MAP).read_text().splitlines() if "\t" in line)
    except OSError as exc:
        raise PipelineError(f"cannot read the ImageNet label maps in {folder} ({exc.strerror or exc}); fix: pass "
                            f"--imagenet-labels DIR holding {SYNSET_MAP} and {HUMAN_MAP}") from None
    if len(synsets) != N_CLASSES:
        raise PipelineError(f"{folder / SYNSET_MAP} lists {len(synsets)} synsets, not {N_CLASSES}; fix: use the "
                            "ILSVRC-2012 label map that shipped with TensorFlow's Inception graph")
    return [human.get(synset, synset).strip() for synset in synsets]


def _names_from_keras_index(path: Path) -> list[str]:
    index = json.loads(path.read_text(encoding="utf-8"))
    return [index[str(i)][1].replace("_", " ") for i in range(N_CLASSES)]


def _download_keras_index() -> list[str]:
    """Keras' own download of its class index, the route users with internet take."""
    from keras.applications import imagenet_utils

    try:
        decoded = imagenet_utils.decode_predictions(np.arange(N_CLASSES, 0, -1, dtype=np.float32)[None], top=N_CLASSES)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        raise PipelineError(f"no ImageNet class names on this machine, and Keras could not download its class index "
                            f"({str(exc).splitlines()[0][:120]}); fix: pass --imagenet-labels DIR holding {SYNSET_MAP} "
                            f"and {HUMAN_MAP}") from None
    return [name.replace("_", " ") for _, name, _ in decoded[0]]

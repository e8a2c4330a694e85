"""`python -m pipeline bench --big-cache`: the heads on a cache bigger than comfort.

Builds a synthetic cache of 1,000,000 x 1,280 float16 rows in 20 classes (written in chunks
through the real cache writer, about 2.5 GB in a temporary folder that is deleted after),
then trains each head on it in a fresh process, from the cache as `train` does (FeatureRows),
and reports its train time and peak RSS against the project's targets: the dense head
(streamed from the cache) under 3 GB; logistic regression at most 1.3x the float32 size of
its training matrix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .cache import CacheWriter, FeatureCache, FileRecord

log = logging.getLogger(__name__)

FINGERPRINT = {"backbone": "synthetic", "weights": "big-cache-bench"}
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class BigCacheOptions:
    rows: int = 1_000_000
    dim: int = 1280
    classes: int = 20
    val_fraction: float = 0.1
    write_chunk: int = 20_000
    dense_epochs: int = 2  # enough to time an epoch and see memory settle; accuracy is not the point
    logreg_max_iter: int = 30


# Runs one head in a fresh process (so that peak RSS is that head's alone) and prints JSON.
_CHILD = """import json, sys, time
import numpy as np
from pipeline.big_cache_bench import train_head
print("BIG-CACHE-CHILD " + json.dumps(train_head(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
"""


def run_big_cache_bench(options: BigCacheOptions = BigCacheOptions(), folder: Path | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="big-cache-", dir=folder))
    try:
        path = tmp / "big.h5"
        started = time.perf_counter()
        write_synthetic_cache(path, options)
        result = {"rows": options.rows, "dim": options.dim, "classes": options.classes, "dtype": "float16",
                  "file_gib": path.stat().st_size / GIB, "write_s": time.perf_counter() - started,
                  "train_matrix_float32_gib": options.rows * (1 - options.val_fraction) * options.dim * 4 / GIB}
        for kind, iterations in (("dense", options.dense_epochs), ("logreg", options.logreg_max_iter)):
            log.info("training the %s head on %d rows", kind, options.rows)
            result[kind] = _child(path, kind, iterations, options)
        bounds = {"dense": ("dense peak RSS < 3 GiB", 3.0),
                  "logreg": ("logreg peak RSS <= 1.3x its float32 training matrix",
                             1.3 * result["train_matrix_float32_gib"])}
        result["targets"] = {name: "peak_rss_gib" in result[kind] and result[kind]["peak_rss_gib"] < bound
                             for kind, (name, bound) in bounds.items()}
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_synthetic_cache(path: Path, options: BigCacheOptions) -> None:
    """Class means plus noise, so heads have something to learn; keys and index entries as extract writes."""
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (options.classes, options.dim)).astype(np.float32)
    with CacheWriter(path, FINGERPRINT, options.dim, dtype="float16") as cache:
        for start in range(0, options.rows, options.write_chunk):
            n = min(options.write_chunk, options.rows - start)
            labels = np.arange(start, start + n) % options.classes
            features = means[labels] + 2.0 * rng.standard_normal((n, options.dim), dtype=np.float32)
            keys = [f"{i:064x}" for i in range(start, start + n)]
            files = [(f"class{label}/{i}.jpg", FileRecord(1, 1, key, 1)) for i, label, key in zip(
                range(start, start + n), labels, keys)]
            cache.commit(keys, features, files)


def train_head(cache_file: str, kind: str, iterations: int, classes: int) -> dict:
    """In the child: FeatureRows for a hash split of the rows, as train builds them; fit; time; peak RSS."""
    from .config import DenseConfig, HeadConfig, LogRegConfig
    from .features import FeatureRows
    from .heads import make_head

    with FeatureCache(cache_file, FINGERPRINT) as cache:
        n = len(cache.row_index())
        rows = np.arange(n)
        labels = rows % classes
        is_val = (rows * 2654435761 % 1000) < 100  # a fixed pseudo-random 10%
        train = FeatureRows.of(cache, rows[~is_val], labels[~is_val])
        val = FeatureRows.of(cache, rows[is_val], labels[is_val])
    config = HeadConfig(kind=kind, dense=DenseConfig(epochs=iterations, batch_size=512, patience=iterations),
                        logreg=LogRegConfig(c_values=[1.0], max_iter=iterations))
    started = time.perf_counter()
    head = make_head(config).fit(train, train.labels, val, val.labels, n_classes=classes)
    seconds = time.perf_counter() - started
    correct = sum(int(np.sum(head.predict_proba(X).argmax(1) == y)) for X, y in val.chunks())
    return {"train_s": seconds, "val_accuracy": correct / len(val), "peak_rss_gib": _peak_rss() / GIB,
            "train_rows": len(train)}


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _child(path: Path, kind: str, iterations: int, options: BigCacheOptions) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), kind, str(iterations), str(options.classes)],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BIG-CACHE-CHILD ")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1].split(" ", 1)[1])


def format_big_cache(result: dict) -> str:
    lines = [f"big cache: {result['rows']:,} x {result['dim']} {result['dtype']} rows in {result['classes']} classes, "
             f"{result['file_gib']:.2f} GiB on disk (written in {result['write_s']:.0f} s); float32 training "
             f"matrix {result['train_matrix_float32_gib']:.2f} GiB"]
    for kind in ("dense", "logreg"):
        row = result[kind]
        if "error" in row:
            lines.append(f"  {kind}: failed: {row['error']}")
        else:
            lines.append(f"  {kind}: train {row['train_s']:.0f} s, peak RSS {row['peak_rss_gib']:.2f} GiB, "
                         f"val accuracy {row['val_accuracy']:.3f}")
    lines += [f"  target {name}: {'met' if met else 'MISSED'}" for name, met in result.get("targets", {}).items()]
    return "\n".join(lines)

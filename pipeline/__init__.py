"""Transfer learning on cached bottleneck features: extract once, train heads in seconds.

The same stages as the command line, from Python (see README, "From Python"):

    from pipeline import load_config, extract, load_features, LogisticRegressionHead, train, predict
    config = load_config("configs/flowers5.toml", ["backbone.name=mobilenet", "backbone.alpha=0.25"])
    extract(config, progress=False)           # the cache: every new image once through the backbone
    data = load_features(config)              # per split: X, y, samples; data.labels
    head = LogisticRegressionHead().fit(data["train"].X, data["train"].y)   # a scikit-learn estimator

Every stage returns objects; only `extract` (the cache), `.save()` of a train result, and
`export` write files. Warnings go through `logging` (logger "pipeline"); nothing is printed.
Names are imported on first use, so `import pipeline` stays light (no TensorFlow, no scikit-learn).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "config", "Config": "config",
    "ExtractSummary": "extract",
    "load_features": "features", "Features": "features", "Split": "features",
    "Head": "heads", "make_head": "heads", "HEADS": "heads:REGISTRY",
    "LogisticRegressionHead": "heads.logreg", "DenseHead": "heads.dense",
    "TrainResult": "train", "PredictResult": "predict",
    "Run": "runs",
    "BACKBONES": "backbones:REGISTRY", "BackboneSpec": "backbones",
}
# stage modules, each callable as its in-memory core (see stages.py): extract(config) runs
# extract.run_extract, train(config) train.train, report(run) evaluate.report,
# predict(run, images) predict.predict, export(run) export.run_export
_STAGES = ("extract", "train", "report", "predict", "export")
__all__ = sorted([*_EXPORTS, *_STAGES])


def __getattr__(name: str):
    if name in _STAGES:
        return importlib.import_module(f"pipeline.{name}")  # binds it here too, as any submodule
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(f"pipeline.{module}"), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

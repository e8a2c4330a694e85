"""Does the default logistic-regression head beat the tutorials' plain logistic regression on
data it was never tuned on? Measured over many splits, since one split is too noisy to tell.

The features (clean, mirrored, and N augmented views) are extracted once, with the project's
own extract, into the config's cache. Then, for each of S seeds, a fifth of the training
images (by a hash of the seed and the content hash, as `data.val_percent` carves) becomes the
validation split; every head is fitted on the rest and scored on the dataset's own val (or
test) folder, which none of them ever sees. "Plain" is scikit-learn's LogisticRegression()
with its defaults (C = 1, no standardisation) on the clean rows. The table gives each head's
mean accuracy and its mean paired difference from plain over the splits, with the standard
error of that mean. Run:

    python -m pipeline.head_bench --config configs/flowers5.toml --splits 20 \\
        --set backbone.name=mobilenet --set backbone.alpha=0.25

Extra `--set head.logreg.KEY=VALUE` settings change the default head (for example its folds).
The backbone's weights are read as extract reads them (KERAS_HOME=<a copy of ../shared/keras>
works offline).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from collections import Counter

import numpy as np
from sklearn.linear_model import LogisticRegression

from . import augment
from .config import Config, LogRegConfig, load_config
from .extract import run_extract
from .features import TrainingViews, dataset_from_config, match_cached, open_cache
from .heads.logreg import LogisticRegressionHead

VAL_PERCENT = 20.0
# the head before cross-validation: 15 settings scored on the validation split
PREVIOUS = {"c_values": [0.001, 0.01, 0.1, 1.0, 10.0], "selection": "validation"}


def read_features(config: Config) -> dict:
    """Every labelled image's clean row, mirror (view 0) and views 1..N (augment.views), label and
    layout split; extracts what the cache lacks first."""
    views = config.augment.views
    summary = run_extract(config, progress=False)
    print(f"extract: {summary.extracted} image(s) and {summary.views_extracted} view(s) extracted "
          f"({summary.seconds:.0f} s), the rest cached", flush=True)
    with open_cache(config) as cache:
        dataset = dataset_from_config(config)
        cached = match_cached(dataset, cache)
        entries = [entry for entry in dataset.entries if entry.relpath in cached.keys and entry.label is not None]
        keys = [cached.keys[entry.relpath] for entry in entries]
        rows = cache.row_index()
        clean = cache.read_features([rows[key] for key in keys])
        recipe = augment.RECIPE.fingerprint_id()
        index = cache.view_index(recipe)
        viewed = np.stack([cache.read_view_features(recipe, [index[(key, view)] for key in keys])
                           for view in range(views + 1)], axis=1)
    labels = sorted({entry.label for entry in entries})
    return {"X": clean, "views": viewed, "keys": keys, "y": np.array([labels.index(e.label) for e in entries]),
            "split": np.array([entry.split or "train" for entry in entries])}


def carved(keys: list[str], seed: int) -> np.ndarray:
    """True for the keys this seed puts in the validation split (VAL_PERCENT of them, by hash)."""
    return np.array([int(hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()[:12], 16) % 10_000 / 100 < VAL_PERCENT
                     for key in keys])


def run(data: dict, splits: int, head_config: LogRegConfig) -> dict[str, dict]:
    """Per head: accuracies on the held-out folder over the splits, and the settings chosen."""
    X, V, y = data["X"], data["views"], data["y"]
    test = data["split"] == ("test" if "test" in data["split"] else "val")
    train_rows = np.flatnonzero(data["split"] == "train")
    n_classes = int(y.max()) + 1
    X_test, y_test, X_test_flip = X[test], y[test], (X[test] + V[test, 0]) / 2
    default = dataclasses.asdict(head_config)
    heads = {
        "plain (C = 1, raw features)": None,
        "previous default (15 settings on validation)": ({**default, **PREVIOUS}, (), False),
        "default head": (default, (), False),
        "default + flip TTA": (default, (), True),
        f"default + {V.shape[1] - 1} views": (default, tuple(range(1, V.shape[1])), False),
        f"default + {V.shape[1] - 1} views and mirror, flip TTA": (default, tuple(range(V.shape[1])), True),
    }
    results = {name: {"accuracy": [], "chosen": []} for name in heads}
    for seed in range(splits):
        started = time.perf_counter()
        val = carved([data["keys"][row] for row in train_rows], seed)
        fit_rows, val_rows = train_rows[~val], train_rows[val]
        for name, spec in heads.items():
            if spec is None:
                predicted = LogisticRegression().fit(X[fit_rows], y[fit_rows]).predict(X_test)
                results[name]["accuracy"].append(float(np.mean(predicted == y_test)))
                continue
            settings, view_indices, flip = spec
            views = None
            if view_indices:
                features = V[fit_rows][:, list(view_indices)]
                views = TrainingViews(features.reshape(-1, X.shape[1]), np.repeat(y[fit_rows], len(view_indices)),
                                      np.repeat(np.arange(len(fit_rows)), len(view_indices)))
            head = LogisticRegressionHead(**settings).fit(X[fit_rows], y[fit_rows], X[val_rows], y[val_rows],
                                                          n_classes=n_classes, views=views,
                                                          groups=[data["keys"][row] for row in fit_rows])
            predicted = head.predict_proba(X_test_flip if flip else X_test).argmax(1)
            results[name]["accuracy"].append(float(np.mean(predicted == y_test)))
            results[name]["chosen"].append(f"{head.normalization_} C {head.C_:g}"
                                           + (f" w {head.view_weight_:g}" if view_indices else ""))
        print(f"split {seed + 1}/{splits}: {time.perf_counter() - started:.1f} s", flush=True)
    return results


def table(results: dict[str, dict], scored: int) -> str:
    plain = np.array(next(iter(results.values()))["accuracy"])
    lines = [f"| head | accuracy | vs plain (points, mean ± s.e. over {len(plain)} splits) | worst, best split "
             "| splits worse, better | chosen most often |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        accuracy = np.array(result["accuracy"])
        diff = (accuracy - plain) * 100
        error = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        chosen = ", ".join(f"{setting} ({count})" for setting, count in Counter(result["chosen"]).most_common(3))
        if result["chosen"]:
            normalizations = Counter(setting.split()[0] for setting in result["chosen"])
            chosen += "; " + ", ".join(f"{name} {count}" for name, count in normalizations.most_common())
        lines.append(f"| {name} | {accuracy.mean():.3f} | {diff.mean():+.2f} ± {error:.2f} | "
                     f"{diff.min():+.1f}, {diff.max():+.1f} | {np.sum(diff < 0)}, {np.sum(diff > 0)} | "
                     f"{chosen or '-'} |")
    return "\n".join(lines) + f"\n\nscored on {scored} held-out images (one image = {100 / scored:.2f} points)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.head_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args(argv)
    config = load_config(args.config, [*args.overrides, f"augment.views={args.views}", 'head.tta="flip"'])
    data = read_features(config)
    results = run(data, args.splits, config.head.logreg)
    scored = int(np.sum(data["split"] == ("test" if "test" in data["split"] else "val")))
    print(f"\n{config.dataset_name}, {config.backbone.name} (alpha {config.backbone.alpha:g})\n")
    print(table(results, scored))


if __name__ == "__main__":
    main()

"""The report stage: score a trained run's held-out images from the cache and report.

It uses the run's own sample list and fingerprint, so the report describes exactly the
model that was trained, even if the dataset folder changed since.
"""

from __future__ import annotations

from pathlib import Path

from .cache import FeatureCache
from .errors import CacheError
from .heads import load_head
from .report import write_report
from .runs import load_run


def run_report(run_dir: Path) -> tuple[Path, dict]:
    run = load_run(run_dir)
    has_test = any(s["split"] == "test" and s["label"] is not None for s in run.samples)
    split = "test" if has_test else "val"
    chosen = [s for s in run.samples if s["split"] == split or s["label"] is None]
    with FeatureCache(run.info["cache"], run.info["fingerprint"]) as cache:
        rows = cache.row_index()
        gone = [s["image"] for s in chosen if s["key"] not in rows]
        if gone:
            raise CacheError(f"{len(gone)} image(s) of run {run.dir} are no longer in {cache.path} (e.g. {gone[0]}; "
                             "was it rebuilt?); fix: run `make extract` then `make train` again")
        features = cache.read_features([rows[s["key"]] for s in chosen])
    probabilities = load_head(run.info["head"], run.dir).predict_proba(features)
    out_dir = run.dir / "report"
    context = {key: run.info[key] for key in ("dataset", "head", "params", "split_sizes", "fingerprint")}
    metrics = write_report(out_dir, labels=run.labels, images=[s["image"] for s in chosen],
                           true_labels=[s["label"] for s in chosen], probabilities=probabilities,
                           split=split, context=context)
    return out_dir, metrics

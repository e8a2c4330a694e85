"""The report stage: score a trained run's held-out images from the cache and report.

It uses the run's own sample list and fingerprint, so the report describes exactly the
model that was trained, even if the dataset folder changed since. The dataset folder is
only read for the HTML report's thumbnails (and by runs whose whole model takes pixels,
the from-scratch CNN and fine-tuned backbones, which have no cached features).
"""

from __future__ import annotations

import time
from pathlib import Path

from .cache import FeatureCache
from .config import Config
from .data_issues import inspect_run
from .dataset import Dataset
from .errors import CacheError, PipelineError
from .features import dataset_from_config, scoring_features
from .heads import load_head
from .html_report import conflict_groups, write_html_report
from .pixel_models import predict_samples, whole_model
from .report import compute_metrics, write_report
from .runs import Run, Sample, load_run


def held_out(run: Run) -> tuple[str, list[Sample]]:
    """The split a run is reported on (test, else val) and its samples, unlabeled images included."""
    has_test = any(s.split == "test" and s.label is not None for s in run.samples)
    split = "test" if has_test else "val"
    return split, [s for s in run.samples if s.split == split or s.label is None]


def report(run: Run | Path | str) -> dict:
    """A run's metrics on its held-out split, in memory (no file written): what `make report`
    puts in metrics.json, without the data inspection and the timings."""
    run = load_run(run)
    split, chosen = held_out(run)
    if whole_model(run.info):
        dataset = _dataset(run.config)
        probabilities = predict_samples(run, chosen, dataset.root if dataset else None)
    else:
        probabilities = _score_cached(run, chosen)[0]
    metrics = compute_metrics(run.labels, [s.label for s in chosen], probabilities)
    return {**metrics, "split": split}


def run_report(run_dir: Path) -> tuple[Path, dict]:
    """The report stage: score the held-out split and write metrics.json, predictions.jsonl, the
    confusion matrix and report.html into `<run>/report/`."""
    started = time.perf_counter()
    run = load_run(run_dir)
    split, chosen = held_out(run)
    dataset = _dataset(run.config)
    image_root = dataset.root if dataset else None
    issues = None  # data inspection needs cached features: head runs only
    if whole_model(run.info):  # from scratch or fine-tuned: its features are in no cache
        probabilities = predict_samples(run, chosen, image_root)
        timings = {key: getattr(run.info, f"{key}_seconds") for key in ("extract", "train", "finetune")}
        timings = {key: value for key, value in timings.items() if value is not None}
        conflicts = run.info.label_conflict_files or []
    else:
        probabilities, extract_timing, file_keys = _score_cached(run, chosen)
        timings = {"extract": (extract_timing or {}).get("seconds"), "train": run.info.train_seconds}
        conflicts = conflict_groups(dataset.entries, file_keys) if dataset else []
        issues = inspect_run(run, split)
    timings["report"] = time.perf_counter() - started
    out_dir = run.dir / "report"
    context = {key: getattr(run.info, key) for key in ("dataset", "head", "params", "split_sizes", "fingerprint")}
    context["seconds"] = timings
    if issues is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        context["data_issues"] = {"summary": issues.summary(), "file": str(issues.write(out_dir))}
    images, true_labels = [s.image for s in chosen], [s.label for s in chosen]
    metrics = write_report(out_dir, labels=run.labels, images=images, true_labels=true_labels,
                           probabilities=probabilities, split=split, context=context)
    write_html_report(out_dir / "report.html", run=run, metrics=metrics, images=images, true_labels=true_labels,
                      probabilities=probabilities, image_root=image_root, timings=timings, conflicts=conflicts,
                      data_issues=issues)
    return out_dir, metrics


def _score_cached(run: Run, chosen: list[Sample]):
    """The head's probabilities on the chosen images' cached features, what extracting them cost, and
    every cached file's content hash (to find images filed under two labels)."""
    with FeatureCache(run.info.cache, run.info.fingerprint) as cache:
        rows = cache.row_index()
        gone = [s.image for s in chosen if s.key not in rows]
        if gone:
            raise CacheError(f"{len(gone)} image(s) of run {run.dir} are no longer in {cache.path} (e.g. {gone[0]}; "
                             "was it rebuilt?); fix: run `make extract` then `make train` again")
        features = scoring_features(cache, [s.key for s in chosen], run.config.head.tta)
        extract_timing = cache.extract_timing()
        file_keys = {path: record.key for path, record in cache.file_index().items()}
    return load_head(run.info.head, run.dir).predict_proba(features), extract_timing, file_keys


def _dataset(config: Config) -> Dataset | None:
    """The run's dataset as it is now, for thumbnails; None if it is gone (the report goes on without)."""
    try:
        return dataset_from_config(config)
    except PipelineError:
        return None

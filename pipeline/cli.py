"""`python -m pipeline <stage>`: a thin layer over the stages, which hold all the logic.

A user's mistake (a PipelineError) prints one line and exits 2; a bug keeps its traceback.
Exit status: 0 completed (images that could not be used are listed, and the last line says
how many were skipped, so `make extract train report` goes on past a few bad photos);
2 failed; 3 only with `extract --strict`, when anything was skipped or warned about;
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import load_config
from .errors import PipelineError

EXIT_SKIPPED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set head.kind=dense (repeatable)")
    stages = parser.add_subparsers(dest="stage", required=True)
    extract = stages.add_parser("extract", parents=[common], help="run new images through the backbone into the cache")
    extract.add_argument("--rebuild", action="store_true", help="delete this cache file and extract everything again")
    extract.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    extract.add_argument("--engine", choices=["local", "dask"], help="local (default) or dask: shards on a Dask "
                         "cluster (sets extract.engine)")
    extract.add_argument("--address", metavar="tcp://HOST:PORT", help="the Dask scheduler to use (sets "
                         "extract.address; default: a local cluster, one worker per core)")
    extract.add_argument("--strict", action="store_true", help=f"exit with status {EXIT_SKIPPED} when any image was "
                         "skipped or any warning given (default: 0, with the skipped images listed)")
    stages.add_parser("train", parents=[common], help="train a head on the cached features")
    report = stages.add_parser("report", parents=[common], help="evaluate a trained run and write its report")
    report.add_argument("--run", type=Path, help="run directory (default: the newest run of this config)")
    stages.add_parser("compare", parents=[common], help="one table over this dataset's runs (terminal and HTML)")
    sweep = stages.add_parser("sweep", parents=[common], help="train and report several heads on one cache, "
                              "then compare")
    sweep.add_argument("--vary", action="append", default=[], metavar="KEY=[V1, V2]",
                       help="a head.* key and a TOML array of values to try, e.g. --vary 'head.dense.dropout=[0.2, "
                            "0.5]' (repeatable: every combination is trained; default: a built-in grid)")
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    baseline = stages.add_parser("baseline", parents=[common], help="train a small CNN from scratch on the raw "
                                 "images (no transfer), report it and add it to the comparison")
    baseline.add_argument("--epochs", type=int, help="at most this many epochs (default 100; early stopping on "
                          "validation loss usually ends sooner)")
    baseline.add_argument("--patience", type=int, help="epochs without a better validation loss before stopping "
                          "(default 10)")
    baseline.add_argument("--image-size", type=int, help="pixels per side the images are resized to (default 96)")
    baseline.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    finetune = stages.add_parser("finetune", parents=[common], help="train the top of the backbone with a trained "
                                 "head (slow; see the estimate it prints), report it and add it to the comparison")
    finetune.add_argument("--run", type=Path, help="the head run to start from (default: the newest head run of "
                          "this config)")
    finetune.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    bench = stages.add_parser("bench", parents=[common], help="measure extraction speed (naive, ceiling, pipeline), "
                              "memory and bf16 agreement; see README")
    bench.add_argument("--images", type=Path, help="folder of photos to extract (default: ../shared/datasets/flowers5)")
    bench.add_argument("--out", type=Path, default=Path("runs/bench.json"), help="JSON results (default: %(default)s)")
    bench.add_argument("--small-images", type=int, default=6000, metavar="N",
                       help="generated ~300x200 JPEGs raced against the tutorials' script (default: %(default)s)")
    bench.add_argument("--memory-sizes", nargs=2, type=int, default=[500, 5000], metavar="N",
                       help="the two image counts of the peak-memory check (default: 500 5000)")
    bench.add_argument("--big-cache", action="store_true", help="instead: train both heads on a synthetic cache of "
                       "1,000,000 x 1,280 float16 rows (2.5 GB in a temporary folder) and report time and peak memory")
    predict = stages.add_parser("predict", parents=[common], help="score new images with a trained run: JSON lines "
                                "and a top-k table")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern (repeatable)")
    predict.add_argument("--run", type=Path, help="run directory (default: the newest run of this config)")
    predict.add_argument("--top", type=int, default=3, help="labels per image in the table (default: %(default)s)")
    predict.add_argument("--threshold", type=float, help="below this top probability the class is 'unknown'; pick "
                         "it from threshold_curve in the run's report/metrics.json")
    predict.add_argument("--unfamiliar", action="store_true", help="images unlike the training images (novelty above "
                         "the threshold the report calibrated on validation images) get class 'unknown'")
    predict.add_argument("--out", type=Path, help="JSON lines file (default: <run>/predictions/<time>.jsonl)")
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    export = stages.add_parser("export", parents=[common], help="write one self-contained model (.keras, SavedModel, "
                               "TFLite) and check it against the report")
    export.add_argument("--run", type=Path, help="run directory (default: the newest run of this config)")
    export.add_argument("--out", type=Path, help="output folder (default: <run>/export)")
    export.add_argument("--no-tflite", action="store_true", help="skip the TFLite file")
    classify = stages.add_parser("classify", parents=[common], help="the backbone's own ImageNet top-k for images")
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image file(s)")
    classify.add_argument("--top", type=int, default=5, help="classes per image (default: %(default)s)")
    classify.add_argument("--imagenet-labels", type=Path, metavar="DIR", help="folder holding the ImageNet label maps "
                          "(default: Keras' class index if downloaded, else ../shared/imagenet, else ./imagenet)")
    return parser


class _StderrLines(logging.Handler):
    """The library's warnings, one message each on stderr, written around any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)  # sys.stderr as it is now, not at install time
        except Exception:  # as logging.StreamHandler does: a failed write never stops the stage
            self.handleError(record)


def install_log_handler() -> None:
    """The one handler that shows the `pipeline` loggers' warnings to a command-line user; a
    notebook, which never calls this, silences or captures them with logging as it likes."""
    logger = logging.getLogger("pipeline")
    if not any(isinstance(handler, _StderrLines) for handler in logger.handlers):
        handler = _StderrLines(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    install_log_handler()
    # TensorFlow's C++ INFO and WARNING lines (XLA start-up, CPU features) would break the progress
    # bar; errors still show, and a value the user set wins
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        overrides = list(args.overrides)
        for key, value in (("engine", getattr(args, "engine", None)), ("address", getattr(args, "address", None))):
            if value is not None:
                overrides.append(f"extract.{key}={json.dumps(value)}")
        config = load_config(args.config, overrides)
        if args.stage == "extract":
            from .extract import run_extract

            summary = run_extract(config, rebuild=args.rebuild, progress=not args.no_progress)
            _print_result(summary)
            if summary.failed_shards:
                return 2
            if args.strict and (summary.failed or summary.warnings):
                return EXIT_SKIPPED
        elif args.stage == "train":
            from .train import run_train

            _print_result(run_train(config))
        elif args.stage == "report":
            from .evaluate import run_report
            from .runs import latest_run

            _print_report(*run_report(args.run or latest_run(config)))
        elif args.stage == "baseline":
            from .baseline import BaselineSettings, run_baseline
            from .evaluate import run_report

            chosen = {"epochs": args.epochs, "patience": args.patience, "image_size": args.image_size}
            settings = BaselineSettings(**{key: value for key, value in chosen.items() if value is not None})
            result = run_baseline(config, settings, progress=not args.no_progress)
            _print_result(result)
            _print_report(*run_report(result.run_dir))
        elif args.stage == "finetune":
            from tqdm import tqdm

            from .evaluate import run_report
            from .finetune import run_finetune

            result = run_finetune(config, args.run, progress=not args.no_progress,
                                  announce=lambda line: tqdm.write(line, file=sys.stderr))
            _print_result(result)
            _print_report(*run_report(result.run_dir))
        elif args.stage in ("sweep", "compare"):
            from .compare import format_ladder, format_table, run_compare, run_sweep

            if args.stage == "sweep":
                run_sweep(args.config, args.overrides, args.vary, progress=not args.no_progress)
            rows, html_path = run_compare(config)
            print(format_table(rows))
            print()
            print(format_ladder(rows))
            print(f"compare: {html_path}")
        elif args.stage == "bench" and args.big_cache:
            from .big_cache_bench import format_big_cache, run_big_cache_bench

            result = run_big_cache_bench()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            out = args.out.with_name("bench_big_cache.json")
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(format_big_cache(result))
            print(f"bench: {out}")
        elif args.stage == "bench":
            from .bench import BenchOptions, format_table, run_bench, write_json

            options = BenchOptions(images=args.images or BenchOptions.images, memory_sizes=tuple(args.memory_sizes),
                                   small_images=args.small_images)
            result = run_bench(config, options)
            write_json(result, args.out)
            print(format_table(result))
            print(f"bench: {args.out}")
        elif args.stage == "predict":
            from .predict import run_predict
            from .runs import latest_run

            result = run_predict(args.run or latest_run(config), args.inputs, threshold=args.threshold,
                                 out_path=args.out, progress=not args.no_progress, unfamiliar=args.unfamiliar)
            print(result.describe(top=args.top))
        elif args.stage == "export":
            from .export import run_export
            from .runs import latest_run

            print(run_export(args.run or latest_run(config), args.out, tflite=not args.no_tflite).describe())
        elif args.stage == "classify":
            from .classify import format_classifications, run_classify

            print(format_classifications(*run_classify(config, args.images, top=args.top,
                                                       label_dir=args.imagenet_labels)))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed batches are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _print_result(result) -> None:
    """The stage's summary on stdout, its warnings (one line each) on stderr."""
    print(result.describe())
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _print_report(out_dir: Path, metrics: dict) -> None:
    from .report import format_summary

    print(format_summary(metrics))
    print(f"report: {out_dir / 'report.html'} (and metrics.json, predictions.jsonl beside it)")

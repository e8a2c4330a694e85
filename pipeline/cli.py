"""`python -m pipeline <stage>`: a thin layer over the stages, which hold all the logic.

A user's mistake (a PipelineError) prints one line and exits 2; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import load_config
from .errors import PipelineError


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
    stages.add_parser("train", parents=[common], help="train a head on the cached features")
    report = stages.add_parser("report", parents=[common], help="evaluate a trained run and write its report")
    report.add_argument("--run", type=Path, help="run directory (default: the newest run of this config)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.stage == "extract":
            from .extract import run_extract

            print(run_extract(config, rebuild=args.rebuild, progress=not args.no_progress).describe())
        elif args.stage == "train":
            from .train import run_train

            print(run_train(config).describe())
        elif args.stage == "report":
            from .evaluate import run_report
            from .report import format_summary
            from .runs import latest_run

            out_dir, metrics = run_report(args.run or latest_run(config))
            print(format_summary(metrics))
            print(f"report: {out_dir}")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed batches are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0

"""Run directories: everything one training run produced, as plain files.

    runs/<dataset>/<time>-<backbone>-<head>/
        run.json         head kind, chosen hyperparameters, fingerprint, cache file, counts, timings
        config.toml      the fully resolved config (rerun it with --config)
        labels.json      class names in the order of the head's outputs
        samples.jsonl    every image used: path, content hash, label, split
        history.json     the head's training history (C values tried, or epochs)
        head.h5 | head.keras   the head's weights as plain data
        report/          written by the report stage
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config, to_toml
from .errors import PipelineError


@dataclass(frozen=True)
class Sample:
    """One image a run used, as samples.jsonl stores it."""
    image: str  # path relative to the dataset root
    key: str  # SHA-256 of the file's bytes: its row in the cache, and what decided its split
    label: str | None  # its class; None for an unlabeled image (scored, never counted)
    split: str  # "train", "val" or "test"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "Sample":
        return cls(record["image"], record["key"], record["label"], record["split"])


@dataclass
class Run:
    """A trained run, opened from its directory: `Run.open("runs/flowers5/<run>")`."""
    dir: Path
    config: Config  # the resolved config it was trained with
    labels: list[str]  # class names, in the order of the head's outputs
    samples: list[Sample]  # every image used
    info: dict  # run.json: head kind, chosen parameters, fingerprint, cache file, counts, timings

    @classmethod
    def open(cls, directory: str | Path) -> "Run":
        return load_run(Path(directory))

    @functools.cached_property
    def head(self):
        """The trained model as a `heads.Head` (features in; pixels in for whole-model kinds)."""
        from .heads import load_head

        return load_head(self.info["head"], self.dir)

    @property
    def metrics(self) -> dict | None:
        """What the report stage measured (report/metrics.json); None before `make report`."""
        path = self.dir / "report" / "metrics.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @property
    def backbone(self):
        """The backbones.BackboneSpec whose features it was trained on; None for a model without one."""
        from . import backbones

        name = (self.info.get("fingerprint") or {}).get("backbone")
        return backbones.get_spec(name) if name else None


def new_run_dir(config: Config, model: str = "") -> Path:
    """A new `<time>-<model>` folder; `model` defaults to `<backbone>-<head>`."""
    base = Path(config.run.dir) / config.dataset_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{model or f'{config.backbone.name}-{config.head.kind}'}"
    candidate, n = base / name, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{name}-{n}"
    candidate.mkdir(parents=True)
    return candidate


def save_run(directory: Path, config: Config, labels: list[str], samples: list[Sample], info: dict,
             history: list[dict]) -> None:
    (directory / "config.toml").write_text(to_toml(config), encoding="utf-8")
    (directory / "labels.json").write_text(json.dumps(labels, indent=1), encoding="utf-8")
    (directory / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    with open(directory / "samples.jsonl", "w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(sample.to_json()) + "\n")
    (directory / "run.json").write_text(json.dumps(info, indent=1), encoding="utf-8")  # last: marks it complete


def run_dirs(config: Config) -> list[Path]:
    """The config's dataset's complete runs, oldest first (their names start with the time)."""
    base = Path(config.run.dir) / config.dataset_name
    return sorted(p.parent for p in base.glob("*/run.json")) if base.is_dir() else []


def latest_run(config: Config) -> Path:
    base = Path(config.run.dir) / config.dataset_name
    runs = run_dirs(config)
    if not runs:
        raise PipelineError(f"no trained run under {base}; fix: run `make train` with the same config first")
    return runs[-1]


def load_run(directory: Path | Run) -> Run:
    """The run in `directory` (a Run is taken as it is, so every stage accepts either)."""
    if isinstance(directory, Run):
        return directory
    directory = Path(directory)
    if not (directory / "run.json").is_file():
        raise PipelineError(f"{directory} is not a complete run directory (no run.json); fix: pass a folder "
                            "written by `make train`")
    samples = [Sample.from_json(json.loads(line))
               for line in (directory / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    return Run(directory, load_config(directory / "config.toml"),
               json.loads((directory / "labels.json").read_text(encoding="utf-8")), samples,
               json.loads((directory / "run.json").read_text(encoding="utf-8")))

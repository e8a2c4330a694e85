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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

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
class RunInfo:
    """run.json: what a run holds and how it came about. A field a kind of run does not have stays
    None (and out of the file); anything else its stage records is kept in `extra`."""
    head: str  # its kind: a record of heads.REGISTRY
    params: dict = field(default_factory=dict)  # the hyperparameters chosen (or set)
    val_accuracy: float | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    dataset: str = ""
    fingerprint: dict | None = None  # of the frozen backbone's features; None for a model without a backbone
    cache: str | None = None  # the cache file its features are in; None for a whole model (pixels in)
    created: str = ""
    failed_images: int = 0
    label_conflicts: list[str] = field(default_factory=list)
    label_conflict_files: list | None = None
    train_seconds: float | None = None
    extract_seconds: float | None = None
    finetune_seconds: float | None = None
    features: dict | None = None  # a head run's feature settings: pool_blocks, views, tta
    model: dict | None = None  # a whole model's {"file", "input_size"}
    finetuned_from: dict | None = None  # the head run a fine-tuned run started from
    frozen_val_accuracy: float | None = None  # a fine-tuned run's starting head, kept beside its own score
    better_than_frozen: bool | None = None
    kept_by: str | None = None  # how the kept epoch of a trained network was chosen
    from_scratch: bool | None = None  # True for the baseline CNN, which never saw ImageNet features
    extra: dict = field(default_factory=dict)  # keys this version does not know (a newer run.json), kept as read

    _WRITTEN_WHEN_NONE: ClassVar[tuple[str, ...]] = ("val_accuracy", "fingerprint", "cache")

    def to_json(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{key: value for key, value in record.items() if value is not None or key in self._WRITTEN_WHEN_NONE},
                **self.extra}

    @classmethod
    def from_json(cls, record: dict) -> "RunInfo":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{key: value for key, value in record.items() if key in known},
                   extra={key: value for key, value in record.items() if key not in known})


@dataclass
class Run:
    """A trained run, opened from its directory: `Run.open("runs/flowers5/<run>")`."""
    dir: Path
    config: Config  # the resolved config it was trained with
    labels: list[str]  # class names, in the order of the head's outputs
    samples: list[Sample]  # every image used
    info: RunInfo  # run.json: head kind, chosen parameters, fingerprint, cache file, counts, timings

    @classmethod
    def open(cls, directory: str | Path) -> "Run":
        return load_run(Path(directory))

    @functools.cached_property
    def head(self):
        """The trained model as a `heads.Head` (features in; pixels in for whole-model kinds)."""
        from .heads import load_head

        return load_head(self.info.head, self.dir)

    @property
    def metrics(self) -> dict | None:
        """What the report stage measured (report/metrics.json); None before `make report`."""
        path = self.dir / "report" / "metrics.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @property
    def backbone(self):
        """The backbones.BackboneSpec whose features it was trained on; None for a model without one."""
        from . import backbones

        name = (self.info.fingerprint or {}).get("backbone")
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


def save_run(directory: Path, config: Config, labels: list[str], samples: list[Sample], info: RunInfo,
             history: list[dict]) -> None:
    (directory / "config.toml").write_text(to_toml(config), encoding="utf-8")
    (directory / "labels.json").write_text(json.dumps(labels, indent=1), encoding="utf-8")
    (directory / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    with open(directory / "samples.jsonl", "w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(sample.to_json()) + "\n")
    (directory / "run.json").write_text(json.dumps(info.to_json(), indent=1), encoding="utf-8")  # last: marks it complete


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
               read_info(directory))


def read_info(directory: Path) -> RunInfo:
    """A run directory's run.json."""
    return RunInfo.from_json(json.loads((Path(directory) / "run.json").read_text(encoding="utf-8")))

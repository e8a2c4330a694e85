"""One typed configuration for every stage: TOML files plus `--set key=value` overrides.

Every key has a default here, so a config file only states what differs. Unknown keys
and values of the wrong type are refused with the key's name, never ignored: a typo in
`head.kind` must not silently train the default head. Every table is a `Section`, which
checks its values whenever it is made (from TOML, `--set` or Python): types, choices, and
the range each numeric key declares, in one line, `setting(default, at_least=..., below=...)`.
A new key gets its rule there, and nowhere else. Relative paths are taken from the
current directory, which is the repository root when run through `make`.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import tomli_w

from .errors import ConfigError


class Section:
    """A table of the config. Every instance is checked when it is built, from TOML, `--set`
    or Python alike: each value's type, its choices (a `Literal`), and the range its field
    declares with `setting(...)`; then `check_together` for rules across keys.
    `key` names the table in messages: `class DenseConfig(Section, key="head.dense")`."""

    key: ClassVar[str] = ""

    def __init_subclass__(cls, key: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.key = key

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            name = f"{self.key}.{f.name}" if self.key else f.name
            value = getattr(self, f.name)
            kind = hints[f.name]
            if isinstance(kind, type) and issubclass(kind, Section):
                if not isinstance(value, kind):
                    raise ConfigError(f"{name}: expected a table of keys, got {value!r}")
                continue
            value = _check(name, kind, value)
            if isinstance(value, list) and not value:
                raise ConfigError(f"{name} is empty; fix: give it at least one value (see configs/example.toml)")
            names = f.metadata.get("names")
            if names is not None and value not in names():
                raise ConfigError(f"{name} = {value!r} is not allowed; fix: use one of {', '.join(map(repr, names()))}")
            rule = f.metadata.get("range")
            if rule is not None:
                for i, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                    rule.check(f"{name}[{i}]" if isinstance(value, (list, tuple)) else name, item)
            object.__setattr__(self, f.name, value)
        self.check_together()

    def check_together(self) -> None:
        """Rules that span several keys of this table; raise ConfigError naming them."""


@dataclass(frozen=True)
class Range:
    """The values a number may take: `at_least`/`at_most` include the bound, `above`/`below` exclude it."""
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def check(self, key: str, value: float) -> None:
        broken = ((self.at_least is not None and value < self.at_least and f"below {_number(self.at_least)}")
                  or (self.above is not None and value <= self.above and f"{_number(self.above)} or less")
                  or (self.at_most is not None and value > self.at_most and f"above {_number(self.at_most)}")
                  or (self.below is not None and value >= self.below and f"{_number(self.below)} or more"))
        if broken:
            raise ConfigError(f"{key} = {value!r} is {broken}; fix: set it to {self.describe()}")

    def describe(self) -> str:
        """The allowed values in words: "1 or more", "a value from 0 to 100", "at least 0 and less than 1"."""
        bounds = [self.at_least, self.above, self.at_most, self.below]
        if bounds == [self.at_least, None, None, None]:
            return f"{_number(self.at_least)} or more"
        if bounds == [self.at_least, None, self.at_most, None]:
            return f"a value from {_number(self.at_least)} to {_number(self.at_most)}"
        words = ("at least", "more than", "at most", "less than")
        return " and ".join(f"{word} {_number(bound)}" for word, bound in zip(words, bounds) if bound is not None)


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, at_least: float | None = None,
            above: float | None = None, at_most: float | None = None, below: float | None = None) -> Any:
    """A config field with the range its values must lie in (every item's, for a list):
    `dropout: float = setting(0.5, at_least=0, below=1)`."""
    rule = Range(at_least=at_least, above=above, at_most=at_most, below=below)
    return field(default=default, default_factory=factory, metadata={"range": rule})


def registered(default: str, names: Callable[[], Sequence[str]]) -> Any:
    """A config field naming a registry record (a backbone, a head kind): its choices are the
    registry's names when the value is checked, so a new record needs no edit here."""
    return field(default=default, metadata={"names": names})


def _backbone_names() -> list[str]:
    from .backbones import REGISTRY

    return list(REGISTRY)


def _head_kinds() -> list[str]:
    from .heads import trainable_kinds

    return trainable_kinds()


SEED = {"at_least": 0, "below": 2**32}  # what numpy and Keras accept as a seed


@dataclass(frozen=True)
class DataConfig(Section, key="data"):
    root: str = "cache/demo/digits"
    name: str = ""  # names cache files and runs; default: the root folder's name
    layout: Literal["auto", "class_folders", "split_folders", "map_file"] = "auto"
    map_file: str = ""  # one `path<TAB>label` map for all images, split by hash
    train_map: str = ""
    val_map: str = ""
    test_map: str = ""
    allow_outside_root: bool = False  # map files may name files outside their folder
    val_percent: float = setting(10.0, at_least=0, at_most=100)  # carved from train by content hash when the layout has no val
    test_percent: float = setting(10.0, at_least=0, at_most=100)  # carved by content hash only when the layout has no splits
    max_image_pixels: int = setting(178_956_970, at_least=1)  # decompression-bomb guard
    embedded: Literal["", "digits"] = ""  # write a bundled demo dataset into root if missing

    def check_together(self) -> None:
        if self.val_percent + self.test_percent >= 100:
            raise ConfigError(f"data.val_percent + data.test_percent = {self.val_percent + self.test_percent:g} leaves "
                              "nothing to train on; fix: make them add up to less than 100")


@dataclass(frozen=True)
class CacheConfig(Section, key="cache"):
    dir: str = "cache"
    dtype: Literal["float32", "float16"] = "float32"


@dataclass(frozen=True)
class BackboneConfig(Section, key="backbone"):
    name: str = registered("inception_v3", _backbone_names)  # a record of backbones.REGISTRY
    alpha: float = setting(1.0, above=0)  # width multiplier, MobileNets only
    weights: str = "imagenet"  # "imagenet", "random", or a path to a weights file
    seed: int = setting(0, **SEED)  # initialises "random" weights reproducibly
    precision: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = setting(32, at_least=1)
    # the last N blocks, each globally average-pooled and concatenated, last block first (its own cache file)
    pool_blocks: int = setting(1, at_least=1, at_most=2)
    compile: Literal["auto", "graph", "xla"] = "auto"  # TensorFlow's execution: measured per machine, or forced
    runtime: Literal["auto", "tensorflow", "openvino"] = "auto"  # which runtime runs it: measured, or forced
    allow_random_fallback: bool = False  # embedded demo only: random weights when offline


@dataclass(frozen=True)
class ExtractConfig(Section, key="extract"):
    workers: int = setting(0, at_least=0)  # image decoding threads; 0 picks one per core (a Dask worker's share)
    engine: Literal["local", "dask"] = "local"  # dask: shards of images on a Dask cluster (pip install '.[dask]')
    address: str = ""  # the Dask scheduler, e.g. tcp://host:8786; empty: a local cluster, one worker per core
    shard_size: int = setting(256, at_least=1)  # images per Dask task (and per shard file)
    dask_workers: int = setting(0, at_least=0)  # worker processes of a local Dask cluster; 0: one per core
    retries: int = setting(2, at_least=0)  # times a shard is run again after an error on its worker


@dataclass(frozen=True)
class AugmentConfig(Section, key="augment"):
    # augmented views cached per image (random crop, flip, colour jitter); train uses those of training images
    views: int = setting(0, at_least=0, at_most=64)


@dataclass(frozen=True)
class LogRegConfig(Section, key="head.logreg"):
    c_values: list[float] = setting(factory=lambda: [0.003, 0.01, 0.03, 0.1, 0.3, 1.0], above=0)
    max_iter: int = setting(1000, at_least=1)
    # tried with each C, and the best kept: none, l2 (unit length), sqrt (signed root, then l2)
    normalizations: list[Literal["none", "l2", "sqrt"]] = field(default_factory=lambda: ["none", "l2", "sqrt"])
    # the weight of each augmented view's row, tried with each C; 0 leaves views out
    view_weights: list[float] = setting(factory=lambda: [0.0, 0.3, 1.0], at_least=0, at_most=1)
    # how the setting is chosen: cv (k-fold cross-validation over the training images; the validation
    # split is then never tuned on), validation (scored on the validation split: fits its noise when
    # small), or auto: cv while the validation split has under 5,000 images, validation from there on
    selection: Literal["auto", "cv", "validation"] = "auto"
    folds: int = setting(5, at_least=2)  # cross-validation folds
    tol: float = setting(1e-4, above=0)  # L-BFGS stops when the largest gradient entry is below this


@dataclass(frozen=True)
class DenseConfig(Section, key="head.dense"):
    hidden_units: list[int] = setting(factory=lambda: [256], at_least=1)
    dropout: float = setting(0.5, at_least=0, below=1)
    learning_rate: float = setting(0.001, above=0)
    batch_size: int = setting(64, at_least=1)
    epochs: int = setting(200, at_least=1)
    patience: int = setting(10, at_least=0)  # early stopping on validation loss
    class_weight: Literal["balanced", "none"] = "balanced"
    seed: int = setting(0, **SEED)


@dataclass(frozen=True)
class HeadConfig(Section, key="head"):
    kind: str = registered("logreg", _head_kinds)  # a head of heads.REGISTRY trained on cached features
    tta: Literal["none", "flip"] = "none"  # flip: score the average of the clean and mirrored features
    logreg: LogRegConfig = field(default_factory=LogRegConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)


@dataclass(frozen=True)
class InspectConfig(Section, key="inspect"):
    duplicate_similarity: float = setting(0.8, above=0, at_most=1)  # cosine of centred features: near-duplicates
    unfamiliar_quantile: float = setting(0.95, at_least=0.5, below=1)  # novelty threshold: this quantile of val scores
    folds: int = setting(5, at_least=2)  # cross-validation folds behind the label-issue probabilities
    exact_search_up_to: int = setting(20000, at_least=0)  # rows; beyond this, faiss' HNSW index
    map_points: int = setting(10000, at_least=1)  # at most this many images on the map (a random sample beyond)
    seed: int = setting(0, **SEED)


@dataclass(frozen=True)
class FinetuneConfig(Section, key="finetune"):
    """Training the top of the backbone with the head, starting from a trained head run."""
    unfreeze: float = setting(0.5, above=0)  # below 1: that share of the backbone's weighted layers; 1 or more: blocks
    learning_rate: float = setting(1e-4, above=0)  # Adam's peak rate, reached after the warm-up
    warmup_epochs: float = setting(1.0, at_least=0)  # linear warm-up from zero: the first steps cannot wreck the head
    schedule: Literal["cosine", "constant"] = "cosine"  # after the warm-up: cosine decay to zero at `epochs`
    epochs: int = setting(12, at_least=1)  # upper bound; early stopping on validation ends sooner
    patience: int = setting(4, at_least=1)  # epochs without a better validation accuracy (ties: lower loss)
    batch_size: int = setting(32, at_least=1)
    augment: bool = True  # mirror, zoom-and-crop, brightness and contrast, in tf.data
    class_weight: Literal["balanced", "none"] = "balanced"
    seed: int = setting(0, **SEED)

    def check_together(self) -> None:
        if self.unfreeze >= 1 and not float(self.unfreeze).is_integer():
            raise ConfigError(f"finetune.unfreeze = {self.unfreeze!r}: below 1 it is a share of the layers, from 1 "
                              "on a whole number of blocks; fix: use e.g. 0.5 or 2")


@dataclass(frozen=True)
class RunConfig(Section, key="run"):
    dir: str = "runs"


@dataclass(frozen=True)
class Config(Section):
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def dataset_name(self) -> str:
        return self.data.name or Path(self.data.root).resolve().name


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file (or start from the defaults) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; fix: pass an existing file to --config (see configs/)")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for override in overrides:
        _apply_override(raw, override)
    return _build(Config, raw, prefix="")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config, every key spelled out, loadable again with --config."""
    return tomli_w.dumps(to_dict(config))


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected key=value, for example --set head.kind=dense")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words such as `dense` or a path
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a table")
    node[leaf] = value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    """The section `cls` from raw TOML values; unknown keys are refused here, and the
    section checks its own values (types, choices, ranges) when it is made."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table of keys, got {raw!r}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"unknown config key {key!r}; fix: remove it or use one of: "
                          + ", ".join(prefix + n for n in sorted(names)))
    values = {}
    for name in sorted(names & set(raw)):
        kind = hints[name]
        values[name] = _build(kind, raw[name], prefix + name + ".") if dataclasses.is_dataclass(kind) else raw[name]
    return cls(**values)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(key: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not allowed; fix: use one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_check(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is tuple:  # tuple[X, ...]
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_check(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `--set data.root=2024` is still a path
    if type(value) is not kind:
        raise ConfigError(f"{key} = {value!r} is a {type(value).__name__}, but {key} takes {_article(kind.__name__)}; "
                          f"fix: give it {_article(kind.__name__)} value (see configs/example.toml)")
    return value


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word

"""One typed configuration for every stage: TOML files plus `--set key=value` overrides.

Every key has a default here, so a config file only states what differs. Unknown keys
and values of the wrong type are refused with the key's name, never ignored: a typo in
`head.kind` must not silently train the default head. Relative paths are taken from the
current directory, which is the repository root when run through `make`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import tomli_w

from .errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    root: str = "cache/demo/digits"
    name: str = ""  # names cache files and runs; default: the root folder's name
    layout: Literal["auto", "class_folders", "split_folders", "map_file"] = "auto"
    map_file: str = ""  # one `path<TAB>label` map for all images, split by hash
    train_map: str = ""
    val_map: str = ""
    test_map: str = ""
    allow_outside_root: bool = False  # map files may name files outside their folder
    val_percent: float = 10.0  # carved from train by content hash when the layout has no val
    test_percent: float = 10.0  # carved by content hash only when the layout has no splits
    max_image_pixels: int = 178_956_970  # decompression-bomb guard
    embedded: Literal["", "digits"] = ""  # write a bundled demo dataset into root if missing


@dataclass(frozen=True)
class CacheConfig:
    dir: str = "cache"
    dtype: Literal["float32", "float16"] = "float32"


@dataclass(frozen=True)
class BackboneConfig:
    name: Literal["inception_v3", "mobilenet", "mobilenet_v2", "resnet50", "efficientnet_b0"] = (
        "inception_v3"
    )
    alpha: float = 1.0  # width multiplier, MobileNets only
    weights: str = "imagenet"  # "imagenet", "random", or a path to a weights file
    seed: int = 0  # initialises "random" weights reproducibly
    precision: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = 32
    allow_random_fallback: bool = False  # embedded demo only: random weights when offline


@dataclass(frozen=True)
class ExtractConfig:
    workers: int = 0  # image decoding threads; 0 picks one per core


@dataclass(frozen=True)
class LogRegConfig:
    c_values: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    max_iter: int = 1000


@dataclass(frozen=True)
class DenseConfig:
    hidden_units: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.5
    learning_rate: float = 0.001
    batch_size: int = 64
    epochs: int = 200
    patience: int = 10  # early stopping on validation loss
    class_weight: Literal["balanced", "none"] = "balanced"
    seed: int = 0


@dataclass(frozen=True)
class HeadConfig:
    kind: Literal["logreg", "dense"] = "logreg"
    logreg: LogRegConfig = field(default_factory=LogRegConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)


@dataclass(frozen=True)
class InspectConfig:
    duplicate_similarity: float = 0.8  # cosine of centred features at which two images count as near-duplicates
    unfamiliar_quantile: float = 0.95  # novelty threshold: this quantile of the validation images' scores
    folds: int = 5  # cross-validation folds for the out-of-fold probabilities behind label issues
    exact_search_up_to: int = 20000  # rows; beyond this, nearest neighbours come from faiss' HNSW index
    map_points: int = 10000  # at most this many images on the map (a fixed random sample beyond)
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
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
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"unknown config key {key!r}; fix: remove it or use one of: "
                          + ", ".join(prefix + n for n in sorted(names)))
    values = {}
    for name in names & set(raw):
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], prefix + name + ".")
        else:
            values[name] = _check(prefix + name, kind, raw[name])
        if typing.get_origin(kind) is list and not values[name]:
            raise ConfigError(f"{prefix + name} is empty; fix: give it at least one value (see configs/example.toml)")
    return cls(**values)


def _check(key: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not allowed; fix: use one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            value = [value]
        return [_check(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
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

"""The config contract: typed keys, TOML plus overrides, and one-line errors naming the key."""

import dataclasses
import tomllib

import pytest
import tomli_w

from pipeline.config import BackboneConfig, Config, DenseConfig, HeadConfig, load_config, to_dict, to_toml
from pipeline.errors import ConfigError

from conftest import REPO


def _leaf_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_defaults_need_no_file():
    config = load_config()
    assert config.backbone.name == "inception_v3"
    assert config.head.kind == "logreg"
    assert config.cache.dir == "cache"


def test_required_key_names_exist():
    keys = set(_leaf_keys(to_dict(Config())))
    for key in ("data.root", "cache.dir", "backbone.name", "backbone.alpha", "backbone.weights", "head.kind"):
        assert key in keys


def test_file_then_overrides_typed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nroot = "photos"\n[backbone]\nname = "mobilenet"\nalpha = 0.5\n')
    config = load_config(path, ["head.kind=dense", "backbone.alpha=1", "head.dense.hidden_units=[64, 32]",
                                "backbone.batch_size=16", "data.root=my photos"])
    assert config.data.root == "my photos"
    assert config.backbone.name == "mobilenet"
    assert config.backbone.alpha == 1.0 and isinstance(config.backbone.alpha, float)
    assert config.head.kind == "dense"
    assert config.head.dense.hidden_units == [64, 32]
    assert config.backbone.batch_size == 16


@pytest.mark.parametrize("override, words", [
    (["head.kindd=dense"], ["head.kindd", "head.kind"]),
    (["backbone.batch_size=many"], ["backbone.batch_size", "int"]),
    (["head.kind=svm"], ["head.kind", "logreg", "dense"]),
    (["backbone.name=vgg"], ["backbone.name", "inception_v3"]),
    (["nonsense"], ["key=value"]),
    (["head.logreg.c_values=[]"], ["head.logreg.c_values", "empty"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nroot=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["head.kind=dense", "backbone.precision=bfloat16"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_shipped_configs_load_and_example_lists_every_key():
    for path in (REPO / "configs").glob("*.toml"):
        load_config(path)
    example = tomllib.loads((REPO / "configs" / "example.toml").read_text())
    assert set(_leaf_keys(example)) == set(_leaf_keys(to_dict(Config())))
    assert load_config(REPO / "configs" / "example.toml").data == dataclasses.replace(
        Config().data, root="path/to/your/photos")


OUT_OF_RANGE = {
    "head.dense.dropout=1": "head.dense.dropout = 1.0 is 1 or more; fix: set it to at least 0 and less than 1",
    "head.dense.dropout=-0.1": "head.dense.dropout = -0.1 is below 0; fix: set it to at least 0 and less than 1",
    "backbone.alpha=0": "backbone.alpha = 0.0 is 0 or less; fix: set it to more than 0",
    "head.dense.epochs=0": "head.dense.epochs = 0 is below 1; fix: set it to 1 or more",
    "head.dense.learning_rate=-0.01": "head.dense.learning_rate = -0.01 is 0 or less; fix: set it to more than 0",
    "head.dense.batch_size=0": "head.dense.batch_size = 0 is below 1; fix: set it to 1 or more",
    "head.dense.patience=-1": "head.dense.patience = -1 is below 0; fix: set it to 0 or more",
    "head.dense.hidden_units=[64,0]": "head.dense.hidden_units[1] = 0 is below 1; fix: set it to 1 or more",
    "head.dense.seed=-1": "head.dense.seed = -1 is below 0; fix: set it to at least 0 and less than 4294967296",
    "head.logreg.c_values=[0.1,0]": "head.logreg.c_values[1] = 0.0 is 0 or less; fix: set it to more than 0",
    "head.logreg.max_iter=0": "head.logreg.max_iter = 0 is below 1; fix: set it to 1 or more",
    "data.max_image_pixels=0": "data.max_image_pixels = 0 is below 1; fix: set it to 1 or more",
    "data.val_percent=101": "data.val_percent = 101.0 is above 100; fix: set it to a value from 0 to 100",
    "data.test_percent=-5": "data.test_percent = -5.0 is below 0; fix: set it to a value from 0 to 100",
    "data.val_percent=60 data.test_percent=40": "data.val_percent + data.test_percent = 100 leaves nothing to train "
                                                "on; fix: make them add up to less than 100",
    "backbone.batch_size=0": "backbone.batch_size = 0 is below 1; fix: set it to 1 or more",
    "backbone.seed=4294967296": "backbone.seed = 4294967296 is 4294967296 or more; fix: set it to at least 0 and less "
                                "than 4294967296",
    "extract.workers=-2": "extract.workers = -2 is below 0; fix: set it to 0 or more",
    "cache.dtype=float64": "cache.dtype = 'float64' is not allowed; fix: use one of 'float32', 'float16'",
    "backbone.precision=fp16": "backbone.precision = 'fp16' is not allowed; fix: use one of 'float32', 'bfloat16'",
    "head.dense.class_weight=auto": "head.dense.class_weight = 'auto' is not allowed; fix: use one of 'balanced', "
                                    "'none'",
    "data.layout=flat": "data.layout = 'flat' is not allowed; fix: use one of 'auto', 'class_folders', "
                        "'split_folders', 'map_file'",
}


@pytest.mark.parametrize("overrides", OUT_OF_RANGE)
def test_a_value_out_of_range_is_refused_from_set_and_from_toml(tmp_path, overrides):
    pairs = [pair.split("=", 1) for pair in overrides.split(" ")]
    with pytest.raises(ConfigError) as from_set:
        load_config(None, ["=".join(pair) for pair in pairs])
    assert str(from_set.value) == OUT_OF_RANGE[overrides]
    tables: dict = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        table = tables
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = tomllib.loads(f"v = {value}")["v"] if value[0] in "[-0123456789" else value
    toml = tmp_path / "c.toml"
    toml.write_text(tomli_w.dumps(tables))
    with pytest.raises(ConfigError) as from_file:
        load_config(toml)
    assert str(from_file.value) == OUT_OF_RANGE[overrides]


def test_a_config_made_in_python_is_checked_too():
    with pytest.raises(ConfigError, match=r"^head\.dense\.dropout = 1\.5 is 1 or more; fix"):
        DenseConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"^head\.kind = 'svm' is not allowed"):
        HeadConfig(kind="svm")
    with pytest.raises(ConfigError, match=r"^backbone\.batch_size = 0 is below 1"):
        dataclasses.replace(Config().backbone, batch_size=0)
    with pytest.raises(ConfigError, match=r"^backbone\.alpha = 'wide' is a str, but backbone\.alpha takes a float"):
        BackboneConfig(alpha="wide")
    with pytest.raises(ConfigError, match=r"^head: expected a table of keys"):
        Config(head="dense")
    from pipeline.baseline import BaselineSettings
    with pytest.raises(ConfigError, match=r"^baseline\.epochs = 0 is below 1; fix: set it to 1 or more$"):
        BaselineSettings(epochs=0)
    assert DenseConfig(dropout=0, hidden_units=(8,)) == DenseConfig(dropout=0.0, hidden_units=[8])  # coerced


def _sections(cls=Config):
    yield cls
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else f.default_factory):
            yield from _sections(f.default_factory)


def test_every_numeric_key_declares_its_range():
    """A new int or float key must say which values it takes (`setting(default, at_least=...)`)."""
    import typing
    missing = []
    for section in _sections():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            kind = hints[f.name]
            kind = (typing.get_args(kind) or (kind,))[0] if typing.get_origin(kind) in (list, tuple) else kind
            if kind in (int, float) and "range" not in f.metadata:
                missing.append(f"{section.key}.{f.name}")
    assert missing == []


def test_a_config_built_in_python_is_checked_like_one_read_from_toml():
    with pytest.raises(ConfigError, match="backbone.name = 'vgg' is not allowed; fix: use one of 'inception_v3'"):
        Config(backbone=BackboneConfig(name="vgg"))
    with pytest.raises(ConfigError, match="head.kind = 'forest' is not allowed; fix: use one of 'logreg', 'dense'"):
        HeadConfig(kind="forest")
    with pytest.raises(ConfigError, match="backbone.batch_size = 0 is below 1"):
        BackboneConfig(batch_size=0)
    with pytest.raises(ConfigError, match="backbone: expected a table of keys"):
        Config(backbone={"name": "mobilenet"})
    with pytest.raises(ConfigError, match="backbone.name = 'vgg' is not allowed"):
        load_config(None, ["backbone.name=vgg"])

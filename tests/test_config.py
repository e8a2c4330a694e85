"""The config contract: typed keys, TOML plus overrides, and one-line errors naming the key."""

import dataclasses
import tomllib

import pytest

from pipeline.config import Config, load_config, to_dict, to_toml
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

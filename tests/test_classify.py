"""The backbone's own ImageNet top-k, with human-readable names, on TensorFlow's sample panda."""

import json

import pytest

from pipeline.classify import HUMAN_MAP, SYNSET_MAP, imagenet_names, names_from_label_maps, run_classify
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ImageError, PipelineError

from conftest import SHARED

IMAGENET = SHARED / "imagenet"
MOBILENET = ["--set", "backbone.name=mobilenet", "--set", "backbone.alpha=0.25"]


@pytest.fixture(scope="module")
def imagenet():
    if not (IMAGENET / "cropped_panda.jpg").is_file():
        pytest.fail(f"{IMAGENET} is missing: the tests need ../shared beside the checkout (see README)")
    return IMAGENET


def test_mobilenet_sees_the_giant_panda(imagenet, keras_home, tmp_path, capsys):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not a photo")
    assert main(["classify", str(imagenet / "cropped_panda.jpg"), str(text_file), "--top", "5", *MOBILENET]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(imagenet / "cropped_panda.jpg") and len(lines) == 7
    assert any("giant panda, panda, panda bear" in line and "(class 388)" in line for line in lines[1:3]), lines
    assert lines[6].startswith(f"{text_file}: error: not an image")


def test_only_bad_images_is_an_error(imagenet, keras_home, tmp_path):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not a photo")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        run_classify(load_config(None, [s for s in MOBILENET if s != "--set"]), [text_file], label_dir=imagenet)


def test_keras_class_order_is_the_sorted_synsets(imagenet, tmp_path):
    names = names_from_label_maps(imagenet)
    assert len(names) == 1000 and names[0].startswith("tench") and names[388].startswith("giant panda")
    # Keras' own class index wins when it is already downloaded; an explicit folder wins over both
    index = {str(i): [f"n{i:08d}", name.split(",")[0].replace(" ", "_")] for i, name in enumerate(names)}
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps(index))
    from_keras = imagenet_names(None, tmp_path)
    assert from_keras[388] == "giant panda" and from_keras[0] == "tench"
    assert imagenet_names(imagenet, tmp_path) == names


def test_missing_label_maps_say_how_to_fix_it(tmp_path):
    with pytest.raises(PipelineError, match=f"--imagenet-labels DIR holding {SYNSET_MAP} and {HUMAN_MAP}"):
        names_from_label_maps(tmp_path)
    (tmp_path / SYNSET_MAP).write_text('entry {\n  target_class: 1\n  target_class_string: "n01440764"\n}\n')
    (tmp_path / HUMAN_MAP).write_text("n01440764\ttench, Tinca tinca\n")
    with pytest.raises(PipelineError, match="lists 1 synsets, not 1000"):
        names_from_label_maps(tmp_path)

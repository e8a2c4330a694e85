"""A user's mistake in the data or the config: one line on stderr that names the key or the
file and the fix, never a traceback. Also checks README's "What happens when..." table
against the tests of this issue, so the table cannot promise what no test shows.
"""

import ast
import re
import subprocess
import sys

import pytest

from pipeline.cli import main

from conftest import REPO, tiny_config, write_image
from pipeline_helpers import class_folders, cli_args


def _run(capsys, stage: str, *args: str) -> tuple[int, list[str]]:
    """Exit status and stderr lines of `python -m pipeline <stage>`, run in this process."""
    capsys.readouterr()
    status = main([stage, *(["--no-progress"] if stage == "extract" else []), *args])
    return status, capsys.readouterr().err.splitlines()


def _classes(root, **sizes: int):
    return class_folders(root, "{i}.png", **sizes)


CONFIG_MISTAKES = {
    "an unknown key": (["head.kindd=dense"], "unknown config key 'head.kindd'; fix: remove it or use one of: "
                                             "head.dense, head.kind, head.logreg, head.tta"),
    "a value of the wrong type": (["backbone.batch_size=many"],
                                  "backbone.batch_size = 'many' is a str, but backbone.batch_size takes an int; fix: give "
                                  "it an int value (see configs/example.toml)"),
    "a choice that does not exist": (["head.kind=svm"], "head.kind = 'svm' is not allowed; fix: use one of 'logreg', "
                                                        "'dense'"),
    "a table where a value belongs": (["backbone=big"], "backbone: expected a table of keys, got 'big'"),
    "a missing dataset path": (["data.root=nowhere"], "data.root: folder nowhere does not exist; fix: set data.root in "
                                                      "your config or --set data.root=PATH"),
    "a batch size of zero": (["backbone.batch_size=0"], "backbone.batch_size = 0 is below 1; fix: set it to 1 or more"),
    "a negative number of workers": (["extract.workers=-2"], "extract.workers = -2 is below 0; fix: set it to 0 or "
                                                             "more"),
}


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
def test_a_config_mistake_is_one_line_naming_the_key(tmp_path, tiny_dataset, capsys, mistake):
    overrides, message = CONFIG_MISTAKES[mistake]
    status, err = _run(capsys, "extract", *cli_args(tiny_config(tmp_path, tiny_dataset), *overrides))
    assert (status, err) == (2, [f"error: {message}"])


def test_config_file_mistakes_name_the_file_or_the_key(tmp_path, capsys):
    assert _run(capsys, "train", "--config", str(tmp_path / "nope.toml")) == (2, [
        f"error: config file {tmp_path / 'nope.toml'} does not exist; fix: pass an existing file to --config "
        "(see configs/)"])
    broken = tmp_path / "broken.toml"
    broken.write_text('[data]\nroot = "photos\n')
    status, err = _run(capsys, "train", "--config", str(broken))
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {broken}: not valid TOML")
    typo = tmp_path / "typo.toml"
    typo.write_text('[data]\nroott = "photos"\n')
    status, err = _run(capsys, "train", "--config", str(typo))
    assert status == 2 and len(err) == 1 and err[0].startswith("error: unknown config key 'data.roott'; fix: remove it")


def test_a_class_folder_without_images_is_a_warning(tmp_path, capsys):
    root = _classes(tmp_path / "pets", cat=6, dog=6)
    (root / "axolotl").mkdir()
    (root / "axolotl" / "notes.txt").write_text("photos to come")
    config = tiny_config(tmp_path, root, **{"data.test_percent": 0.0})
    assert _run(capsys, "extract", *cli_args(config)) == (0, [
        "warning: class folder axolotl/ holds no images and is left out; fix: add images to it or remove it"])


def test_a_class_with_one_image_is_a_warning_at_extract_and_an_error_at_train(tmp_path, capsys):
    config = tiny_config(tmp_path, _classes(tmp_path / "pets", cat=8, dog=8, axolotl=1))
    refusal = ("class 'axolotl' has 1 image(s) but needs at least 3, one for each of train, val, test; fix: add images "
               "of 'axolotl', set data.test_percent = 0 to do without a test split, or choose the splits yourself "
               "with train/val/test folders")
    assert _run(capsys, "extract", *cli_args(config)) == (0, [f"warning: train will refuse this dataset: {refusal}"])
    assert _run(capsys, "train", *cli_args(config)) == (2, [f"error: {refusal}"])


def test_a_single_class_dataset_is_refused_before_extracting(tmp_path, capsys):
    root = _classes(tmp_path / "cats", cat=5)
    assert _run(capsys, "extract", *cli_args(tiny_config(tmp_path, root))) == (2, [
        f"error: data.root folder {root} has 1 class(es) ('cat') but a classifier needs at least 2; fix: add a "
        "folder (or map label) for each class"])


def test_empty_splits_name_the_setting(tmp_path, capsys):
    config = tiny_config(tmp_path, _classes(tmp_path / "pets", cat=6, dog=6),
                         **{"data.val_percent": 0.0, "data.test_percent": 0.0})
    assert _run(capsys, "extract", *cli_args(config))[0] == 0
    assert _run(capsys, "train", *cli_args(config, "data.val_percent=0", "data.test_percent=0")) == (2, [
        "error: the val split is empty; fix: add images or adjust data.val_percent"])


def test_a_dataset_with_no_usable_image_says_so(tmp_path, capsys):
    root = tmp_path / "broken"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{i}.jpg").write_bytes(b"<html>moved</html>")
    config = tiny_config(tmp_path, root)
    assert _run(capsys, "extract", *cli_args(config))[0] == 0
    assert _run(capsys, "train", *cli_args(config)) == (2, [
        "error: none of the 6 images can be used (6 could not be read or decoded, 0 label conflict(s)); fix: see what "
        "`make extract` lists and warns about"])


def _map_dataset(tmp_path, lines: list[str]):
    folder = _classes(tmp_path / "listed", cat=4, dog=4)
    (folder / "map.txt").write_text("".join(f"{line}\n" for line in lines))
    return folder / "map.txt"


def test_a_map_file_naming_a_missing_image_names_the_line(tmp_path, capsys):
    map_file = _map_dataset(tmp_path, ["cat/0.png\tcat", "dog/0.png\tdog", "cat/gone.png\tcat"])
    config = tiny_config(tmp_path, tmp_path)
    assert _run(capsys, "extract", *cli_args(config, f"data.map_file='{map_file}'")) == (2, [
        f"error: {map_file} line 3: image cat/gone.png does not exist; fix: correct the path or delete the line"])


def test_a_map_file_reaches_outside_its_folder_only_when_allowed(tmp_path, capsys):
    outside = write_image(tmp_path / "elsewhere" / "stray.png", seed=77)
    lines = [f"{label}/{i}.png\t{label}" for label in ("cat", "dog") for i in range(4)]
    lines.append("../elsewhere/stray.png\tdog")
    map_file = _map_dataset(tmp_path, lines)
    config = tiny_config(tmp_path, map_file.parent)
    listed = [f"data.map_file='{map_file}'", "data.test_percent=0"]
    assert _run(capsys, "extract", *cli_args(config, *listed)) == (2, [
        f"error: {map_file} line 9: ../elsewhere/stray.png lies outside the map file's folder {map_file.parent}; fix: "
        "move the image there, or set data.allow_outside_root = true if that is intended"])
    assert _run(capsys, "extract", *cli_args(config, *listed, "data.allow_outside_root=true")) == (0, [])
    assert _run(capsys, "train", *cli_args(config, *listed, "data.allow_outside_root=true"))[0] == 0
    samples = (next((tmp_path / "runs" / "listed").iterdir()) / "samples.jsonl").read_text()
    assert outside.as_posix() in samples


@pytest.mark.parametrize("stage, settings, words", [
    ("train", ["head.kindd=dense"], "unknown config key 'head.kindd'"),
    ("extract", ["data.root=nowhere"], "data.root: folder nowhere does not exist"),
    ("report", ["run.dir=nowhere"], "no trained run under nowhere/"),
])
def test_no_traceback_from_the_command_line(tmp_path, stage, settings, words):
    """The real command, in its own process: exit status 2 and one line, whatever the stage."""
    command = [sys.executable, "-m", "pipeline", stage] + [part for s in settings for part in ("--set", s)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and words in line and "fix: " in line


# --- README's "What happens when..." table ----------------------------------------------------------

ISSUE_MODULES = ("test_bad_images.py", "test_faults.py", "test_concurrency.py", "test_config_errors.py")


def _readme_table() -> list[tuple[str, str, list[str]]]:
    """(when, what happens, tests) for each row of the table under README's "What happens when..." heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## What happens when", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after the header and its rule
    table = []
    for row in rows:
        when, what, tests = (cell.strip() for cell in row.strip("|").split("|"))
        table.append((when, what, re.findall(r"`(test_\w+\.py::test_\w+)`", tests)))
    return table


def _test_functions() -> set[str]:
    found = set()
    for module in ISSUE_MODULES:
        tree = ast.parse((REPO / "tests" / module).read_text(encoding="utf-8"))
        found |= {f"{module}::{node.name}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return found


def test_the_readme_table_names_a_test_for_every_row_and_every_test_has_a_row():
    table = _readme_table()
    assert len(table) >= 20
    existing = _test_functions()
    for when, what, tests in table:
        assert when and what and tests, f"README row without a test: {when!r}"
        assert set(tests) <= existing, f"README row {when!r} names missing tests: {set(tests) - existing}"
    assert existing - {test for _, _, tests in table for test in tests} == set(), "tests missing from README's table"

"""The dataset contract: three layouts, junk never taken for images, and splits by content hash
that are stable, leak-free and never leave a class without images in a split."""

import hashlib
import os
from collections import Counter

import pytest

from pipeline.dataset import IMAGE_EXTENSIONS, ImageEntry, assign_splits, discover
from pipeline.errors import DatasetError

from conftest import write_image


def make_tree(root, relpaths, seed=0):
    """An image (content unique per file) at each relpath under root."""
    for offset, relpath in enumerate(relpaths):
        write_image(root / relpath, seed=seed + offset, size=(8, 8))
    return root


def labels_by_path(dataset):
    return {entry.relpath: (entry.label, entry.split) for entry in dataset.entries}


def key_of(text):
    return hashlib.sha256(str(text).encode()).hexdigest()


def synthetic(n, label="cat", start=0, split=None):
    """n entries with content hashes; files need not exist, assign_splits never reads them."""
    entries = [ImageEntry(path=None, relpath=f"{label}/{i}.jpg", label=label, split=split)
               for i in range(start, start + n)]
    return entries, {entry.relpath: key_of(entry.relpath) for entry in entries}


# --- layouts -------------------------------------------------------------------------------------

def test_class_folders_with_nested_subfolders(tmp_path):
    root = make_tree(tmp_path / "pets", ["cat/a.png", "cat/2019/summer/b.JPG", "dog/c.jpeg", "dog/d.webp"])
    dataset = discover(root)
    assert dataset.layout == "class_folders" and dataset.name == "pets"
    assert dataset.classes == ["cat", "dog"]
    assert labels_by_path(dataset) == {"cat/2019/summer/b.JPG": ("cat", None), "cat/a.png": ("cat", None),
                                       "dog/c.jpeg": ("dog", None), "dog/d.webp": ("dog", None)}
    assert all(entry.path.is_absolute() and entry.path == root.resolve() / entry.relpath
               for entry in dataset.entries)


def test_split_folders(tmp_path):
    root = make_tree(tmp_path / "ds", ["train/cat/1.png", "train/dog/2.png", "val/cat/3.png", "val/dog/4.png",
                                       "test/cat/5.png", "test/dog/6.png"])
    dataset = discover(root)
    assert dataset.layout == "split_folders"
    assert labels_by_path(dataset) == {"test/cat/5.png": ("cat", "test"), "test/dog/6.png": ("dog", "test"),
                                       "train/cat/1.png": ("cat", "train"), "train/dog/2.png": ("dog", "train"),
                                       "val/cat/3.png": ("cat", "val"), "val/dog/4.png": ("dog", "val")}


def test_cntk_train_test_with_unlabeled_images_loose_in_test(tmp_path):
    root = make_tree(tmp_path / "Animals", ["Train/Sheep/1.jpg", "Train/Wolf/2.jpg", "Test/Sheep/3.jpg",
                                            "Test/Wolf/4.jpg", "Test/mystery.jpg"])
    dataset = discover(root)
    assert dataset.layout == "split_folders" and dataset.classes == ["Sheep", "Wolf"]
    assert labels_by_path(dataset)["Test/mystery.jpg"] == (None, "test")
    assert labels_by_path(dataset)["Train/Wolf/2.jpg"] == ("Wolf", "train")


@pytest.mark.parametrize("name", ["val", "Validation", "VALID"])
def test_val_folder_names(tmp_path, name):
    root = make_tree(tmp_path / "ds", ["train/a/1.png", "train/b/2.png", f"{name}/a/3.png"])
    assert labels_by_path(discover(root))[f"{name}/a/3.png"] == ("a", "val")


def test_missing_val_or_test_folder_is_fine(tmp_path):
    root = make_tree(tmp_path / "ds", ["train/a/1.png", "train/b/2.png", "test/a/3.png"])
    assert {entry.split for entry in discover(root).entries} == {"train", "test"}
    root = make_tree(tmp_path / "ds2", ["train/a/1.png", "train/b/2.png", "val/a/3.png"])
    assert {entry.split for entry in discover(root).entries} == {"train", "val"}


def test_loose_images_in_train_are_refused(tmp_path):
    root = make_tree(tmp_path / "ds", ["train/a/1.png", "train/b/2.png", "train/stray.png"])
    with pytest.raises(DatasetError) as error:
        discover(root)
    message = str(error.value)
    assert "\n" not in message and str(root.resolve() / "train") in message and "stray.png" in message
    assert "fix: move them into train/<class>/" in message


def test_loose_images_beside_class_folders_are_refused(tmp_path):
    root = make_tree(tmp_path / "ds", ["a/1.png", "b/2.png", "stray.png"])
    with pytest.raises(DatasetError, match=r"lie directly in data.root .*stray.png.*fix: move them into a <class>/"):
        discover(root)


@pytest.mark.parametrize("relpaths, message", [
    (["train/a/1.png", "val/a/2.png", "validation/b/3.png"], "are both the val split"),
    (["val/a/1.png", "test/b/2.png"], "but no train folder"),
    (["train/a/1.png", "train/b/2.png", "extras/c/3.png"], "is not a split folder"),
])
def test_broken_split_folders(tmp_path, relpaths, message):
    with pytest.raises(DatasetError, match=message):
        discover(make_tree(tmp_path / "ds", relpaths))


def test_explicit_layout_overrides_detection(tmp_path):
    root = make_tree(tmp_path / "ds", ["train/1.png", "test/2.png"])
    dataset = discover(root, layout="class_folders")
    assert dataset.classes == ["test", "train"]


def test_junk_hidden_ignored_and_looping_folders_are_skipped(tmp_path):
    root = make_tree(tmp_path / "ds", ["cat/a.png", "dog/b.png", "cat/x.jpg/inside.png", ".hidden/c.png",
                                       "cat/.secret.png", "__MACOSX/cat/._a.png", "cache/features/d.png",
                                       "runs/e.png"])
    for junk in ["cat/.DS_Store", "cat/Thumbs.db", "dog/desktop.ini", "dog/notes.txt", "README.md"]:
        (root / junk).write_text("junk")
    (root / "dog" / "empty.jpg").mkdir()  # a folder with an image name is still a folder
    os.symlink(root / "cat", root / "cat" / "loop")
    os.symlink(root, root / "dog" / "up")
    os.symlink(root / "dog" / "self", root / "dog" / "self")
    os.symlink(tmp_path / "nowhere.png", root / "dog" / "broken.png")
    dataset = discover(root, ignore=[root / "cache", tmp_path / "ds" / "runs"])
    assert labels_by_path(dataset) == {"cat/a.png": ("cat", None), "cat/x.jpg/inside.png": ("cat", None),
                                       "dog/b.png": ("dog", None)}
    assert dataset.ignored == ["README.md", "dog/notes.txt"]


def test_symlinked_class_folders_are_followed(tmp_path):
    make_tree(tmp_path / "elsewhere", ["1.png", "2.png"])
    root = make_tree(tmp_path / "ds", ["cat/a.png"])
    os.symlink(tmp_path / "elsewhere", root / "dog")
    assert labels_by_path(discover(root))["dog/2.png"] == ("dog", None)


def test_image_extensions():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError) as error:
        discover(tmp_path / "nope")
    assert str(error.value) == (f"data.root: folder {tmp_path / 'nope'} does not exist; "
                                "fix: set data.root in your config or --set data.root=PATH")


def test_no_images(tmp_path):
    (tmp_path / "ds" / "cat").mkdir(parents=True)
    (tmp_path / "ds" / "cat" / "notes.txt").write_text("no photos here")
    with pytest.raises(DatasetError, match=f"no images in data.root folder {tmp_path / 'ds'}"):
        discover(tmp_path / "ds")


def test_single_class(tmp_path):
    with pytest.raises(DatasetError, match=r"1 class\(es\) \('cat'\) but a classifier needs at least 2"):
        discover(make_tree(tmp_path / "ds", ["cat/a.png", "cat/b.png"]))


# --- map files -----------------------------------------------------------------------------------

def write_map(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_map_file_with_relative_paths_and_comments(tmp_path):
    folder = make_tree(tmp_path / "flowers", ["jpg/a.jpg", "jpg/b c.jpg", "jpg/d.png", "other/e.bmp"])
    map_file = write_map(folder / "map.txt", ["# path<TAB>label", "", "jpg/a.jpg\t0", "jpg/b c.jpg\t1",
                                              "  jpg/d.png   1", f"{folder / 'other/e.bmp'}\t0"])
    dataset = discover("ignored-root", map_files={"all": map_file})
    assert dataset.layout == "map_file" and dataset.root == folder.resolve() and dataset.name == "flowers"
    assert dataset.classes == ["0", "1"]
    assert labels_by_path(dataset) == {"jpg/a.jpg": ("0", None), "jpg/b c.jpg": ("1", None),
                                       "jpg/d.png": ("1", None), "other/e.bmp": ("0", None)}


def test_per_split_map_files(tmp_path):
    folder = make_tree(tmp_path / "ds", ["a.png", "b.png", "c.png", "d.png"])
    maps = {"train": write_map(folder / "train.txt", ["a.png\tcat", "b.png\tdog"]),
            "test": write_map(folder / "test.txt", ["c.png\tcat", "d.png\tdog"])}
    assert labels_by_path(discover(folder, map_files=maps)) == {
        "a.png": ("cat", "train"), "b.png": ("dog", "train"), "c.png": ("cat", "test"), "d.png": ("dog", "test")}


def test_map_file_naming_a_missing_image(tmp_path):
    folder = make_tree(tmp_path / "ds", ["a.png"])
    map_file = write_map(folder / "map.txt", ["# header", "a.png\tcat", "gone.png\tdog"])
    with pytest.raises(DatasetError) as error:
        discover(folder, map_files={"all": map_file})
    assert str(error.value) == (f"{map_file} line 3: image gone.png does not exist; "
                                "fix: correct the path or delete the line")


def test_map_file_paths_outside_its_folder(tmp_path):
    make_tree(tmp_path, ["outside.png"])
    folder = make_tree(tmp_path / "ds", ["a.png"])
    map_file = write_map(folder / "map.txt", ["a.png\tcat", "../outside.png\tdog"])
    with pytest.raises(DatasetError, match=r"line 2: \.\./outside.png lies outside .*data.allow_outside_root = true"):
        discover(folder, map_files={"all": map_file})
    dataset = discover(folder, map_files={"all": map_file}, allow_outside_root=True)
    assert labels_by_path(dataset)[(tmp_path / "outside.png").as_posix()] == ("dog", None)


@pytest.mark.parametrize("lines, message", [
    (["a.png\tcat", "a.png\tdog"], "line 2: a.png is already listed"),
    (["a.png\tcat", "b.png"], r"line 2: expected `path<TAB>label`"),
])
def test_malformed_map_files(tmp_path, lines, message):
    folder = make_tree(tmp_path / "ds", ["a.png", "b.png"])
    with pytest.raises(DatasetError, match=message):
        discover(folder, map_files={"all": write_map(folder / "map.txt", lines)})


def test_missing_map_file(tmp_path):
    with pytest.raises(DatasetError, match=r"data.train_map: map file .*missing.txt does not exist"):
        discover(tmp_path, map_files={"train": tmp_path / "missing.txt"})


def test_real_split_folder_datasets(flowers5, hymenoptera):
    flowers = discover(flowers5)
    assert flowers.layout == "split_folders" and len(flowers.classes) == 5
    assert {entry.split for entry in flowers.entries} == {"train", "val"}
    ants = discover(hymenoptera)
    assert ants.classes == ["ants", "bees"]
    paths = {entry.relpath for entry in ants.entries}
    assert {"train/ants/imageNotFound.gif", "train/ants/formica.jpeg"} <= paths


# --- splits --------------------------------------------------------------------------------------

def test_percentages_are_roughly_respected():
    cats, cat_keys = synthetic(600, "cat")
    dogs, dog_keys = synthetic(400, "dog")
    splits = assign_splits(cats + dogs, cat_keys | dog_keys, val_percent=10, test_percent=20)
    counts = Counter(splits.values())
    assert abs(counts["val"] - 100) < 40 and abs(counts["test"] - 200) < 50 and sum(counts.values()) == 1000


def test_adding_images_never_moves_old_ones():
    entries, keys = synthetic(300)
    before = assign_splits(entries, keys, val_percent=15, test_percent=15)
    more, more_keys = synthetic(200, start=300)
    after = assign_splits(entries + more, keys | more_keys, val_percent=15, test_percent=15)
    assert {relpath: after[relpath] for relpath in before} == before


def test_same_content_under_two_names_lands_in_one_split():
    entries, keys = synthetic(400)
    copies = [ImageEntry(None, f"cat/copy_of_{e.relpath[4:]}", "cat", None) for e in entries]
    keys |= {copy.relpath: keys[original.relpath] for copy, original in zip(copies, entries)}
    splits = assign_splits(entries + copies, keys, val_percent=20, test_percent=20)
    assert all(splits[copy.relpath] == splits[original.relpath] for copy, original in zip(copies, entries))
    assert set(splits.values()) == {"train", "val", "test"}


def test_layout_splits_are_kept_and_only_val_is_carved_from_train():
    train, train_keys = synthetic(500, split="train")
    test, test_keys = synthetic(50, start=500, split="test")
    splits = assign_splits(train + test, train_keys | test_keys, val_percent=20, test_percent=30)
    assert all(splits[entry.relpath] == "test" for entry in test)
    carved = Counter(splits[entry.relpath] for entry in train)
    assert set(carved) == {"train", "val"} and abs(carved["val"] - 100) < 40


def test_a_val_folder_means_nothing_is_carved():
    entries, keys = synthetic(100, split="train")
    val, val_keys = synthetic(10, start=100, split="val")
    splits = assign_splits(entries + val, keys | val_keys, val_percent=50, test_percent=50)
    assert splits == {entry.relpath: entry.split for entry in entries + val}


def test_unlabeled_images_are_test_and_undecodable_ones_left_out():
    entries, keys = synthetic(50)
    unlabeled = ImageEntry(None, "mystery.jpg", None, None)
    failed = ImageEntry(None, "broken.jpg", "cat", None)
    dogs, dog_keys = synthetic(50, "dog")
    splits = assign_splits(entries + dogs + [unlabeled, failed], keys | dog_keys | {"mystery.jpg": key_of("m")},
                           val_percent=10, test_percent=10)
    assert splits["mystery.jpg"] == "test" and "broken.jpg" not in splits and len(splits) == 101


@pytest.mark.parametrize("size", [3, 4, 5, 8])
def test_small_classes_get_an_image_in_every_split(size):
    for trial in range(30):
        small, small_keys = synthetic(size, label=f"rare{trial}")
        big, big_keys = synthetic(200, "common")
        splits = assign_splits(small + big, small_keys | big_keys, val_percent=10, test_percent=10)
        assert {splits[entry.relpath] for entry in small} == {"train", "val", "test"}
        assert sum(splits[entry.relpath] == "train" for entry in small) >= 1


def test_small_class_fix_moves_as_few_images_as_needed():
    for trial in range(40):
        small, keys = synthetic(6, label=f"rare{trial}")
        filler, filler_keys = synthetic(400, label=f"rare{trial}", start=6)  # same class: no fix needed
        by_hash = assign_splits(small + filler, keys | filler_keys, val_percent=10, test_percent=10)
        fixed = assign_splits(small, keys, val_percent=10, test_percent=10)
        empty = {"train", "val", "test"} - {by_hash[entry.relpath] for entry in small}
        moved = sum(by_hash[entry.relpath] != fixed[entry.relpath] for entry in small)
        assert moved == len(empty)


def bucket_key(bucket):
    """A content hash whose bucket, int(key[:12], 16) % 10000 / 100, is the given one."""
    return f"{round(bucket * 100):012x}".ljust(64, "0")


def test_buckets_are_pinned_and_fixes_take_the_lowest_train_buckets():
    # changing the bucket formula would reshuffle the splits of every existing dataset
    entries = [ImageEntry(None, f"cat/{bucket}.jpg", "cat", None) for bucket in (5, 15, 40, 50, 60, 70)]
    keys = {entry.relpath: bucket_key(float(entry.relpath[4:-4])) for entry in entries}
    assert assign_splits(entries, keys, val_percent=10, test_percent=10) == {
        "cat/5.jpg": "test", "cat/15.jpg": "val", "cat/40.jpg": "train", "cat/50.jpg": "train",
        "cat/60.jpg": "train", "cat/70.jpg": "train"}
    in_train = entries[2:]
    assert assign_splits(in_train[::-1], keys, val_percent=10, test_percent=10) == {
        "cat/40.jpg": "test", "cat/50.jpg": "val", "cat/60.jpg": "train", "cat/70.jpg": "train"}
    no_train = [ImageEntry(None, f"cat/{bucket}.jpg", "cat", None) for bucket in (2, 5, 15)]
    keys |= {entry.relpath: bucket_key(float(entry.relpath[4:-4])) for entry in no_train}
    assert assign_splits(no_train, keys, val_percent=10, test_percent=10) == {  # test's highest goes to train
        "cat/2.jpg": "test", "cat/5.jpg": "train", "cat/15.jpg": "val"}


def test_a_one_image_class_gets_a_clear_error():
    rare, rare_keys = synthetic(1, "axolotl")
    common, common_keys = synthetic(50, "cat")
    with pytest.raises(DatasetError) as error:
        assign_splits(rare + common, rare_keys | common_keys, val_percent=10, test_percent=10)
    message = str(error.value)
    assert message.startswith("class 'axolotl' has 1 image(s) but needs at least 3, one for each of train, val, test")
    assert "fix: add images of 'axolotl'" in message and "data.test_percent = 0" in message
    assert "\n" not in message


def test_a_two_image_class_fits_once_there_is_no_test_split():
    rare, rare_keys = synthetic(2, "axolotl")
    common, common_keys = synthetic(50, "cat")
    with pytest.raises(DatasetError, match="has 2 image.* needs at least 3"):
        assign_splits(rare + common, rare_keys | common_keys, val_percent=10, test_percent=10)
    splits = assign_splits(rare + common, rare_keys | common_keys, val_percent=10, test_percent=0)
    assert sorted(splits[entry.relpath] for entry in rare) == ["train", "val"]


def test_a_class_without_train_images_is_refused():
    train, train_keys = synthetic(20, "cat", split="train")
    val, val_keys = synthetic(3, "dog", split="val")
    with pytest.raises(DatasetError, match="class 'dog' has 0 image.* in train but needs at least 1"):
        assign_splits(train + val, train_keys | val_keys, val_percent=10, test_percent=10)


@pytest.mark.parametrize("val, test", [(60, 40), (-1, 10)])
def test_impossible_percentages(val, test):
    entries, keys = synthetic(10)
    with pytest.raises(DatasetError, match=f"data.test_percent = {test} and data.val_percent = {val}: each must"):
        assign_splits(entries, keys, val_percent=val, test_percent=test)


def test_only_the_carved_percentages_matter():
    train, train_keys = synthetic(20, split="train")
    test, test_keys = synthetic(5, start=20, split="test")
    splits = assign_splits(train + test, train_keys | test_keys, val_percent=30, test_percent=95)
    assert Counter(splits.values())["test"] == 5

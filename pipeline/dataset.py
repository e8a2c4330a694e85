"""Finding a dataset's images and labels, and splitting them reproducibly by content.

Three layouts are understood: class folders (`root/<class>/**`), split folders
(`root/{train,val,test}/<class>/**`, any case, so CNTK's `Train/` and `Test/` work too) and
`path<TAB>label` map files. Splits the layout does not give are carved by content hash:
adding images never moves old ones, and one photo saved under two names never ends up on
both sides of a split.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
LAYOUTS = ("class_folders", "split_folders", "map_file")

_SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
_JUNK = frozenset({"__macosx", "thumbs.db", "desktop.ini"})  # compared case-folded, as Windows does
_MAP_SETTINGS = {"all": "data.map_file", "train": "data.train_map", "val": "data.val_map", "test": "data.test_map"}


@dataclass(frozen=True)
class ImageEntry:
    path: Path  # absolute
    relpath: str  # POSIX, relative to the dataset root: the image's identity in caches and reports
    label: str | None  # None: unlabeled, scored and reported as "unknown"
    split: str | None  # the split the layout gives, if any


@dataclass
class Dataset:
    root: Path
    layout: str
    entries: list[ImageEntry]  # sorted by relpath
    classes: list[str]  # sorted distinct labels
    ignored: list[str] = field(default_factory=list)  # relpaths of non-image files that were skipped
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why): image names that cannot be read
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. a class folder without images

    @property
    def name(self) -> str:
        """Names the dataset's cache files."""
        return self.root.name


def discover(root: str | Path, *, layout: str = "auto", map_files: Mapping[str, Path] | None = None,
             allow_outside_root: bool = False, ignore: Iterable[Path] = ()) -> Dataset:
    """Every image under `root` (or listed in `map_files`) with its label and layout split.

    `map_files` maps "all" or a split name to a map file; when given, `root` is unused and
    the dataset root is the folder of the first map file. `ignore` lists folders (the cache
    and run folders) that are never read as classes or images.
    """
    if layout not in ("auto", *LAYOUTS):
        raise DatasetError(f"data.layout = {layout!r} is unknown; fix: use auto, {', '.join(LAYOUTS)}")
    if map_files:
        if layout not in ("auto", "map_file"):
            raise DatasetError(f"data.layout = {layout} but map files are set; fix: set data.layout = map_file "
                               "or clear data.map_file, data.train_map, data.val_map and data.test_map")
        return _from_map_files(map_files, allow_outside_root)
    if layout == "map_file":
        raise DatasetError("data.layout = map_file but no map file is set; fix: set data.map_file "
                           "(or data.train_map with data.val_map / data.test_map)")
    root = Path(root)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"data.root: folder {root} {problem}; fix: set data.root in your config "
                           "or --set data.root=PATH")
    scan = _Scan(root.resolve(), ignore)
    folders, images = scan.listdir(scan.root)
    split_named = any(folder.name.casefold() in _SPLIT_FOLDERS for folder in folders)
    if layout == "split_folders" or (layout == "auto" and split_named):
        return scan.dataset("split_folders", _split_folder_entries(scan, folders, images))
    _refuse_loose(images, scan.root, "data.root", "a <class>/ subfolder")
    return scan.dataset("class_folders", _class_entries(scan, folders, split=None))


def assign_splits(entries: Iterable[ImageEntry], keys: Mapping[str, str], *, val_percent: float,
                  test_percent: float) -> dict[str, str]:
    """relpath -> "train" | "val" | "test" for every entry that has a content hash in `keys`.

    Layout splits are kept. What the layout lacks is carved from the train images by content
    hash: val when there is no val split, val and test when there are no splits at all. Then
    every class gets at least one image in train and in each carved split, or a clear error.
    Unlabeled images are always test.
    """
    entries = list(entries)
    given = {entry.split for entry in entries} - {None}
    if not given:
        carve = {"test": test_percent, "val": val_percent}
    elif "val" not in given:
        carve = {"val": val_percent}
    else:
        carve = {}
    if min(carve.values(), default=0) < 0 or sum(carve.values()) >= 100:
        settings = " and ".join(f"data.{split}_percent = {percent}" for split, percent in carve.items())
        raise DatasetError(f"{settings}: each must be at least 0 and together below 100, to leave images for "
                           "train; fix: change them in your config or with --set")
    carve = {split: percent for split, percent in carve.items() if percent > 0}
    result: dict[str, str] = {}
    pools: dict[str, list[ImageEntry]] = {}
    for entry in entries:
        if entry.relpath not in keys:
            continue
        if entry.label is None:
            result[entry.relpath] = "test"
        elif entry.split in (None, "train"):
            pools.setdefault(entry.label, []).append(entry)
        else:
            result[entry.relpath] = entry.split
            pools.setdefault(entry.label, [])
    for label, pool in sorted(pools.items()):
        split_of = _split_class(label, [keys[entry.relpath] for entry in pool], carve, in_train=bool(given))
        result.update((entry.relpath, split_of[keys[entry.relpath]]) for entry in pool)
    return result


def _bucket(key: str) -> float:
    """A content hash's fixed place in [0, 100): it decides the image's split for good."""
    return int(key[:12], 16) % 10_000 / 100


def _hashed_split(key: str, carve: Mapping[str, float]) -> str:
    """Test takes the lowest buckets, val the next ones, train the rest."""
    edge = 0.0
    for split, percent in carve.items():
        edge += percent
        if _bucket(key) < edge:
            return split
    return "train"


def _split_class(label: str, keys: list[str], carve: Mapping[str, float], *, in_train: bool) -> dict[str, str]:
    """Content hash -> split for one class's train images, moving as few as needed to fill every split."""
    needed = [split for split in SPLITS if split == "train" or split in carve]
    distinct = sorted(set(keys), key=lambda key: (_bucket(key), key))
    if len(distinct) < len(needed):
        have = f"{len(keys)} image(s)" + (f" ({len(distinct)} distinct)" if len(distinct) != len(keys) else "")
        fix = f"add images of {label!r}" + (" to the train folder" if not carve else "")
        if "test" in carve:
            fix += ", set data.test_percent = 0 to do without a test split"
        if carve:
            fix += ", or choose the splits yourself with train/val/test folders"
        raise DatasetError(f"class {label!r} has {have}{' in train' if in_train else ''} but needs at least "
                           f"{len(needed)}, one for each of {', '.join(needed)}; fix: {fix}")
    split_of = {key: _hashed_split(key, carve) for key in distinct}
    counts = Counter(split_of.values())
    for split in reversed(needed):
        if counts[split] == 0:
            donor = max(needed, key=counts.__getitem__)  # holds >= 2, since there are enough images
            candidates = [key for key in distinct if split_of[key] == donor]
            # take the donor's image nearest to the empty split's buckets (test < val < train)
            moved = candidates[0] if SPLITS.index(split) > SPLITS.index(donor) else candidates[-1]
            split_of[moved] = split
            counts[donor] -= 1
            counts[split] += 1
    return split_of


class _Scan:
    """Walks one dataset folder: skips junk, ignored folders and symlink loops, notes non-images,
    and notes image names that cannot be read (broken links, loops, FIFOs, names that are not UTF-8)."""

    def __init__(self, root: Path, ignore: Iterable[Path]):
        self.root = root
        self.root_identity = _identity(root)
        self.ignore = {Path(folder).resolve() for folder in ignore}
        self.ignored: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def listdir(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """A folder's visible subfolders and image files, sorted by name."""
        try:
            with os.scandir(folder) as found:
                children = sorted(found, key=lambda child: child.name)
        except OSError as exc:
            raise DatasetError(f"cannot read folder {folder} ({exc.strerror}); fix: make it readable "
                               "or move it out of data.root") from None
        folders, images = [], []
        for child in children:
            if child.name.startswith(".") or child.name.casefold() in _JUNK:
                continue
            path = Path(child.path)
            kind, problem = _kind(child)
            if not _is_utf8(child.name):  # the cache, JSON and terminals all need text
                if kind == "folder" or path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.skipped.append((self.relpath(path), "the name is not valid UTF-8; fix: rename it"))
            elif kind == "folder":
                if path.resolve() not in self.ignore:
                    folders.append(path)
            elif kind == "file":
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(path)
                else:
                    self.ignored.append(self.relpath(path))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                self.skipped.append((self.relpath(path), problem))
        return folders, images

    def images_below(self, folder: Path, ancestors: frozenset | None = None) -> Iterator[Path]:
        """Images at any depth; symlinked folders are followed, but never back into an ancestor."""
        ancestors = ancestors or frozenset({self.root_identity})
        identity = _identity(folder)
        if identity in ancestors:
            return
        folders, images = self.listdir(folder)
        yield from images
        for sub in folders:
            yield from self.images_below(sub, ancestors | {identity})

    def dataset(self, layout: str, entries: list[ImageEntry]) -> Dataset:
        dataset = _make_dataset(self.root, layout, entries, sorted(self.ignored),
                                source=f"data.root folder {self.root}",
                                fix="point data.root at the folder holding your class or split folders")
        dataset.skipped, dataset.warnings = sorted(self.skipped), self.warnings
        return dataset


def _kind(child: os.DirEntry) -> tuple[str | None, str]:
    """What a folder entry is once symlinks are followed: "folder", "file", or None and why not."""
    try:
        if child.is_dir():
            return "folder", ""
        if child.is_file():
            return "file", ""
        os.stat(child.path)  # raises for a broken link or a link loop
        return None, "not a regular file (a pipe, socket or device); fix: move it out of data.root"
    except OSError as exc:
        return None, f"cannot read the file ({exc.strerror}); fix: repair or remove the link"


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
        return False


def shown(relpath: str) -> str:
    """A path as one printable line: undecodable bytes and control characters escaped."""
    text = relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _identity(folder: Path) -> tuple[int, int]:
    stat = folder.stat()
    return stat.st_dev, stat.st_ino


def _class_entries(scan: _Scan, folders: list[Path], split: str | None) -> list[ImageEntry]:
    entries = []
    for folder in folders:
        found = [ImageEntry(path, scan.relpath(path), folder.name, split) for path in scan.images_below(folder)]
        if not found:
            scan.warnings.append(f"class folder {scan.relpath(folder)}/ holds no images and is left out; "
                                 "fix: add images to it or remove it")
        entries += found
    return entries


def _split_folder_entries(scan: _Scan, folders: list[Path], loose: list[Path]) -> list[ImageEntry]:
    """Entries of `train/<class>/`, `val/<class>/` and `test/<class>/`, plus unlabeled images loose in test/."""
    _refuse_loose(loose, scan.root, "data.root", "a split folder such as train/<class>/")
    split_folders: dict[str, Path] = {}
    for folder in folders:
        split = _SPLIT_FOLDERS.get(folder.name.casefold())
        if split is None:
            raise DatasetError(f"{folder} is not a split folder (train, val or test) but lies beside them; fix: "
                               "move it out of data.root, or set data.layout = class_folders if these are classes")
        if split in split_folders:
            raise DatasetError(f"{split_folders[split]} and {folder} are both the {split} split; "
                               "fix: merge them into one folder")
        split_folders[split] = folder
    if "train" not in split_folders:
        raise DatasetError(f"{scan.root} has {' and '.join(f.name for f in split_folders.values())} folders but no "
                           "train folder; fix: add train/<class>/ folders with the images to train on")
    entries = []
    for split, folder in split_folders.items():
        classes, images = scan.listdir(folder)
        if split == "test":
            entries += [ImageEntry(path, scan.relpath(path), None, split) for path in images]
        else:
            _refuse_loose(images, folder, f"the {split} folder", f"{folder.name}/<class>/ (only test/ may hold "
                          "unlabeled images)")
        entries += _class_entries(scan, classes, split)
    return entries


def _refuse_loose(images: list[Path], folder: Path, where: str, destination: str) -> None:
    """Images outside any class folder have no label, which only the test split allows."""
    if images:
        raise DatasetError(f"{len(images)} image(s) lie directly in {where} {folder} (e.g. {images[0].name}), "
                           f"outside any class folder; fix: move them into {destination}")


def _from_map_files(map_files: Mapping[str, Path], allow_outside_root: bool) -> Dataset:
    """Entries listed in `path<TAB>label` map files: one for all images, or one per split."""
    if "all" in map_files and len(map_files) > 1:
        raise DatasetError("data.map_file and per-split maps (data.train_map, ...) are both set; "
                           "fix: use one map for all images or one map per split")
    if "all" not in map_files and "train" not in map_files:
        raise DatasetError("data.train_map is not set, but per-split maps need one; fix: set data.train_map")
    order = [key for key in ("all", *SPLITS) if key in map_files]
    root = Path(map_files[order[0]]).resolve().parent
    listed: dict[str, str] = {}  # relpath -> where it was listed, to refuse listing an image twice
    entries = [entry for key in order
               for entry in _read_map(key, Path(map_files[key]), root, allow_outside_root, listed)]
    source = f"map file(s) {', '.join(str(map_files[key]) for key in order)}"
    return _make_dataset(root, "map_file", entries, [], source=source, fix="add `path<TAB>label` lines, one per image")


def _read_map(key: str, map_file: Path, root: Path, allow_outside: bool,
              listed: dict[str, str]) -> Iterator[ImageEntry]:
    """One map file's entries; a path is relative to the map file's folder unless absolute.

    Fields are split at the first tab; a line with no tab is split at its last run of
    whitespace, so paths may contain spaces when the label has none.
    """
    setting = _MAP_SETTINGS[key]
    try:
        text = map_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read as UTF-8 text ({exc})"
        raise DatasetError(f"{setting}: map file {map_file} {reason}; fix: set {setting} to a "
                           "`path<TAB>label` text file") from None
    base = map_file.resolve().parent
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [part.strip() for part in line.split("\t", 1)] if "\t" in line else line.rsplit(None, 1)
        where = f"{map_file} line {number}"
        if len(fields) != 2 or not all(fields):
            raise DatasetError(f"{where}: expected `path<TAB>label`, got {line!r}; fix: add the label after a tab")
        name, label = fields
        path = Path(os.path.normpath(base / name))  # an absolute name replaces base
        if not (allow_outside or path.is_relative_to(base)):
            raise DatasetError(f"{where}: {name} lies outside the map file's folder {base}; fix: move the image "
                               "there, or set data.allow_outside_root = true if that is intended")
        if not path.is_file():
            raise DatasetError(f"{where}: image {name} does not exist; fix: correct the path or delete the line")
        relpath = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        if relpath in listed:
            raise DatasetError(f"{where}: {name} is already listed ({listed[relpath]}); fix: list each image once")
        listed[relpath] = where
        yield ImageEntry(path, relpath, label, None if key == "all" else key)


def _make_dataset(root: Path, layout: str, entries: list[ImageEntry], ignored: list[str], *, source: str,
                  fix: str) -> Dataset:
    """Sorts the entries and refuses a dataset a classifier cannot be trained on."""
    if not entries:
        raise DatasetError(f"no images in {source} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))}); fix: {fix}")
    classes = sorted({entry.label for entry in entries if entry.label is not None})
    if len(classes) < 2:
        found = ", ".join(map(repr, classes)) or "none"
        raise DatasetError(f"{source} has {len(classes)} class(es) ({found}) but a classifier needs at "
                           "least 2; fix: add a folder (or map label) for each class")
    return Dataset(root, layout, sorted(entries, key=lambda entry: entry.relpath), classes, ignored)

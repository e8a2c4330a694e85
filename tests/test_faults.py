"""Nothing lost: kill -9, a full disk, damaged caches, another setup's cache, edited and
conflicting images, transient read errors, and no pickle anywhere on the load path.

The kill trials run the real `python -m pipeline extract` (MobileNet 0.25, random weights)
and kill it at random moments; every write of the cache writer is also crashed and failed
one by one, in process, to cover the moments a random kill rarely hits.
"""

import ast
import errno
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import backbones, images, journal
from pipeline.cache import CacheWriter, FeatureCache, FileRecord, cache_path
from pipeline.cli import main
from pipeline.errors import CacheError
from pipeline.extract import run_extract
from pipeline.features import open_cache

from conftest import REPO, TRIAL_SEED, tiny_config, write_image
from pipeline_helpers import KeptExtractor, class_folders, cli_args, snapshot_around_writes, wait_for

FP = {"backbone": "test", "weights": "synthetic"}
DIM = 16


def content(path: Path, fingerprint: dict) -> dict:
    """Everything a cache says: key -> feature row, path -> key, failure key -> (path, reason)."""
    with FeatureCache(path, fingerprint) as cache:
        rows = cache.row_index()
        features = cache.read_features(list(rows.values()))
        return {"rows": dict(zip(rows, features)), "files": {p: r.key for p, r in cache.file_index().items()},
                "failures": cache.failures()}


def assert_part_of(part: dict, whole: dict, where: str) -> None:
    """Every row, index entry and failure in `part` is in `whole`, with the same value."""
    assert set(part["rows"]) <= set(whole["rows"]), where
    for key, row in part["rows"].items():
        np.testing.assert_allclose(row, whole["rows"][key], rtol=1e-5, atol=1e-6, err_msg=where)
    assert part["files"].items() <= whole["files"].items(), where
    assert part["failures"].items() <= whole["failures"].items(), where
    assert set(part["files"].values()) <= set(part["rows"]) | set(part["failures"]), f"{where}: index points nowhere"


def assert_same(one: dict, other: dict, where: str) -> None:
    assert_part_of(one, other, where)
    assert_part_of(other, one, where)


# --- every crash point and every failed write of the writer, in process ---------------------------

def _key(i: int) -> str:
    return f"{i:064x}"


def _batches():
    """Four commits of synthetic rows, index entries and a failure each."""
    rng = np.random.default_rng(0)
    for b in range(4):
        keys = [_key(100 * b + j) for j in range(3 + 7 * b)]
        yield (keys, rng.normal(size=(len(keys), DIM)).astype(np.float32),
               [(f"img/{'long name ' * 5}{k[-4:]}.jpg", FileRecord(1, 2, k, 3)) for k in keys],
               [(_key(10_000 + b), f"broken/{b}.jpg", "truncated image data")])


def _write_session(path: Path, record: bool = False) -> list[dict]:
    """Commit the batches, closing and reopening half-way, as two extract runs would;
    with `record`, the content before and after each commit."""
    states = [{"rows": {}, "files": {}, "failures": {}}]
    batches = list(_batches())
    for run in (batches[:2], batches[2:]):
        with CacheWriter(path, FP, DIM) as writer:
            done = writer.row_index()  # a rerun resumes after what an earlier failure kept
            for batch in run:
                if batch[0][0] not in done:
                    writer.commit(*batch)
                    if record:
                        states.append(content(path, FP))
    return states


def _equal(one: dict, other: dict) -> bool:
    return (one["files"] == other["files"] and one["failures"] == other["failures"]
            and one["rows"].keys() == other["rows"].keys()
            and all(np.array_equal(row, other["rows"][key]) for key, row in one["rows"].items()))


def test_a_crash_at_any_write_leaves_the_cache_as_after_a_complete_commit(tmp_path, monkeypatch):
    """Between any two writes of the cache or its journal, the files on disk are exactly what
    kill -9 would leave; each such state must open as a state after some complete commit."""
    path = tmp_path / "c.h5"
    crash_states = []

    def snapshot():
        files = (path, journal.journal_path(path))
        state = tuple(f.read_bytes() if f.exists() else None for f in files)
        if not crash_states or crash_states[-1] != state:
            crash_states.append(state)

    snapshot_around_writes(monkeypatch, snapshot, journal_methods=("truncate", "begin", "end"))
    committed = _write_session(path, record=True)
    monkeypatch.undo()
    assert len(crash_states) > 100
    for number, (cache_bytes, journal_bytes) in enumerate(crash_states):
        crashed = tmp_path / f"crash{number}" / "c.h5"
        crashed.parent.mkdir()
        crashed.write_bytes(cache_bytes)
        if journal_bytes is not None:
            journal.journal_path(crashed).write_bytes(journal_bytes)
        seen = content(crashed, FP)  # opening rolls back what the crash left half-done
        assert any(_equal(seen, state) for state in committed), f"crash point {number}: not a commit"
        assert not journal.journal_path(crashed).exists()
        if number % 10:
            continue
        with CacheWriter(crashed, FP, DIM) as writer:  # and it resumes
            writer.commit([_key(99_999)], np.ones((1, DIM), np.float32), [("new.jpg", FileRecord(1, 1, _key(99_999)))])
        assert _key(99_999) in content(crashed, FP)["rows"]


def test_a_write_error_at_any_write_is_one_clear_error_and_keeps_every_commit(tmp_path, monkeypatch):
    """Disk full at any single write: the commit in flight is undone, the ones before are kept."""
    write_all, writes = journal._write_all, []

    def full_at(failing):
        def write(handle, data):
            writes.append(len(data))
            if len(writes) - 1 == failing:
                raise OSError(errno.ENOSPC, "No space left on device")
            write_all(handle, data)
        return write

    monkeypatch.setattr(journal, "_write_all", full_at(None))
    committed = _write_session(tmp_path / "reference.h5", record=True)
    total = len(writes)
    assert total > 50
    for failing in range(0, total, max(1, total // 25)):
        path = tmp_path / f"full{failing}" / "c.h5"
        path.parent.mkdir()
        writes.clear()
        monkeypatch.setattr(journal, "_write_all", full_at(failing))
        with pytest.raises(CacheError) as error:
            _write_session(path)
        message = str(error.value)
        assert "\n" not in message and "(No space left on device); every batch committed before is kept" in message
        assert any(_equal(content(path, FP), state) for state in committed), f"write {failing}: not a commit"
        monkeypatch.setattr(journal, "_write_all", write_all)
        _write_session(path)  # rerun: complete, and equal to a run that never failed
        assert _equal(content(path, FP), committed[-1])


def test_a_journal_left_by_a_deleted_cache_is_never_rolled_back_onto_a_fresh_one(tmp_path, tiny_dataset, monkeypatch,
                                                                                caplog):
    """A user deletes a half-committed cache by hand and leaves its journal: the next extract makes a
    fresh file, and the journal, written for the deleted one, is discarded with one warning."""
    config = tiny_config(tmp_path, tiny_dataset, **{"backbone.batch_size": 4})
    kept, end = [], journal.JournaledFile.end

    def keeping_the_journal(self):  # the journal of a late commit, as a kill just before its end leaves it
        kept.append(journal.journal_path(self.path).read_bytes())
        end(self)

    monkeypatch.setattr(journal.JournaledFile, "end", keeping_the_journal)
    path = run_extract(config, progress=False, make_extractor=KeptExtractor).cache_path
    monkeypatch.undo()
    clean = content(path, backbones.fingerprint(config))
    stale = max(kept[:-1], key=len)  # a commit's journal, full of that file's old bytes
    path.unlink()
    journal.journal_path(path).write_bytes(stale)
    caplog.clear()
    summary = run_extract(config, progress=False, make_extractor=KeptExtractor)
    assert summary.extracted == 24 and not journal.journal_path(path).exists()
    assert_same(content(path, backbones.fingerprint(config)), clean, "fresh extract beside a stale journal")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{journal.journal_path(path)} was left by an unfinished update of another file, since deleted or replaced; "
        f"it is discarded, and {path.name} is left as it is"]


# --- kill -9 at random moments of a real extract ---------------------------------------------------

KILL_TRIALS = 10


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two classes of 60 small photos and two broken files, so that commits carry failures too."""
    root = class_folders(tmp_path_factory.mktemp("kill") / "photos", "{label} {i:03d}.png", 1000, wolf=60, sheep=60)
    (root / "wolf" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (root / "sheep" / "empty.png").write_bytes(b"")
    return root


def _config(tmp_path: Path, root: Path, cache_dir: Path):
    return tiny_config(tmp_path, root, **{"cache.dir": str(cache_dir), "backbone.batch_size": 2})


def _kill_at_random_moment(config, rng: random.Random, window: list[float], log: Path) -> str:
    """Start a real extract and SIGKILL it: mostly while it extracts, sometimes while it starts up
    (which, after an earlier kill, includes rolling back what that kill left).

    `window` holds how long extracting takes; a run from scratch that ends before its kill shortens it.
    """
    path = cache_path(config.cache.dir, config.dataset_name, backbones.fingerprint(config))
    from_scratch = not path.exists()
    with open(log, "ab") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--no-progress", *cli_args(config)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: path.exists() or process.poll() is not None)
        if rng.random() < 0.25:
            phase, delay = "starting", rng.uniform(0, 1.5)
        else:
            size = path.stat().st_size if path.exists() else 0
            wait_for(lambda: not path.exists() or path.stat().st_size != size or process.poll() is not None)
            phase, delay = "extracting", rng.uniform(0, window[0])
        started = time.monotonic()
        while time.monotonic() < started + delay and process.poll() is None:
            time.sleep(0.002)
        if process.poll() is not None:
            assert process.returncode == 0, log.read_text()[-2000:]
            if phase == "extracting" and from_scratch:
                window[0] = min(window[0], 0.8 * (time.monotonic() - started))
            return "finished first"
        process.kill()
        return f"killed while {phase}, {delay:.2f} s in"
    finally:
        process.kill()
        process.wait()


def test_kill_9_at_random_moments_during_a_real_extract(tmp_path, photos):
    clean_config = _config(tmp_path, photos, tmp_path / "clean")
    summary = run_extract(clean_config, progress=False, make_extractor=KeptExtractor)
    fp = backbones.fingerprint(clean_config)
    clean = content(summary.cache_path, fp)
    assert len(clean["rows"]) == 120 and len(clean["failures"]) == 2
    seed = TRIAL_SEED
    trials, window = [], [summary.seconds]

    def worker(lane: int) -> None:
        """Kills follow each other on one cache, so later ones also hit a resuming extract."""
        rng = random.Random(seed + lane)
        config = _config(tmp_path, photos, tmp_path / f"lane{lane}")
        path = cache_path(config.cache.dir, config.dataset_name, fp)
        for attempt in range(KILL_TRIALS):
            if len([t for t in trials if t[2].startswith("killed")]) >= KILL_TRIALS:
                return
            outcome = _kill_at_random_moment(config, rng, window, tmp_path / f"lane{lane}.log")
            if outcome == "finished first":
                path.unlink()  # start afresh
                continue
            left = tmp_path / f"kill{lane}-{attempt}"  # what the kill left, checked later; the lane goes on
            left.mkdir()
            for file in (path, journal.journal_path(path)):
                if file.exists():
                    shutil.copy(file, left / file.name)
            trials.append((left, path.name, outcome))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(worker, range(2)))
    killed = [t for t in trials if t[2].startswith("killed")]
    assert len(killed) >= KILL_TRIALS, (f"PIPELINE_TEST_SEED={seed}", [t[2] for t in trials])
    for left, name, outcome in killed:
        where = f"PIPELINE_TEST_SEED={seed}, {left.name}: {outcome}"
        if (left / name).exists():  # else it was killed before creating the file
            assert_part_of(content(left / name, fp), clean, where)  # opens; every committed row is right
        resumed = run_extract(_config(tmp_path, photos, left), progress=False, make_extractor=KeptExtractor)
        assert_same(content(resumed.cache_path, fp), clean, where)


# --- a full disk during a real extract -----------------------------------------------------------

def test_disk_full_during_extract_is_one_clear_error_and_a_rerun_completes(tmp_path, capsys):
    """The file size limit (RLIMIT_FSIZE) makes the kernel refuse writes past it, as a full disk does."""
    root = tmp_path / "long names"
    class_folders(root, "a rather long file name " * 7 + "{i:02d}.png", 300, wolf=24, sheep=24)
    clean_config = tiny_config(tmp_path, root, **{"cache.dir": str(tmp_path / "clean"), "backbone.batch_size": 4})
    clean_summary = run_extract(clean_config, progress=False, make_extractor=KeptExtractor)
    fp = backbones.fingerprint(clean_config)
    clean = content(clean_summary.cache_path, fp)
    # one execution path: the limit applies to every write of the process, and a runtime converting
    # the model to its own files in the trial would hit it too (and be dropped, with a warning of its own)
    config = tiny_config(tmp_path, root, **{"cache.dir": str(tmp_path / "full"), "backbone.batch_size": 4})
    one_path = ("backbone.runtime=tensorflow", "backbone.compile=graph")
    # the file outgrows this limit when its string heap grows, a few batches in
    limit = clean_summary.cache_path.stat().st_size - 2048
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    capsys.readouterr()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        status = main(["extract", "--no-progress", *cli_args(config, *one_path)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error.startswith("error: could not write ") and "(File too large)" in error and "\n" not in error
    assert "every batch committed before is kept; fix: free disk space" in error
    path = cache_path(config.cache.dir, config.dataset_name, fp)
    assert not journal.journal_path(path).exists()  # the half-written commit was undone at once
    kept = content(path, fp)
    assert 0 < len(kept["rows"]) < len(clean["rows"])
    assert_part_of(kept, clean, "after the disk filled up")
    assert main(["extract", "--no-progress", *cli_args(config)]) == 0
    assert_same(content(path, fp), clean, "rerun after freeing space")


# --- damaged caches --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("damage")
    root = class_folders(tmp_path / "tiny", cat=8, dog=8, owl=8)
    config = tiny_config(tmp_path, root)
    return config, run_extract(config, progress=False, make_extractor=KeptExtractor).cache_path


def _feature_chunk_offset(path: Path) -> int:
    with h5py.File(path, "r", locking=False) as f:
        return f["rows/feature"].id.get_chunk_info(0).byte_offset


DAMAGE = {
    "truncated to half": lambda data, path: data[: len(data) // 2],
    "truncated to its first 200 bytes": lambda data, path: data[:200],
    "cut to zero bytes": lambda data, path: b"",
    "zeroed by a power cut": lambda data, path: bytes(len(data)),
    "overwritten with text": lambda data, path: b"not an HDF5 file at all\n" * 100,
    "a flipped byte in the features": lambda data, path: _flip(data, _feature_chunk_offset(path) + 1000),
}


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1:]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_one_clear_error_and_rebuild_recovers(tmp_path, extracted, damage, capsys):
    config, original = extracted
    damaged = tmp_path / "cache" / original.name
    damaged.parent.mkdir()
    damaged.write_bytes(DAMAGE[damage](original.read_bytes(), original))
    args = cli_args(tiny_config(tmp_path, Path(config.data.root)))
    capsys.readouterr()
    assert main(["train", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: cache file {damaged} is damaged") and "\n" not in error
    assert error.endswith("fix: run extract with --rebuild to start it afresh")
    if damage == "truncated to half":  # the documented recovery, end to end
        assert main(["extract", "--no-progress", "--rebuild", *args]) == 0
        assert main(["train", *args]) == 0


# --- another setup's cache ------------------------------------------------------------------------

def test_a_cache_made_with_another_setup_is_kept_apart_or_refused(tmp_path, extracted, monkeypatch, capsys):
    config, made = extracted
    variants = {"as made": {}, "another backbone": {"backbone.name": "mobilenet_v2", "backbone.alpha": 0.35},
                "another width": {"backbone.alpha": 0.5}, "other weights": {"backbone.seed": 1},
                "another input size and preprocessing": {"backbone.name": "resnet50"},
                "another precision": {"backbone.precision": "bfloat16"}, "float16 rows": {"cache.dtype": "float16"}}
    args = cli_args(config)
    paths = {}
    for name, overrides in variants.items():
        variant = tiny_config(tmp_path, Path(config.data.root), **overrides, **{"cache.dir": config.cache.dir})
        paths[name] = cache_path(variant.cache.dir, variant.dataset_name, backbones.fingerprint(variant))
    monkeypatch.setattr(images, "DECODE_ID", images.DECODE_ID + "+another resize")
    paths["another decoding"] = cache_path(config.cache.dir, config.dataset_name, backbones.fingerprint(config))
    monkeypatch.undo()
    assert paths["as made"] == made
    assert len(set(paths.values())) == len(paths)  # every setup has a file of its own
    other = paths["other weights"]
    shutil.copy(made, other)  # a file under another setup's name: refused, never mixed
    capsys.readouterr()
    assert main(["train", *args, "--set", "backbone.seed=1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {other} was made with another backbone setup") and "\n" not in error
    assert "refusing to mix features; fix: run extract with --rebuild" in error
    with pytest.raises(CacheError, match="another backbone setup"):
        CacheWriter(other, backbones.fingerprint(tiny_config(tmp_path, Path(config.data.root), **{"backbone.seed": 1})))
    other.unlink()


# --- images that change ---------------------------------------------------------------------------

def test_an_image_edited_in_place_is_extracted_again_even_with_size_and_mtime_kept(tmp_path, tiny_dataset):
    """As `exiftool -P` or `cp -p` leave it: new bytes, same size, same mtime."""
    photo = write_image(tiny_dataset / "cat" / "photo.bmp", seed=1, fmt="BMP")
    config = tiny_config(tmp_path, tiny_dataset)
    assert run_extract(config, progress=False, make_extractor=KeptExtractor).extracted == 25
    before = photo.stat()
    write_image(photo, seed=2, fmt="BMP")
    os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (photo.stat().st_size, photo.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    summary = run_extract(config, progress=False, make_extractor=KeptExtractor)
    assert summary.extracted == 1
    pixels = images.decode_image(photo.read_bytes(), 224)
    with open_cache(config) as cache:
        record = cache.file_index()["cat/photo.bmp"]
        assert record.key == images.content_hash(photo.read_bytes())
        stored = cache.read_features([cache.row_index()[record.key]])[0]
    np.testing.assert_allclose(stored, KeptExtractor(config.backbone)(pixels[None])[0], rtol=1e-5, atol=1e-5)


def test_a_cache_indexed_before_ctime_was_recorded_is_upgraded_without_extracting_again(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset)
    path = run_extract(config, progress=False, make_extractor=KeptExtractor).cache_path
    with h5py.File(path, "r+") as old:  # the layout before /files/ctime_ns
        del old["files/ctime_ns"]
    with open_cache(config) as cache:  # an old file reads, and asks for extract (its entries match no file)
        assert {record.ctime_ns for record in cache.file_index().values()} == {-1}
    summary = run_extract(config, progress=False, make_extractor=KeptExtractor)
    assert (summary.extracted, summary.reused) == (0, 24)  # re-hashed, never re-extracted
    with open_cache(config) as cache:
        assert len(cache.row_index()) == 24 and -1 not in {r.ctime_ns for r in cache.file_index().values()}


def test_the_same_image_under_two_classes_is_reported_as_a_label_conflict(tmp_path, tiny_dataset, capsys):
    shutil.copy(tiny_dataset / "cat" / "cat_3.png", tiny_dataset / "dog" / "not really a dog.png")
    config = tiny_config(tmp_path, tiny_dataset)
    conflict = ("label conflict: one image is filed as cat/cat_3.png (cat) and dog/not really a dog.png (dog); "
                "it is left out of training; fix: delete the wrong copy")
    assert run_extract(config, progress=False, make_extractor=KeptExtractor).warnings == [conflict]
    capsys.readouterr()
    assert main(["train", *cli_args(config)]) == 0
    assert capsys.readouterr().err.splitlines() == [f"warning: {conflict}"]
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    assert json.loads((run / "run.json").read_text())["label_conflicts"] == [conflict]
    used = {json.loads(line)["image"] for line in (run / "samples.jsonl").read_text().splitlines()}
    assert len(used) == 23 and not used & {"cat/cat_3.png", "dog/not really a dog.png"}


def test_a_transient_read_error_is_recorded_and_tried_again_on_the_next_run(tmp_path, tiny_dataset, monkeypatch):
    """An I/O error (a network share, a failing disk) changes nothing about the file: the next run reads it again."""
    flaky = tiny_dataset / "owl" / "owl_5.png"
    read_bytes = Path.read_bytes

    def failing_once(self):
        if self == flaky:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", failing_once)
    config = tiny_config(tmp_path, tiny_dataset)
    summary = run_extract(config, progress=False, make_extractor=KeptExtractor)
    assert summary.failed == [("owl/owl_5.png", "cannot read the file (Input/output error)")]
    monkeypatch.undo()
    summary = run_extract(config, progress=False, make_extractor=KeptExtractor)
    assert (summary.extracted, summary.failed) == (1, [])


# --- no pickle on any load path -------------------------------------------------------------------

PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Imports of pickling modules, and calls that would unpickle or run stored code. A function of
    our own named `load_model` is not Keras': only Keras' (by attribute, or imported by name) is checked."""
    found = []
    keras_names = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").split(".")[0] in ("keras", "tensorflow") for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {name}" for name in names if name and name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            flags = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
            if flags.get("allow_pickle") == "True" or flags.get("safe_mode") == "False":
                found.append(ast.unparse(node))
            if called.endswith(("np.load", "numpy.load")) and "allow_pickle" not in flags:
                found.append(f"{ast.unparse(node)} (np.load without allow_pickle=False)")
            keras_load = called.endswith(".load_model") or called in keras_names and called == "load_model"
            if (called.endswith(("read_pickle", "torch.load")) or keras_load) and "safe_mode" not in flags:
                found.append(ast.unparse(node))
    return found


def test_nothing_on_any_load_path_can_unpickle(tmp_path, tiny_dataset):
    planted = ast.parse("import pickle\nfrom joblib import load\nnp.load(f)\nnp.load(f, allow_pickle=True)\n"
                        "keras.saving.load_model(p, safe_mode=False)\nkeras.saving.load_model(p)\n"
                        "from keras.models import load_model\nload_model(p)")
    assert len(_unsafe_loads(planted)) == 7  # the scan finds what it looks for
    sources = sorted((REPO / "pipeline").rglob("*.py"))
    assert len(sources) > 10
    found = {str(path.relative_to(REPO)): hits for path in sources
             if (hits := _unsafe_loads(ast.parse(path.read_text(encoding="utf-8"))))}
    assert found == {}
    config = tiny_config(tmp_path, tiny_dataset)  # and what train writes is plain data
    run_extract(config, progress=False, make_extractor=KeptExtractor)
    assert main(["train", *cli_args(config)]) == 0
    assert main(["train", *cli_args(config), "--set", "head.kind=dense", "--set", "head.dense.epochs=2"]) == 0
    artefacts = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in artefacts} >= {".h5", ".keras", ".json", ".jsonl", ".toml"}
    for artefact in artefacts:
        blobs = ([zipfile.ZipFile(artefact).read(name) for name in zipfile.ZipFile(artefact).namelist()]
                 if zipfile.is_zipfile(artefact) else [artefact.read_bytes()])
        for blob in blobs:  # a pickle starts with the PROTO opcode 0x80 and its version
            assert not (len(blob) > 1 and blob[0] == 0x80 and blob[1] in range(2, 6)), artefact

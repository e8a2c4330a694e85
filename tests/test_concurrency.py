"""Two extracts on one cache, and train or report while extract writes (real subprocesses).

A second extract fails at once and names the process that is writing; it never
interleaves its batches with the first one's. Readers hold a shared lock while they have
the cache open and the writer takes it for each commit, so a reader sees one committed
state from open to close, and the writer says so when it has to wait for one.
"""

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import backbones
from pipeline.cache import CacheWriter, FeatureCache, cache_path
from pipeline.cli import main
from pipeline.extract import run_extract

from conftest import REPO, tiny_config, write_image
from pipeline_helpers import KeptExtractor, class_folders, cli_args, wait_for


def _start_extract(config, log: Path) -> subprocess.Popen:
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--no-progress", *cli_args(config)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)


@contextlib.contextmanager
def _paused_between_commits(process: subprocess.Popen, path: Path):
    """SIGSTOP the writer where it holds no commit lock (a shared lock on the cache is free), then SIGCONT."""
    with open(path, "rb") as probe:
        while True:
            process.send_signal(signal.SIGSTOP)
            while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "TtZX":
                time.sleep(0.001)  # the stop has landed
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(probe, fcntl.LOCK_UN)
                break
            except BlockingIOError:  # stopped inside a commit: let it finish that one
                process.send_signal(signal.SIGCONT)
                time.sleep(0.002)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def _scores(run: Path) -> dict:
    """The report's metrics, less how long things took."""
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    metrics["context"].pop("seconds", None)
    return metrics


def _snapshot(path: Path, fingerprint: dict) -> tuple[dict, dict]:
    with FeatureCache(path, fingerprint) as cache:
        rows = cache.row_index()
        files = {p: r.key for p, r in cache.file_index().items()}
        return dict(zip(rows, cache.read_features(list(rows.values())))), files


def test_a_second_extract_fails_at_once_naming_the_first(tmp_path, tiny_dataset, capsys):
    config = tiny_config(tmp_path, tiny_dataset)
    path = cache_path(config.cache.dir, config.dataset_name, backbones.fingerprint(config))
    lock = path.with_name(path.name + ".lock")
    log = tmp_path / "first.log"
    first = _start_extract(config, log)
    try:
        wait_for(lambda: lock.exists() and lock.read_text() == f"pid {first.pid} on {socket.gethostname()}",
                 process=first, log=log)
        first.send_signal(signal.SIGSTOP)  # it holds the cache for as long as the second one tries
        capsys.readouterr()
        assert main(["extract", "--no-progress", *cli_args(config)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: {path} is being written by pid {first.pid} on {socket.gethostname()}; fix: wait for that "
            "extract to finish or stop it, then run again"]
        first.send_signal(signal.SIGCONT)
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, log.read_text()[-2000:]
    assert "24 images: 24 extracted" in out
    rows, files = _snapshot(path, backbones.fingerprint(config))
    assert len(rows) == 24 and set(files.values()) == set(rows)  # each image once: nothing interleaved


def test_train_and_report_read_a_consistent_snapshot_while_extract_writes(tmp_path, capsys):
    root = tmp_path / "farm"
    class_folders(root, "{i:02d}.png", wolf=12, sheep=12)
    config = tiny_config(tmp_path, root, **{"backbone.batch_size": 2})
    fp = backbones.fingerprint(config)
    path = cache_path(config.cache.dir, config.dataset_name, fp)
    run_extract(config, progress=False, make_extractor=KeptExtractor)
    args = cli_args(config)
    assert main(["train", *args]) == 0 and main(["report", *args]) == 0
    (run,) = (tmp_path / "runs" / "farm").iterdir()
    reported = _scores(run)
    before, _ = _snapshot(path, fp)
    for c, label in enumerate(("wolf", "sheep")):
        for i in range(12, 72):
            write_image(root / label / f"{i:02d}.png", seed=100 * c + i)

    log = tmp_path / "extract.log"
    reader = FeatureCache(path, fp)  # a reader has the file open: the writer waits for it, and says so
    writer = _start_extract(config, log)
    try:
        wait_for(lambda: "waiting for readers of" in log.read_text(), process=writer, log=log)
        reader.close()
        snapshots = []
        while True:  # certainly half-way: the writer stopped between two commits, some of the new rows in
            with _paused_between_commits(writer, path):
                rows, files = _snapshot(path, fp)
                if len(rows) > len(before):
                    snapshots.append((rows, files))
                    capsys.readouterr()
                    assert main(["train", *args]) == 2
                    assert "are new or changed since the last extract" in capsys.readouterr().err
                    assert main(["report", *args, "--run", str(run)]) == 0 and _scores(run) == reported
                    break
            time.sleep(0.02)
        assert len(before) < len(snapshots[0][0]) < len(before) + 120
        while writer.poll() is None:  # and whenever the scheduler lets the readers in
            rows, files = _snapshot(path, fp)
            snapshots.append((rows, files))
            capsys.readouterr()
            status = main(["train", *args])  # refuses the half-extracted dataset, in one line
            error = capsys.readouterr().err
            assert status == 0 or error.startswith("error: ") and "are new or changed since the last extract" in error
            assert main(["report", *args, "--run", str(run)]) == 0  # reports the trained run exactly as before
            assert _scores(run) == reported
            time.sleep(0.05)  # leave the writer room between readers
        assert writer.wait() == 0, log.read_text()[-2000:]
    finally:
        writer.kill()
        writer.wait()
    final, final_files = _snapshot(path, fp)
    assert len(final) == len(before) + 120
    counts = [len(rows) for rows, _ in snapshots]
    assert counts == sorted(counts)
    for rows, files in snapshots:  # each one a committed state: rows right, index entries pointing at rows
        assert set(files.values()) <= set(rows)
        for key, row in rows.items():
            np.testing.assert_allclose(row, final[key], rtol=1e-5, atol=1e-6)
    assert main(["train", *args]) == 0


def test_a_forked_child_never_keeps_the_writers_or_readers_locks(tmp_path):
    """OpenVINO's telemetry forks a child while converting a model; a writer killed meanwhile left
    its cache locked ("being written by" the dead writer) for as long as that child lived."""
    path, fp = tmp_path / "c.h5", {"backbone": "mobilenet", "weights": "random:seed=0", "input_size": 224}
    writer = CacheWriter(path, fp)
    ready, release = os.pipe()
    child = os.fork()
    if child == 0:  # holds whatever it inherited until the parent lets it go; does nothing else
        os.close(release)
        os.read(ready, 1)
        os._exit(0)
    os.close(ready)
    try:
        writer.close()
        with FeatureCache(path, fp):  # readers open it
            pass
        with CacheWriter(path, fp):  # the writer's lock is free although the child still lives
            pass
        assert os.waitpid(child, os.WNOHANG) == (0, 0), "the child was alive throughout"
    finally:
        os.close(release)
        os.waitpid(child, 0)

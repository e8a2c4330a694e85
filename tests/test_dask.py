"""Extract on a real local Dask cluster (spawned worker processes, MobileNet 0.25, random
weights) gives the local extract's cache; a killed worker or a killed driver loses nothing.

One cluster of two workers serves the tests that join an existing cluster (`--address`);
the killed-driver test lets extract start its own local cluster, as a user's run does.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import FeatureCache
from pipeline.extract import run_extract

from conftest import REPO, tiny_config, write_image
from pipeline_helpers import cli_args

distributed = pytest.importorskip("distributed")  # in the `test` extra: CI always has it

CLASSES = ("cat", "dog", "owl", "fox")
UNIQUE_PER_CLASS = 46


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """About 200 images: 184 distinct, 8 copies under other names, and 6 that cannot be decoded."""
    root = tmp_path_factory.mktemp("dask") / "photos"
    for c, name in enumerate(CLASSES):
        for i in range(UNIQUE_PER_CLASS):
            write_image(root / name / f"{name}_{i}.png", seed=1000 * c + i)
        for i in range(2):
            shutil.copy(root / name / f"{name}_{i}.png", root / name / f"copy of {name}_{i}.png")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("not an image")
    (root / "owl" / "truncated.png").write_bytes((root / "owl" / "owl_3.png").read_bytes()[:80])
    (root / "fox" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "fox" / "page.png").write_text("<html></html>")
    (root / "cat" / "half.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    return root


def content(path: Path) -> dict:
    with FeatureCache(path) as cache:
        rows = cache.row_index()
        features = cache.read_features(list(rows.values()))
        return {"rows": dict(zip(rows, features)), "files": {p: r.key for p, r in cache.file_index().items()},
                "failures": cache.failures()}


def assert_same_cache(got: dict, expected: dict) -> None:
    assert got["rows"].keys() == expected["rows"].keys()
    for key, row in expected["rows"].items():  # the tolerance between XLA and the plain graph
        np.testing.assert_allclose(got["rows"][key], row, rtol=1e-4, atol=1e-4)
    assert got["files"] == expected["files"]
    assert got["failures"] == expected["failures"]


@pytest.fixture(scope="module")
def local_cache(photos, tmp_path_factory) -> dict:
    """What the local extract writes for `photos`: the reference."""
    tmp = tmp_path_factory.mktemp("local")
    summary = run_extract(tiny_config(tmp, photos), progress=False)
    assert summary.extracted == len(CLASSES) * UNIQUE_PER_CLASS and len(summary.failed) == 6
    return content(summary.cache_path)


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of two spawned worker processes, as `dask worker` would start them."""
    import dask

    # one task at a time per worker, and a task that its worker died running twice has failed:
    # a worker killed mid-shard then suspects that shard alone, and a doomed shard fails fast
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn",
                          "distributed.scheduler.worker-saturation": 1.0,
                          "distributed.scheduler.allowed-failures": 1}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                      silence_logs=40) as cluster, distributed.Client(cluster) as client:
            yield cluster, client


def dask_config(tmp_path, photos, cluster, **settings):
    return tiny_config(tmp_path, photos, **{"extract.engine": "dask", "extract.shard_size": 16,
                                            "extract.address": cluster[0].scheduler_address, **settings})


def test_a_dask_cluster_writes_the_local_extracts_cache_and_builds_the_model_once_per_worker(
        tmp_path, photos, local_cache, cluster):
    from pipeline.dask_worker import PLUGIN_NAME

    summary = run_extract(dask_config(tmp_path, photos, cluster), progress=False)
    assert (summary.extracted, len(summary.failed), summary.failed_shards) == (len(local_cache["rows"]), 6, [])
    assert_same_cache(content(summary.cache_path), local_cache)
    builds = cluster[1].run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].builds)
    assert sorted(builds.values()) == [1, 1], builds
    assert not list(summary.cache_path.parent.glob("*.shards/*")), "merged shard files are deleted"

    # an unchanged dataset starts no cluster: neither Dask nor TensorFlow is even imported
    code = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "assert not {'tensorflow', 'dask', 'distributed'} & set(sys.modules), 'imported'; sys.exit(rc)")
    args = ["extract", "--no-progress", "--engine", "dask", "--address", "tcp://127.0.0.1:9",
            *cli_args(tiny_config(tmp_path, photos))]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"0 extracted, {len(local_cache['files'])} already cached" in result.stdout


def test_a_worker_killed_mid_shard_loses_nothing(tmp_path, photos, local_cache, cluster):
    """The shard's temporary file names the worker's pid: kill that worker while it writes."""
    config = dask_config(tmp_path, photos, cluster)
    shards = tmp_path / "cache"
    killed = []

    def kill_a_worker_mid_shard():
        deadline = time.monotonic() + 600
        while not killed and time.monotonic() < deadline:
            for part in shards.glob("*.shards/*.part"):
                pid = int(part.name.rsplit("-", 1)[1].split(".")[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_mid_shard, daemon=True)
    killer.start()
    summary = run_extract(config, progress=False)
    killer.join()
    assert killed, "no worker was caught mid-shard"
    assert summary.failed_shards == []
    assert_same_cache(content(summary.cache_path), local_cache)


def test_a_killed_driver_is_resumed_by_the_rerun_which_skips_finished_shards(tmp_path, photos, local_cache, cluster):
    """`python -m pipeline extract --engine dask` with its own local cluster, killed once some
    shards are merged; the rerun (on the shared cluster) computes only what is missing."""
    config = tiny_config(tmp_path, photos)
    args = [sys.executable, "-m", "pipeline", "extract", "--no-progress", "--engine", "dask",
            *cli_args(config, "extract.shard_size=16", "extract.dask_workers=2")]
    driver = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    cache_file = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            cache_file = next((tmp_path / "cache").glob("*.h5"), None)
            if cache_file is not None and _rows(cache_file) >= 32:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:  # its cluster's processes go too, as on a machine that lost the driver
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    merged = _rows(cache_file)
    assert 32 <= merged < len(local_cache["rows"])
    summary = run_extract(dask_config(tmp_path, photos, cluster), progress=False)
    assert merged + summary.extracted == len(local_cache["rows"])
    assert_same_cache(content(summary.cache_path), local_cache)


class DiesOnOneShard(distributed.WorkerPlugin):
    """Kills its worker process each time one shard starts there, as a decoder crashing on one of
    its files or a shard running its worker out of memory would. The doomed shard is the first
    one any worker starts; its task key is kept in a symlink, created atomically, so that the
    restarted workers (which get this plugin again) know it too."""

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or not str(key).startswith("extract-shard-"):
            return
        with contextlib.suppress(FileExistsError):
            os.symlink(str(key), self.marker)
        if os.readlink(self.marker) == str(key):
            os._exit(1)


def test_a_shard_that_keeps_failing_is_named_with_its_files_while_the_others_merge_and_the_rerun_retries_it(
        tmp_path, photos, local_cache, cluster):
    client = cluster[1]
    marker = tmp_path / "doomed shard"
    config = dask_config(tmp_path, photos, cluster, **{"extract.shard_size": 8})
    client.register_plugin(DiesOnOneShard(str(marker)), name="dies-on-one-shard")
    try:
        summary = run_extract(config, progress=False)
    finally:
        client.unregister_worker_plugin("dies-on-one-shard")
    got = content(summary.cache_path)
    missing = set(local_cache["files"]) - set(got["files"])
    assert 0 < len(missing) <= 8
    assert got["files"] == {path: key for path, key in local_cache["files"].items() if path not in missing}
    [line] = summary.failed_shards
    doomed = os.readlink(marker).removeprefix("extract-shard-")
    assert "\n" not in line and line.startswith(f"shard {doomed} (its worker died")
    assert set(line.split(f"its {len(missing)} image(s): ", 1)[1].split(", ")) == missing
    assert "1 shard(s) kept failing; every other shard was merged" in summary.describe()
    assert not list(summary.cache_path.parent.glob("*.shards/*")), "the merged shards' files are deleted"

    rerun = run_extract(config, progress=False)
    assert rerun.failed_shards == [] and rerun.extracted == len(local_cache["rows"]) - len(got["rows"]) > 0
    assert_same_cache(content(rerun.cache_path), local_cache)


def _rows(path: Path) -> int:
    try:
        with FeatureCache(path) as cache:
            return len(cache.row_index())
    except Exception:  # not written yet
        return 0


def test_a_worker_whose_weights_differ_from_the_fingerprint_refuses_in_one_line_naming_its_host(tmp_path, photos):
    import socket

    from pipeline import backbones
    from pipeline.dask_worker import ExtractorPlugin, WorkerRefused

    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"the driver's weights")
    config = tiny_config(tmp_path, photos, **{"backbone.weights": str(weights)})
    fingerprint = backbones.fingerprint(config)
    weights.write_bytes(b"another version on this worker")
    with pytest.raises(WorkerRefused) as refused:
        ExtractorPlugin(config, fingerprint, {}).get_extractor()
    message = str(refused.value)
    assert "\n" not in message and socket.gethostname() in message and "sha256=" in message

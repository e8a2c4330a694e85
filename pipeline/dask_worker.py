"""What runs inside a Dask worker: the backbone, built once per worker process, and the shard task.

Imported by `dask_engine` only once there is work, and unpickled on the workers, which need
this package, Dask and the weights file (see README, "Running on a cluster").
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

from distributed import WorkerPlugin, get_worker

from . import backbones
from .config import Config
from .errors import PipelineError
from .execution import set_tensorflow_threads
from .shards import KnownKeys, Shard, ShardResult, run_shard

PLUGIN_NAME = "bottleneck-pipeline-extractor"


class WorkerRefused(PipelineError):
    """A worker whose backbone would not give the fingerprint's numbers (another weights file)."""


class ExtractorPlugin(WorkerPlugin):
    """Holds one worker's backbone. It is built on the worker's first shard, after checking that
    the worker's weights file has the fingerprint's SHA-256, with TensorFlow's threads set to
    the worker's share of its host's cores (`workers_per_host`, counted by the driver)."""

    def __init__(self, config: Config, fingerprint: dict, workers_per_host: dict[str, int]):
        self.config = config
        self.fingerprint = fingerprint
        self.workers_per_host = workers_per_host
        self.extractor = None
        self.builds = 0
        self.host = socket.gethostname()
        self.threads = 1

    def setup(self, worker) -> None:
        self.host = socket.gethostname()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        worker_host = worker.address.rsplit(":", 1)[0].split("://")[-1]
        self.threads = max(1, cores // max(1, self.workers_per_host.get(worker_host, 1)))

    def get_extractor(self):
        if self.extractor is None:
            self._check_weights()
            set_tensorflow_threads(intra_op=self.threads, inter_op=min(2, self.threads))
            self.extractor = backbones.FeatureExtractor(self.config.backbone, cache_dir=self.config.cache.dir)
            self.builds += 1
        return self.extractor

    def _check_weights(self) -> None:
        expected = self.fingerprint
        try:
            here = backbones.fingerprint(self.config)
            reason = "its ImageNet weights file is missing"
        except PipelineError as exc:  # e.g. the weights file named in the config is not on this host
            here, reason = None, str(exc)
        if here == expected:
            return
        if here is not None and here["weights"] != expected["weights"]:
            reason = f"its weights are {here['weights']}, the cache's fingerprint says {expected['weights']}"
        elif here is not None:
            reason = "its setup differs: " + ", ".join(f"{key} {here.get(key)!r} (driver: {expected.get(key)!r})"
                                                      for key in sorted(expected) if here.get(key) != expected[key])
        raise WorkerRefused(f"worker on host {self.host} refuses to extract: {reason}; fix: give every worker the "
                            "same weights file and package versions as the driver")


def extract_shard(shard: Shard, directory: str, known: KnownKeys) -> ShardResult:
    """The Dask task: one shard into its shard file, with this worker's backbone."""
    plugin: ExtractorPlugin = get_worker().plugins[PLUGIN_NAME]
    config = plugin.config
    if config.extract.workers == 0:  # decoding threads: this worker's share of the cores, not all of them
        config = replace(config, extract=replace(config.extract, workers=plugin.threads))
    result = run_shard(shard, config, plugin.fingerprint, Path(directory), plugin.get_extractor, known)
    return replace(result, model_builds=plugin.builds)

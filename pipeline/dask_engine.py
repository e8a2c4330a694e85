"""The Dask engine: extract's stale files as shards on a Dask cluster (`extract.engine = "dask"`).

The driver (this module) merges shard files left by a stopped run, plans shards from the
stat index, and only then, if anything is stale, imports Dask and starts or joins a
cluster: a local one (one spawned worker process per core, never a fork of a live
TensorFlow), or the scheduler at `extract.address`. Tasks return small summaries; the
driver merges each finished shard file into the cache as it completes, so a driver killed
mid-run loses nothing a worker finished. A shard that keeps failing (its worker died again
and again, or it raised `extract.retries + 1` times) is reported by id and files while the
others merge; the rerun computes it again.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import logging
import os
import sys
import uuid

import numpy as np
from tqdm import tqdm

from .cache import CacheWriter
from .config import Config
from .dataset import ImageEntry
from .errors import PipelineError
from .extract import ExtractSummary, stale_files
from .shards import KnownKeys, Shard, complete_shard_files, merge_shard, plan_shards, shard_dir

log = logging.getLogger(__name__)


def extract_on_dask(config: Config, fingerprint: dict, cache: CacheWriter, entries: list[ImageEntry],
                    summary: ExtractSummary, *, progress: bool = True) -> None:
    directory = shard_dir(cache.path)
    known = set(cache.row_index()) | set(cache.failures())
    leftovers = complete_shard_files(directory)
    for path in leftovers:
        summary.extracted += merge_shard(cache, path, fingerprint, known)
    if leftovers:
        log.info("merged %d shard file(s) that a stopped run had finished", len(leftovers))
    stale, index, known = stale_files(entries, cache)
    summary.reused = len(entries) - len(stale)
    if not stale:
        with contextlib.suppress(OSError):
            directory.rmdir()
        return
    shards = plan_shards(stale, index, fingerprint, config.extract.shard_size)
    directory.mkdir(exist_ok=True)
    from .dask_worker import PLUGIN_NAME, ExtractorPlugin, WorkerRefused, extract_shard
    from distributed import as_completed

    with _client(config, len(shards)) as client:
        hosts = collections.Counter(address.rsplit(":", 1)[0].split("://")[-1]
                                    for address in client.scheduler_info()["workers"])
        client.register_plugin(ExtractorPlugin(config, fingerprint, dict(hosts)), name=PLUGIN_NAME)
        # a task, not scattered data: if every worker holding it dies, the scheduler computes it again
        # (scattered data would be lost with them, and every shard waiting on it with it)
        known_keys = client.submit(KnownKeys, np.array(list(known), dtype="S64"), key=f"known-keys-{uuid.uuid4().hex}", pure=False)
        futures = {client.submit(extract_shard, shard, str(directory), known_keys, key=f"extract-shard-{shard.id}",
                                 retries=config.extract.retries, pure=False): shard for shard in shards}
        bar = tqdm(total=len(stale), unit="img", desc=f"extract ({sum(hosts.values())} dask workers)",
                   disable=not progress, dynamic_ncols=True, file=sys.stderr)
        if progress and _has_dashboard(client):
            bar.write(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        try:
            for future in as_completed(futures):
                shard = futures.pop(future)
                try:
                    result = future.result()
                except WorkerRefused:
                    raise
                except Exception as exc:  # the worker died too often, or the task kept raising
                    summary.failed_shards.append(_describe_failure(shard, exc))
                else:
                    added = merge_shard(cache, directory / f"{shard.id}.h5", fingerprint, known)
                    summary.extracted += added
                    summary.reused += result.reused + result.extracted - added
                # let the cluster forget it: a result held only by a worker that dies later is
                # otherwise recomputed for nobody (its shard file gone once merged, so all of it)
                future.release()
                bar.update(len(shard.jobs))
        finally:
            bar.close()
            for future in futures:
                future.cancel()
    with contextlib.suppress(OSError):  # empty unless a shard failed
        directory.rmdir()


@contextlib.contextmanager
def _client(config: Config, shards: int):
    """A client of the cluster at `extract.address`, or of a local cluster started for this run."""
    import dask
    from distributed import Client, LocalCluster

    address = config.extract.address
    if address:
        try:
            client = Client(address, timeout="30s")
        except OSError as exc:
            raise PipelineError(f"cannot reach the Dask scheduler at {address} ({exc}); fix: start it "
                                "(`dask scheduler`) or set extract.address / --address to where it runs") from None
        with client:
            yield client
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(config.extract.dask_workers or cores, shards))
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
    with cluster, Client(cluster) as client:
        yield client


def _has_dashboard(client) -> bool:
    return importlib.util.find_spec("bokeh") is not None and bool(client.dashboard_link)


def _describe_failure(shard: Shard, exc: BaseException) -> str:
    """One line: the shard's id, why it failed, and its files (the first 10)."""
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):  # Dask's own text is a paragraph and names only the last worker
        last = getattr(exc.last_worker, "address", exc.last_worker)
        reason = (f"its worker died each of the {exc.allowed_failures + 1} times it ran this shard, last {last}: "
                  "a crash or running out of memory on one of its files? see that worker's log")
    else:
        reason = f"{type(exc).__name__}: " + (" ".join(str(exc).split())[:200] or "no message")
    files = shard.relpaths
    listed = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    return f"shard {shard.id} ({reason}); its {len(files)} image(s): {listed}"

"""How the frozen backbone is executed, chosen by measurement on the machine at hand.

The same Keras model can run as a plain TensorFlow graph, compiled by XLA, or (with the
optional extras) through another runtime. Which is fastest depends on the CPU, the
backbone, the precision and the batch size: XLA ran Inception V3 13% faster than the graph
on an AVX2 AMD EPYC, yet MobileNet v1 0.25 9x slower on an AVX-512/AMX Xeon, where it also
threw away bfloat16's native speed-up. So no path is fixed in code: each is one
`ExecutionPath` record in `PATHS`, and `PathChooser` times the candidates on the first few
real full batches of a run (interleaved, each warmed once first, so a compile is never
timed), runs the rest on the winner and remembers the choice with its timings in a small
per-machine JSON file, so later runs skip the trial. All paths compute the same function
(their features agree within float rounding), so the path is not part of the cache's
fingerprint.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

MEMORY_FILE_NAME = "execution_paths.json"
TRIAL_ROUNDS = 3  # per candidate: one warm-up call (compiles, not timed), then two timed calls
CLEAR_LOSS = 3.0  # a candidate this many times slower than the best so far gets no second timed call

Run = Callable[[np.ndarray], np.ndarray]  # uint8 images (n, size, size, 3) -> float32 rows (n, d)


class PathFailed(PipelineError):
    """A path could not be built or compiled here (an XLA without its compiler, a runtime that
    cannot load the model); the chooser drops it and goes on with the others."""


@dataclass
class LoadedBackbone:
    """What a path builds from: the frozen Keras model, its preprocessing, the settings."""

    model: Any  # keras.Model, frozen, global-average-pooled
    preprocess: Callable  # the model's own keras.applications preprocess_input
    config: Any  # BackboneConfig
    input_size: int
    feature_dim: int
    cache_dir: Path | None = None  # where a runtime may keep converted models beside the cache
    _graph: Any = field(default=None, repr=False)

    def infer(self, batch):
        """uint8 tensor in, float32 tensor out: preprocessing and model in one function."""
        import tensorflow as tf

        return tf.cast(self.model(self.preprocess(tf.cast(batch, tf.float32)), training=False), tf.float32)

    def signature(self):
        import tensorflow as tf

        return [tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.uint8)]

    def graph_function(self):
        """The plain `tf.function`, shared by the paths that need it (XLA runs partial batches on it)."""
        import tensorflow as tf

        if self._graph is None:
            self._graph = tf.function(self.infer, input_signature=self.signature())
        return self._graph


@dataclass(frozen=True)
class ExecutionPath:
    """One way to run the backbone. `build` returns a function for batches of any size; it
    must never compile for a partial batch (a run's tail, a few new images)."""

    name: str
    runtime: str  # what backbone.runtime selects: "tensorflow", "openvino", ...
    compile: str  # what backbone.compile selects among TensorFlow's paths: "graph", "xla"; "" for others
    build: Callable[[LoadedBackbone], Run]
    available: Callable[[Any], bool] = lambda config: True  # given the BackboneConfig: installed, right device
    version: Callable[[], str] = lambda: ""  # the runtime's version: a new one is measured again


def _build_graph(backbone: LoadedBackbone) -> Run:
    function = backbone.graph_function()
    return lambda batch: function(batch).numpy()


def _build_xla(backbone: LoadedBackbone) -> Run:
    """Full batches through XLA (one compile per process); a partial batch runs the plain
    graph, so it never waits for a compile."""
    import tensorflow as tf

    compiled = tf.function(backbone.infer, input_signature=backbone.signature(), jit_compile=True)
    graph = backbone.graph_function()
    compile_errors = (tf.errors.UnimplementedError, tf.errors.InternalError, tf.errors.NotFoundError,
                      tf.errors.InvalidArgumentError)

    def run(batch: np.ndarray) -> np.ndarray:
        if len(batch) != backbone.config.batch_size:
            return graph(batch).numpy()
        try:
            return compiled(batch).numpy()
        except compile_errors as exc:
            raise PathFailed(f"XLA could not compile the backbone ({str(exc).strip().splitlines()[0][:160]})") from None

    return run


def _tensorflow_version() -> str:
    import tensorflow as tf

    return tf.__version__


PATHS: dict[str, ExecutionPath] = {}


def register(path: ExecutionPath) -> None:
    """Adding a runtime is one record: it then joins every `auto` trial where it is available."""
    PATHS[path.name] = path


register(ExecutionPath("tensorflow-graph", "tensorflow", "graph", _build_graph, version=_tensorflow_version))
register(ExecutionPath("tensorflow-xla", "tensorflow", "xla", _build_xla, version=_tensorflow_version))


def candidates(config) -> list[ExecutionPath]:
    """The paths `backbone.runtime` and `backbone.compile` allow and this machine can run,
    in registry order: the first is the default, used before a choice is made."""
    allowed = [path for path in PATHS.values()
               if config.runtime in ("auto", path.runtime) and config.compile in ("auto", path.compile)]
    usable = [path for path in allowed if path.available(config)]
    if not usable:
        runtime = f"backbone.runtime = {config.runtime!r}" if config.runtime != "auto" else ""
        compiled = f"backbone.compile = {config.compile!r}" if config.compile != "auto" else ""
        names = " with ".join(filter(None, (runtime, compiled))) or "these settings"
        extra = f"; install it with pip install -e '.[{config.runtime}]'" if allowed and runtime else ""
        raise ConfigError(f"no way to run the backbone with {names} on this machine{extra}; fix: set "
                          "backbone.runtime and backbone.compile to \"auto\"")
    return usable


def machine_key(backbone: LoadedBackbone, paths: list[ExecutionPath]) -> dict:
    """Everything that changes which path is fastest: where the speed was measured, and what."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    config = backbone.config
    return {
        "cpu": cpu_model(), "cores": usable_cores(),
        "device": "GPU: " + ", ".join(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
                                       for gpu in gpus) if gpus else "CPU",
        "backbone": config.name, "alpha": config.alpha, "input_size": backbone.input_size,
        "precision": config.precision, "batch_size": config.batch_size,
        "paths": {path.name: path.version() for path in paths},
    }


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share),
    not every core of the machine, which is what os.cpu_count() says."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_usable_cores_in_tensorflow() -> None:
    """TensorFlow's op threads, intra- and inter-op, one per usable core, set before its
    runtime starts (later it cannot change them, and keeps what it has). Measured on 2 cores
    against the decode pool (MobileNet v1 0.25 extract, interleaved A/B, 3 pairs): one
    inter-op thread instead of two changed the wall time by a median 0.98x (0.83-1.04x) and
    the peak memory by -9%, so both stay at the core count, which TensorFlow's defaults also
    use on Linux; stating it keeps a container's share, not the host's cores, on every platform."""
    cores = usable_cores()
    set_tensorflow_threads(intra_op=cores, inter_op=cores)


def set_tensorflow_threads(*, intra_op: int, inter_op: int) -> None:
    """Only before TensorFlow's runtime starts; in a process that already ran a model (a notebook,
    a Dask worker serving its second extract) the runtime keeps the threads it started with."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        log.debug("TensorFlow's runtime already started: it keeps its op threads")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


class ChoiceMemory:
    """The per-machine file of measured choices: one record per key, rewritten atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _records(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
            return [record for record in data["choices"] if isinstance(record, dict) and "key" in record]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s); measuring the backbone's execution paths again", self.path, exc)
            return []

    def recall(self, key: dict) -> dict | None:
        return next((record for record in self._records() if record["key"] == key), None)

    def remember(self, record: dict) -> None:
        self._write([old for old in self._records() if old["key"] != record["key"]] + [record])

    def forget(self, key: dict) -> None:
        """After the remembered winner failed here: the next run measures again."""
        if self.recall(key) is not None:
            self._write([old for old in self._records() if old["key"] != key])

    def _write(self, records: list[dict]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            with os.fdopen(handle, "w") as out:
                json.dump({"format": "execution-paths", "version": 1, "choices": records}, out, indent=1)
            os.replace(temporary, self.path)
        except OSError as exc:  # a read-only cache folder costs a trial per run, nothing else
            log.warning("could not remember the backbone's execution path in %s (%s)", self.path, exc)


class PathChooser:
    """Runs batches on the fastest path, measuring the candidates first where nothing is known.

    The trial uses the run's own first full batches, so no image is computed twice: each
    candidate in turn gets one batch to warm up (tracing, compiling), then the candidates
    take turns on the next ones and each keeps its fastest time. Before the choice, partial
    batches run on the first candidate (the plain graph, which never compiles).
    """

    def __init__(self, backbone: LoadedBackbone, paths: list[ExecutionPath], *, memory: ChoiceMemory | None = None,
                 key: dict | None = None, clock: Callable[[], float] = time.perf_counter):
        self.backbone, self.paths, self.memory, self.key, self.clock = backbone, list(paths), memory, key, clock
        self._built: dict[str, Run] = {}
        self._schedule: list[str] = []
        self._seconds: dict[str, list[float]] = {}
        self.chosen: ExecutionPath | None = None
        self.description = ""  # one line: the path and why (measured, remembered, forced)
        self._decide_without_trial()

    def _decide_without_trial(self) -> None:
        if len(self.paths) == 1:
            self._choose(self.paths[0], "the only candidate allowed by backbone.runtime and backbone.compile")
            return
        record = self.memory.recall(self.key) if self.memory and self.key else None
        names = {path.name: path for path in self.paths}
        if record is not None and record.get("winner") in names:
            self._choose(names[record["winner"]], f"measured on {record.get('measured', '?')}: "
                         + _timings(record.get("seconds_per_batch", {})) + f"; remembered in {self.memory.path}")
            return
        self.chosen = None
        self._schedule = [path.name for _ in range(TRIAL_ROUNDS) for path in self.paths]
        self._seconds = {path.name: [] for path in self.paths}
        self.description = ""

    def expect(self, full_batches: int) -> None:
        """Told how many full batches the run will have: too few to finish a trial, the run
        stays on the first candidate (the plain graph), so a small extract or a predict on a
        few images never pays for compiling paths it could not measure. Nothing is remembered:
        a larger extract measures them."""
        needed = len(self._schedule)
        if self.chosen is None and needed == TRIAL_ROUNDS * len(self.paths) and full_batches < needed:
            self._choose(self.paths[0], f"{full_batches} full batches are too few to measure the {len(self.paths)} "
                         f"candidates on; an extract of at least {needed} batches measures them")

    def _choose(self, path: ExecutionPath, why: str) -> None:
        self.chosen = path
        self.description = f"backbone path: {path.name} ({why})"
        log.info(self.description)

    def _run(self, path: ExecutionPath, batch: np.ndarray) -> np.ndarray:
        if path.name not in self._built:
            try:
                self._built[path.name] = path.build(self.backbone)
            except PathFailed:
                raise
            except Exception as exc:  # a runtime that cannot take this model: drop it, never the run
                raise PathFailed(f"{path.name} could not be built ({str(exc).strip().splitlines()[0][:160]})") from exc
        return self._built[path.name](batch)

    def _drop(self, path: ExecutionPath, exc: PathFailed) -> None:
        if len(self.paths) == 1:
            raise exc
        log.warning("%s; running the backbone another way, which may be slower", exc)
        self.paths.remove(path)
        self._built.pop(path.name, None)
        if self.chosen is path and self.memory and self.key:
            self.memory.forget(self.key)
        self._decide_without_trial()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        full = len(batch) == self.backbone.config.batch_size
        path = self.chosen or (self.paths[0] if not full else next(p for p in self.paths if p.name == self._schedule[0]))
        warm = self.chosen is None and full and self._schedule.count(path.name) == TRIAL_ROUNDS
        started = self.clock()
        try:
            rows = self._run(path, batch)
        except PathFailed as exc:
            self._drop(path, exc)
            return self(batch)
        if self.chosen is None and full:
            self._schedule.pop(0)
            if not warm:  # every warm-up comes before the first timed call: the schedule ends on one of these
                self._seconds[path.name].append(self.clock() - started)
                self._cut_clear_losers()
        return rows

    def _cut_clear_losers(self) -> None:
        """A path already CLEAR_LOSS times slower than the best timed call (XLA ran MobileNet
        9x slower than the graph on an AMX Xeon) is not timed again: the trial stays short."""
        fastest = min((min(times) for times in self._seconds.values() if times), default=None)
        for name, times in self._seconds.items():
            if times and min(times) > CLEAR_LOSS * fastest:
                self._schedule = [scheduled for scheduled in self._schedule if scheduled != name]
        if not self._schedule:
            self._decide_by_trial()

    def _decide_by_trial(self) -> None:
        best = {name: min(times) for name, times in self._seconds.items() if times}
        winner = min((path for path in self.paths if path.name in best), key=lambda path: best[path.name])
        measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        where = ""
        if self.memory and self.key:
            self.memory.remember({"key": self.key, "winner": winner.name, "measured": measured,
                                  "seconds_per_batch": best, "all_seconds": self._seconds})
            where = f"; remembered in {self.memory.path}"
        self._choose(winner, f"measured on this run's first batches: {_timings(best)}{where}")
        for name in [name for name in self._built if name != winner.name]:
            del self._built[name]  # the losers' compiled functions are not needed again


def _timings(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f} s/batch" for name, value in sorted(seconds.items(), key=lambda kv: kv[1]))


from . import openvino_runtime  # noqa: E402,F401  registers OpenVINO's paths; imports no OpenVINO until one is built

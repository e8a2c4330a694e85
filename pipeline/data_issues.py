"""Know your data from its cached features: likely label errors, near-duplicates and leaks across
splits, images unlike anything trained on, and a 2-D map of it all.

Everything here works on feature rows already in the cache, so it costs seconds and never
touches the backbone. Features are compared after centring on the training mean and
scaling to unit length: bottleneck features are non-negative averages whose raw cosines
crowd near 1 for any two photos, and centring spreads them out (see README, "Know your
data", for how each threshold was measured).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .config import InspectConfig
from .errors import PipelineError
from .runs import Sample

log = logging.getLogger(__name__)

NOVELTY_FILE = "novelty.h5"
ISSUES_FILE = "data_issues.json"


@dataclass
class LabelIssue:
    image: str
    given: str
    suggested: str
    score: float  # 1 - cleanlab's label quality: higher means the given label is less likely right


@dataclass
class NearDuplicate:
    images: tuple[str, str]
    similarity: float
    splits: tuple[str, str]

    @property
    def crosses_splits(self) -> bool:
        return self.splits[0] != self.splits[1]


@dataclass
class Unfamiliar:
    image: str
    score: float  # 1 - mean cosine similarity to the nearest training images (NoveltyModel)


@dataclass
class DataIssues:
    label_issues: list[LabelIssue]
    near_duplicates: list[NearDuplicate]
    unfamiliar: list[Unfamiliar]
    thresholds: dict
    scored_split: str  # the split whose unfamiliar images are listed
    projection: np.ndarray | None = None  # one 2-D point per sample, in sample order
    novelty_scores: np.ndarray | None = None  # one per sample, in sample order
    seconds: dict = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)  # the run's samples the lists and arrays refer to
    not_inspected: str = ""  # why the features cannot tell anything about the data (then every list is empty)

    @classmethod
    def skipped(cls, reason: str, scored_split: str) -> "DataIssues":
        return cls([], [], [], {}, scored_split, not_inspected=reason)

    def leaked_images(self) -> list[str]:
        """Images of the scored split that nearly duplicate a training image: they inflate its accuracy."""
        found = {image for d in self.near_duplicates if set(d.splits) == {"train", self.scored_split}
                 for image, split in zip(d.images, d.splits) if split == self.scored_split}
        return sorted(found)

    def summary(self) -> str:
        """One line for the terminal."""
        if self.not_inspected:
            return f"data: not inspected: {self.not_inspected}"
        crossing = sum(d.crosses_splits for d in self.near_duplicates)
        return (f"data: {len(self.label_issues)} likely label error(s); {len(self.near_duplicates)} near-duplicate "
                f"pair(s), {crossing} across splits; {len(self.leaked_images())} {self.scored_split} image(s) nearly "
                f"duplicate training images; {len(self.unfamiliar)} unfamiliar {self.scored_split} image(s)")

    def to_json(self) -> dict:
        """The schema of report/data_issues.json, each list ranked most likely first."""
        return {"label_issues": [asdict(issue) for issue in self.label_issues],
                "near_duplicates": [{"images": list(d.images), "similarity": d.similarity, "splits": list(d.splits)}
                                    for d in self.near_duplicates],
                "unfamiliar": [asdict(u) for u in self.unfamiliar],
                "thresholds": self.thresholds, "scored_split": self.scored_split, "seconds": self.seconds,
                **({"not_inspected": self.not_inspected} if self.not_inspected else {})}

    def write(self, out_dir: Path) -> Path:
        path = Path(out_dir) / ISSUES_FILE
        path.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        return path


# ---------------------------------------------------------------- feature space

class FeatureSpace:
    """Centre on the training mean, then unit length: cosine similarity becomes a dot product."""

    def __init__(self, center: np.ndarray):
        self.center = np.asarray(center, np.float32)

    @classmethod
    def fit(cls, train: np.ndarray) -> "FeatureSpace":
        return cls(np.asarray(train, np.float64).mean(0))

    def transform(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, np.float32) - self.center
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        return centred / np.maximum(norms, 1e-12)


class NeighbourIndex:
    """Cosine k-nearest-neighbour search over unit vectors.

    Exact (scikit-learn, brute force) up to `exact_up_to` rows; beyond, faiss' HNSW graph: a
    wheel, no training step, recall 1.000 at 50,000 rows (python -m pipeline.neighbours_bench; README,
    "Know your data", for hnswlib and faiss IVF beside it).
    """

    def __init__(self, vectors: np.ndarray, exact_up_to: int):
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.exact = len(self.vectors) <= exact_up_to
        if self.exact:
            from sklearn.neighbors import NearestNeighbors

            self._index = NearestNeighbors(metric="cosine", algorithm="brute").fit(self.vectors)
        else:
            import faiss

            self._index = faiss.IndexHNSWFlat(self.vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = 80
            self._index.add(self.vectors)
            self._index.hnsw.efSearch = 64

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, row indices) of each query's k nearest rows, nearest first."""
        k = min(k, len(self.vectors))
        queries = np.ascontiguousarray(queries, np.float32)
        if self.exact:
            distances, indices = self._index.kneighbors(queries, n_neighbors=k)
            return 1.0 - distances, indices
        similarities, indices = self._index.search(queries, k)
        return similarities, indices


# ---------------------------------------------------------------- label errors

def out_of_fold_probabilities(features: np.ndarray, y: np.ndarray, n_classes: int, *, C: float, folds: int,
                              seed: int = 0) -> np.ndarray:
    """Each image's class probabilities from a logistic-regression head that never saw it.

    The head is the logreg head with its regularisation fixed (the run's chosen C), refitted
    on each fold's other images: probabilities honest enough for confident learning.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probabilities = np.zeros((len(y), n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, held_rows in splitter.split(features, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=300))
        # the matrices are small: one BLAS thread is faster, and on a busy machine 13x faster (measured)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(features[fit_rows], y[fit_rows])
        probabilities[np.ix_(held_rows, model.classes_)] = model.predict_proba(features[held_rows])
    return probabilities


def find_label_issues(images: Sequence[str], y: np.ndarray, probabilities: np.ndarray,
                      labels: Sequence[str]) -> list[LabelIssue]:
    """Confident learning (cleanlab): images whose given label the out-of-fold probabilities reject,
    least likely label first, each with the class the features point to."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = cleanlab_issues(y, probabilities, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = get_label_quality_scores(y, probabilities, method="self_confidence")
    issues = []
    for i in np.flatnonzero(flagged):
        ranked = np.argsort(-probabilities[i], kind="stable")
        suggested = ranked[0] if ranked[0] != y[i] else ranked[1]
        issues.append(LabelIssue(images[i], labels[y[i]], labels[suggested], round(float(1 - quality[i]), 6)))
    return sorted(issues, key=lambda issue: (-issue.score, issue.image))


# ---------------------------------------------------------------- near-duplicates

def find_near_duplicates(vectors: np.ndarray, images: Sequence[str], splits: Sequence[str], index: NeighbourIndex,
                         threshold: float, neighbours: int = 10) -> list[NearDuplicate]:
    """Pairs whose cosine similarity reaches `threshold`, most similar first.

    Each image's nearest neighbours are enough: a near-duplicate is, by definition, among
    the closest few (groups larger than `neighbours` lose only their most distant pairs).
    """
    similarities, indices = index.search(vectors, neighbours + 1)
    pairs: dict[tuple[int, int], float] = {}
    for i, (row_sims, row_ids) in enumerate(zip(similarities, indices)):
        for sim, j in zip(row_sims, row_ids):
            if j != i and j >= 0 and sim >= threshold:
                pairs[(min(i, j), max(i, j))] = float(min(sim, 1.0))
    found = [NearDuplicate((images[a], images[b]), round(sim, 6), (splits[a], splits[b]))
             for (a, b), sim in pairs.items()]
    return sorted(found, key=lambda d: (-d.similarity, d.images))


# ---------------------------------------------------------------- novelty

@dataclass
class NoveltyModel:
    """kNN novelty: one minus the mean cosine similarity of an image to its `k` nearest training
    images, in the centred unit space the near-duplicate search uses (FeatureSpace).

    Measured against the per-class Mahalanobis detector it replaced (README, "Know your data"):
    at 5% of held-out flowers5 validation images flagged, it flags 40% of hymenoptera's ants
    and bees instead of 34% with MobileNet v1 0.25, 55% instead of 37% with MobileNetV2 0.35.
    The threshold is the `quantile` of the validation images' scores, so about 1 - quantile of
    images like the training data are flagged. Saved as HDF5 (the centre, the training vectors
    in float16, k and the threshold; at most `MAX_ROWS` training images, a fixed random sample
    beyond): predict needs neither the cache nor pickle to apply it.
    """

    center: np.ndarray  # (d,) the training mean
    train: np.ndarray  # (n, d) centred unit training vectors
    k: int
    quantile: float
    threshold: float

    METHOD = "knn_cosine_centred"
    MAX_ROWS = 20_000

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, *, quantile: float, k: int = 3, seed: int = 0) -> "NoveltyModel":
        space = FeatureSpace.fit(train)
        rows = _sampled_rows(len(train), cls.MAX_ROWS, seed)
        model = cls(space.center, space.transform(np.asarray(train)[rows]).astype(np.float16), k, quantile, 0.0)
        model.threshold = float(np.quantile(model.scores(val), quantile))
        return model

    def scores(self, features: np.ndarray) -> np.ndarray:
        """1 - mean cosine similarity to the k nearest training images: 0 for a copy of one, higher is stranger."""
        if not len(features):
            return np.zeros(0)
        queries = FeatureSpace(self.center).transform(features)
        train = self.train.astype(np.float32)
        k = min(self.k, len(train))
        out = np.empty(len(queries))
        for start in range(0, len(queries), 1024):  # (1024, n) similarities at a time: memory stays flat
            similarities = queries[start:start + 1024] @ train.T
            nearest = np.partition(similarities, len(train) - k, axis=1)[:, -k:]
            out[start:start + 1024] = 1.0 - nearest.mean(1)
        return np.maximum(out, 0.0)

    def save(self, path: Path) -> None:
        with h5py.File(path, "w") as f:
            f.create_dataset("center", data=self.center)
            f.create_dataset("train", data=self.train, compression="gzip")
            f.attrs.update(method=self.METHOD, k=self.k, quantile=self.quantile, threshold=self.threshold)

    @classmethod
    def load(cls, path: Path) -> "NoveltyModel | None":
        """The saved model, or None when it was saved by another method (an older version): fit it again."""
        with h5py.File(path, "r") as f:
            if f.attrs.get("method") != cls.METHOD:
                return None
            return cls(f["center"][...], f["train"][...], int(f.attrs["k"]), float(f.attrs["quantile"]),
                       float(f.attrs["threshold"]))


# ---------------------------------------------------------------- map

def project_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE (scikit-learn, Barnes-Hut) of the centred unit vectors after PCA to 50 dimensions,
    scaled to [0, 1]. Chosen over UMAP (numba compiles it on first use: minutes on a busy 2-core
    machine) and plain PCA (classes overlap); see README, "Know your data"."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(vectors)
    if n < 5:
        return np.full((n, 2), 0.5)
    reduced = PCA(min(50, n - 1, vectors.shape[1]), random_state=seed).fit_transform(vectors)
    with threadpool_limits(1):  # measured faster than two threads on a shared 2-core machine
        points = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", max_iter=500,
                      random_state=seed).fit_transform(reduced)
    points = points - points.min(0)
    return points / np.maximum(points.max(0), 1e-12)


class MapStore:
    """Maps already computed, kept beside the cache as plain HDF5 (`<cache>.maps/<id>.h5`, one
    float32 array of points, never pickle), so the t-SNE is paid once per row set: a second
    report, and every run of a sweep on the same images, reads it back in milliseconds.

    A map's id hashes what its points depend on: the cache's fingerprint, the projection and
    its version, the seed, the shown rows' keys in order and the training keys (the centre).
    The newest `keep` maps stay; older ones (row sets since changed) are deleted.
    """

    METHOD = "t-SNE (scikit-learn Barnes-Hut, 500 iterations) of the centred unit features after PCA to 50 dimensions"

    def __init__(self, directory: Path, keep: int = 20):
        self.directory = Path(directory)
        self.keep = keep

    @staticmethod
    def for_cache(cache_path: Path) -> "MapStore":
        cache_path = Path(cache_path)
        return MapStore(cache_path.with_name(cache_path.name + ".maps"))

    def map_id(self, fingerprint: dict, shown_keys: Sequence[str], train_keys: Sequence[str], seed: int) -> str:
        import hashlib

        import sklearn

        digest = hashlib.sha256(json.dumps([fingerprint, self.METHOD, f"scikit-learn {sklearn.__version__}", seed,
                                            sorted(train_keys)], sort_keys=True).encode())
        for key in shown_keys:
            digest.update(key.encode() + b"\n")
        return digest.hexdigest()[:24]

    def load(self, map_id: str, rows: int) -> np.ndarray | None:
        path = self.directory / f"{map_id}.h5"
        try:
            with h5py.File(path, "r") as f:
                points = f["points"][...]
        except (OSError, KeyError):  # not computed yet, or unreadable: computed again
            return None
        return points if points.shape == (rows, 2) else None

    def save(self, map_id: str, points: np.ndarray) -> None:
        """Written under a temporary name and renamed: a map file is whole or absent."""
        import os

        try:
            self.directory.mkdir(exist_ok=True)
            temp = self.directory / f"{map_id}.{os.getpid()}.part"
            with h5py.File(temp, "w") as f:
                f.create_dataset("points", data=np.asarray(points, np.float32))
                f.attrs["method"] = self.METHOD
            os.replace(temp, self.directory / f"{map_id}.h5")
            for old in sorted(self.directory.glob("*.h5"), key=lambda p: p.stat().st_mtime)[:-self.keep]:
                old.unlink(missing_ok=True)
        except OSError as exc:  # e.g. a read-only cache folder: the map is simply computed again next time
            log.warning("the map could not be kept in %s (%s); the next report computes it again", self.directory, exc)


# ---------------------------------------------------------------- the whole analysis

def inspect_features(features: np.ndarray, samples: Sequence[Sample], labels: Sequence[str], *,
                     settings: InspectConfig, C: float, scored_split: str, project: bool = True,
                     novelty: NoveltyModel | None = None, maps: MapStore | None = None,
                     fingerprint: dict | None = None) -> tuple[DataIssues, NoveltyModel]:
    """The whole analysis on one feature row per sample (sample order), from cached features only.

    `novelty` reuses a saved model (its threshold); otherwise one is fitted on train and
    calibrated on val. With `maps` (and the cache's `fingerprint`), the map is read from there
    when this row set was projected before, and kept there otherwise.
    """
    import time

    timings: dict[str, float] = {}
    started = time.perf_counter()
    images = [s.image for s in samples]
    splits = [s.split for s in samples]
    class_of = {label: i for i, label in enumerate(labels)}
    train_rows = np.array([i for i, s in enumerate(samples) if s.split == "train" and s.label is not None])
    val_rows = np.array([i for i, s in enumerate(samples) if s.split == "val" and s.label is not None])
    if not len(train_rows) or not len(val_rows):
        raise PipelineError("data inspection needs labeled train and val images in the run")

    # 1. label errors on train + val, from out-of-fold probabilities
    known = np.concatenate([train_rows, val_rows])
    y = np.array([class_of[samples[i].label] for i in known])
    smallest = np.bincount(y, minlength=len(labels))[np.unique(y)].min()
    folds = int(min(settings.folds, smallest))
    label_issues: list[LabelIssue] = []
    if folds >= 2:
        probabilities = out_of_fold_probabilities(features[known], y, len(labels), C=C, folds=folds)
        label_issues = find_label_issues([images[i] for i in known], y, probabilities, labels)
    else:
        log.warning("a class has a single train+val image: no cross-validated label check")
    timings["label_issues"] = time.perf_counter() - started

    # 2. near-duplicates over every sample
    started = time.perf_counter()
    space = FeatureSpace.fit(features[train_rows])
    vectors = space.transform(features)
    index = NeighbourIndex(vectors, settings.exact_search_up_to)
    duplicates = find_near_duplicates(vectors, images, splits, index, settings.duplicate_similarity)
    timings["near_duplicates"] = time.perf_counter() - started

    # 3. novelty of every sample, the threshold calibrated on validation images
    started = time.perf_counter()
    if novelty is None:
        novelty = NoveltyModel.fit(features[train_rows], features[val_rows], quantile=settings.unfamiliar_quantile,
                                   seed=settings.seed)
    scores = novelty.scores(features)
    chosen = [i for i, s in enumerate(samples) if s.split == scored_split or s.label is None]
    unfamiliar = sorted((Unfamiliar(images[i], round(float(scores[i]), 4)) for i in chosen
                         if scores[i] > novelty.threshold), key=lambda u: (-u.score, u.image))
    timings["unfamiliar"] = time.perf_counter() - started

    # 4. the map
    projection = None
    if project:
        started = time.perf_counter()
        shown = _sampled_rows(len(samples), settings.map_points, settings.seed)
        projection = np.full((len(samples), 2), np.nan)
        points = map_id = None
        if maps is not None and fingerprint is not None:
            map_id = maps.map_id(fingerprint, [samples[i].key for i in shown],
                                 [samples[i].key for i in train_rows], settings.seed)
            points = maps.load(map_id, len(shown))
        reused = points is not None
        if not reused:
            points = project_2d(vectors[shown], settings.seed)
            if map_id is not None:
                maps.save(map_id, points)
        projection[shown] = points
        timings["map (kept from an earlier report)" if reused else "map"] = time.perf_counter() - started

    thresholds = {"duplicate_similarity": settings.duplicate_similarity,
                  "unfamiliar": {"method": f"1 - mean cosine similarity to the {novelty.k} nearest training images "
                                           "(features centred on the training mean)", "quantile_of_val": novelty.quantile,
                                 "threshold": novelty.threshold},
                  "label_issues": {"method": "cleanlab confident learning (prune_by_noise_rate) on out-of-fold "
                                             "logistic-regression probabilities", "folds": folds, "C": C},
                  "search": "exact (scikit-learn)" if index.exact else "faiss HNSW", "map": MapStore.METHOD}
    issues = DataIssues(label_issues, duplicates, unfamiliar, thresholds, scored_split, projection, scores,
                        {k: round(v, 3) for k, v in timings.items()}, list(samples))
    return issues, novelty


def _sampled_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """Every row up to `limit`; beyond it a fixed random sample (the map's points, the novelty model's training rows)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def inspect_run(run, scored_split: str, *, project: bool = True) -> DataIssues:
    """The analysis for a trained run from its cache (every sample's row), its novelty model saved
    beside the head as novelty.h5."""
    from .cache import FeatureCache

    reason = features_say_nothing(run.info.fingerprint)
    if reason:
        log.info("data not inspected: %s", reason)  # the summary line says it on the terminal
        return DataIssues.skipped(reason, scored_split)
    samples = run.samples
    with FeatureCache(run.info.cache, run.info.fingerprint) as cache:
        rows = cache.row_index()
        present = [s for s in samples if s.key in rows]
        features = cache.read_features([rows[s.key] for s in present])
    C = float(run.info.params.get("C", 1.0))  # the logreg head's choice; 1.0 for other heads
    issues, novelty = inspect_features(features, present, run.labels, settings=run.config.inspect, C=C,
                                       scored_split=scored_split, project=project,
                                       maps=MapStore.for_cache(run.info.cache), fingerprint=run.info.fingerprint)
    novelty.save(run.dir / NOVELTY_FILE)
    return issues


def features_say_nothing(fingerprint: dict) -> str:
    """Why features with this fingerprint cannot say anything about the data, or "".

    Random weights (the demo's fallback when ImageNet weights cannot be had) make features
    whose similarities reflect the random filters, not the photos: any two digits look like
    near-duplicates there, and every image alike or unlike the rest.
    """
    if str(fingerprint.get("weights", "")).startswith("random"):
        return ("the backbone has random weights, so its features' similarities mean nothing (near-duplicates, "
                "unfamiliar images, label errors and the map would all be noise); fix: extract with "
                "backbone.weights = \"imagenet\"")
    return ""


def novelty_for_run(run) -> NoveltyModel:
    """The run's saved novelty model (written by the report), or one fitted now from its cached train
    and val features and saved, so predict and report always agree on the threshold."""
    from .cache import FeatureCache

    path = run.dir / NOVELTY_FILE
    saved = NoveltyModel.load(path) if path.is_file() else None
    if saved is not None:
        return saved
    chosen = {split: [s for s in run.samples if s.split == split and s.label is not None]
              for split in ("train", "val")}
    try:
        with FeatureCache(run.info.cache, run.info.fingerprint) as cache:
            rows = cache.row_index()
            features = {split: cache.read_features([rows[s.key] for s in group]) for split, group in chosen.items()}
    except (KeyError, OSError) as exc:
        raise PipelineError(f"run {run.dir}: the novelty threshold needs the run's cached training features, and "
                            f"they cannot be read ({exc}); fix: run `make extract` and `make train` again") from None
    model = NoveltyModel.fit(features["train"], features["val"], quantile=run.config.inspect.unfamiliar_quantile,
                             seed=run.config.inspect.seed)
    model.save(path)
    return model

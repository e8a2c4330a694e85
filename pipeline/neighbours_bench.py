"""Which nearest-neighbour library the data inspection uses beyond exact search: measured, not guessed.

Builds a cosine k-NN index over N unit vectors (clustered like real bottleneck features:
class centres plus per-image spread) with each candidate that installs here, queries every
row for its 10 nearest neighbours, and reports build and query time and recall@10
against exact search on a sample. Run: `python -m pipeline.neighbours_bench [N] [DIM]`.
"""

import os
import sys
import time

import numpy as np


def clustered(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (max(2, n // 100), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.6, (n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(x, queries, k):
    sims = queries @ x.T
    return np.argsort(-sims, axis=1)[:, :k]


def run_faiss_hnsw(x, k):
    import faiss
    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    started = time.perf_counter(); index.add(x); built = time.perf_counter() - started
    index.hnsw.efSearch = 64
    started = time.perf_counter(); _, found = index.search(x, k); queried = time.perf_counter() - started
    return built, queried, found


def run_faiss_ivf(x, k):
    import faiss
    nlist = int(4 * np.sqrt(len(x)))
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    index.train(x[np.random.default_rng(0).choice(len(x), min(len(x), 64 * nlist), replace=False)])
    index.add(x); built = time.perf_counter() - started
    index.nprobe = 16
    started = time.perf_counter(); _, found = index.search(x, k); queried = time.perf_counter() - started
    return built, queried, found


def run_hnswlib(x, k):
    import hnswlib
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    started = time.perf_counter()
    index.init_index(max_elements=len(x), ef_construction=80, M=32); index.add_items(x)
    built = time.perf_counter() - started
    index.set_ef(64)
    started = time.perf_counter(); found, _ = index.knn_query(x, k=k); queried = time.perf_counter() - started
    return built, queried, found


def run_pynndescent(x, k):
    import pynndescent
    started = time.perf_counter()
    index = pynndescent.NNDescent(x, metric="cosine", n_neighbors=30, random_state=0)
    found, _ = index.neighbor_graph
    built = time.perf_counter() - started
    return built, 0.0, found[:, :k]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    k = 10
    x = clustered(n, dim)
    sample = np.random.default_rng(1).choice(n, 500, replace=False)
    truth = exact(x, x[sample], k)
    print(f"N={n} dim={dim} cores={os.cpu_count()}")
    for name, run in (("faiss HNSW", run_faiss_hnsw), ("faiss IVF", run_faiss_ivf), ("hnswlib", run_hnswlib),
                      ("pynndescent", run_pynndescent)):
        try:
            built, queried, found = run(x, k)
        except Exception as exc:  # a candidate that fails here is reported, not fatal
            print(f"{name:12s} failed: {exc}")
            continue
        recall = np.mean([len(set(found[s]) & set(t)) / k for s, t in zip(sample, truth)])
        print(f"{name:12s} build {built:7.1f} s  query all {queried:7.1f} s  total {built + queried:7.1f} s  "
              f"recall@{k} {recall:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Which 2-D projection the report's map uses: speed and quality measured at 10,000 points.

Points: real cached features (a cache file given on the command line) resampled to N rows
with a little noise per copy, in 100 pseudo-classes (each real class split by k-means), so
the map must keep 100 groups apart. Quality: trustworthiness (are 2-D neighbours real
neighbours, scikit-learn) and the accuracy of a 5-NN classifier in 2-D (are classes kept
together). Run: `python -m pipeline.projection_bench CACHE.h5 [N]`.
"""

import sys
import time

import h5py
import numpy as np
from sklearn.cluster import KMeans
from sklearn.manifold import trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier


def main():
    with h5py.File(sys.argv[1], "r") as f:
        base = f["rows/feature"][:].astype(np.float32)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    rng = np.random.default_rng(0)
    groups = KMeans(100, n_init=1, random_state=0).fit_predict(base)
    rows = rng.integers(0, len(base), n)
    x = base[rows] + rng.normal(0, 0.15 * base.std(), (n, base.shape[1])).astype(np.float32)
    y = groups[rows]
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sample = rng.choice(n, 2000, replace=False)

    def pca(z):
        from sklearn.decomposition import PCA
        return PCA(2, random_state=0).fit_transform(z)

    def tsne(z):
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        return TSNE(2, init="pca", random_state=0).fit_transform(PCA(50, random_state=0).fit_transform(z))

    def umap_(z):
        import umap
        return umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=0).fit_transform(z)

    print(f"N={n}, dim={x.shape[1]}, 100 groups")
    for name, project in (("PCA", pca), ("UMAP", umap_), ("t-SNE", tsne)):
        started = time.perf_counter()
        try:
            points = project(x)
        except ImportError as exc:  # umap-learn is not a dependency: install it to include it
            print(f"{name:6s} not installed ({exc})")
            continue
        seconds = time.perf_counter() - started
        trust = trustworthiness(x[sample], points[sample], n_neighbors=10)
        knn = cross_val_score(KNeighborsClassifier(5), points, y, cv=3).mean()
        print(f"{name:6s} {seconds:7.1f} s  trustworthiness {trust:.3f}  5-NN accuracy in 2-D {knn:.3f}", flush=True)


if __name__ == "__main__":
    main()

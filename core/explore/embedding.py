"""One point per image (its pooled unit queries) and per prototype, in a shared 2-D UMAP.

UMAP uses exact k nearest neighbours, PCA initialisation and 200 epochs; with fewer than 10
points it falls back to PCA, which needs no neighbourhood graph.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from core.data.base import NORMAL
from core.explore.images import _batch, subsample
from core.model.anomem import AnoMem

PCA_BELOW = 10  # UMAP needs a neighbourhood graph; fewer points get PCA
UMAP_EPOCHS = 200
EDGE_CASE = "normal (edge case)"


@torch.no_grad()
def embed_images(model: AnoMem, images: torch.Tensor, batch_size: int | None = None
                 ) -> dict[str, np.ndarray]:
    """{scale: (N, D)} pooled unit queries of uint8 images (N, C, H, W), batch by batch."""
    model.eval()
    batch_size = batch_size or model.inference_batch()
    parts: dict[str, list[np.ndarray]] = {s: [] for s in model.scales}
    for start in range(0, len(images), batch_size):
        for s, v in model.embed(_batch(images[start:start + batch_size])).items():
            parts[s].append(v.cpu().numpy())
    return {s: np.concatenate(v) for s, v in parts.items()}


def _pca2(x: np.ndarray) -> np.ndarray:
    """First two principal components (zeros where the data has fewer dimensions)."""
    out = np.zeros((len(x), 2), dtype=np.float32)
    k = min(2, len(x) - 1, x.shape[1]) if len(x) >= 2 else 0
    if k > 0:
        out[:, :k] = PCA(k, svd_solver="full").fit_transform(x)
    return out


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and euclidean distances (M, k) of each row's k nearest rows, itself first."""
    dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x).kneighbors(x)
    return idx.astype(np.int64), dist.astype(np.float32)


def umap_embedding(vectors: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of vectors (M, D) -> (M, 2), deterministic for a seed; PCA below 10 points."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected vectors of shape (M, D), got {x.shape}")
    if len(x) < PCA_BELOW:
        return _pca2(x)
    import umap

    k = max(2, min(n_neighbors, len(x) - 1))
    knn = exact_knn(x, k)
    threads = torch.get_num_threads()  # umap's numba start-up resets torch's thread count
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_neighbors=k, random_state=seed, n_epochs=UMAP_EPOCHS,
                                init="pca", precomputed_knn=(*knn, None))
            return np.asarray(reducer.fit_transform(x), dtype=np.float32)
    finally:
        torch.set_num_threads(threads)


class UmapPoints(NamedTuple):
    samples: np.ndarray  # (n, 2) coordinates of the kept samples
    prototypes: np.ndarray  # (N, 2) coordinates of the scale's prototypes
    index: np.ndarray  # (n,) which samples were kept (at most max_points)


def umap_points(model: AnoMem, images: torch.Tensor, scale: str, seed: int = 0,
                n_neighbors: int = 15, max_points: int = 5000) -> UmapPoints:
    """Samples (pooled unit queries) and unit prototypes of `scale` in one 2-D UMAP space."""
    index = subsample(len(images), max_points, seed)
    queries = embed_images(model, images[torch.as_tensor(index)])[scale]
    protos = model.memories[scale].normalized_prototypes().detach().cpu().numpy()
    xy = umap_embedding(np.concatenate([queries, protos]), seed, n_neighbors)
    return UmapPoints(xy[:len(queries)], xy[len(queries):], index)


def sample_groups(types: list[str], edge: torch.Tensor | np.ndarray) -> list[str]:
    """Colour group of each sample: its type, with edge-case normals apart."""
    edge = np.asarray(edge, dtype=bool)
    return [EDGE_CASE if t == NORMAL and e else t for t, e in zip(types, edge, strict=True)]

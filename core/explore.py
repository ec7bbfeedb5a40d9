"""What the explorer shows, computed: prototype galleries, UMAP, overlays, edge cases, type stats.

Plain functions over a trained `AnoMem` and uint8 images, so the app's pages stay thin and the
CLI can call the same code. Two image conventions meet here: torch tensors are (C, H, W) or
(N, C, H, W) as in `ImageSet`; numpy arrays are (H, W, C) or (H, W), as images are displayed.

Choices the app depends on:

* **Receptive-field crops** (`crop`): a position (row, col) of a scale with stride s is shown as
  the square of side `clip(3 * s, 8, image side)` centred on ((row + 0.5) * s, (col + 0.5) * s),
  shifted to stay inside the image so every crop of a scale has the same size. Three strides is
  about the span a position's features mostly look at (its theoretical receptive field is
  larger); eight pixels keeps the finest scale's crops recognisable.
* **Overlays** (`overlay`, `heat_range`): one fixed colour scale for every image and every
  scale, from 0 (a position as normal as an average normal one) to twice the detector's pixel
  threshold, so the threshold sits in the middle of the colour bar and a colour means the same
  thing on every image.
* **UMAP** (`umap_embedding`): exact k nearest neighbours (chunked numpy), PCA initialisation and
  200 epochs; with fewer than 10 points it falls back to PCA, which needs no neighbourhood graph.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from core.data.base import NORMAL, DataError
from core.metrics import auroc
from core.model.anomem import AnoMem
from core.train.augment import to_float

DUPLICATE_COSINE = 0.95  # prototypes closer than this (cosine) are reported as near-duplicates
RF_STRIDES = 3  # receptive-field crop side, in strides of the scale
MIN_CROP = 8  # pixels
PCA_BELOW = 10  # UMAP needs a neighbourhood graph; fewer points get PCA
UMAP_EPOCHS = 200
DEFAULT_CMAP = "Inferno"
EDGE_CASE = "normal (edge case)"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000


# ---------------------------------------------------------------------------------------------
# image helpers


def _batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(C, H, W) or (N, C, H, W) uint8/float -> float (N, C, H, W) in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected (C, H, W) or (N, C, H, W) images, got {tuple(x.shape)}")
    return to_float(x)


def to_rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A displayable uint8 (H, W, 3) array from a (C, H, W) tensor or an (H, W[, C]) array."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().numpy()
        arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"cannot display an image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def hwc_to_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W[, C]) array -> uint8 (C, H, W) tensor, the model's layout."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscaling by a whole factor until the shorter side is >= min_side.

    Small images (32 px) would otherwise be blurred by the browser's smooth scaling.
    """
    factor = max(1, -(-min_side // min(image.shape[:2])))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def draw_box(image: np.ndarray, top: int, left: int, side: int,
             colour: tuple[int, int, int] = (0, 255, 255)) -> np.ndarray:
    """A copy of an (H, W, 3) image with a one-pixel square outline."""
    out = image.copy()
    h, w = out.shape[:2]
    b, r = min(h, top + side) - 1, min(w, left + side) - 1
    out[top, left:r + 1] = colour
    out[b, left:r + 1] = colour
    out[top:b + 1, left] = colour
    out[top:b + 1, r] = colour
    return out


def subsample(n: int, max_n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most max_n of n items, the same ones on every call."""
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


# ---------------------------------------------------------------------------------------------
# prototypes and their patches


@dataclass(frozen=True)
class PatchHit:
    """One map position that reads a prototype: image index, map row and column, weight."""

    image: int
    row: int
    col: int
    weight: float


@dataclass
class PrototypePatches:
    """For each prototype of one scale, the positions that read it most strongly."""

    scale: str
    stride: int
    map_size: tuple[int, int]  # (h, w) of the scale's maps
    hits: list[list[PatchHit]]  # per prototype, strongest first
    usage: np.ndarray  # (N,) positions whose strongest prototype it is
    duplicates: list[tuple[int, int, float]] = field(default_factory=list)  # (i, j, cosine)

    @property
    def size(self) -> int:
        return len(self.hits)

    @property
    def dead(self) -> list[int]:
        """Prototypes that are never any position's strongest match."""
        return np.flatnonzero(self.usage == 0).tolist()

    def duplicate_of(self, index: int) -> list[int]:
        """Prototypes reported as near-duplicates of `index`."""
        return sorted({j if i == index else i for i, j, _ in self.duplicates if index in (i, j)})

    def by_usage(self) -> list[int]:
        """Prototype indices, most used first (ties by index)."""
        return sorted(range(self.size), key=lambda i: (-int(self.usage[i]), i))

    def crop(self, images: torch.Tensor, hit: PatchHit) -> np.ndarray:
        return crop(images, hit, self.stride)


def crop_window(row: int, col: int, stride: int, height: int, width: int
                ) -> tuple[int, int, int]:
    """(top, left, side) of the receptive-field crop of a map position (see module doc)."""
    side = int(min(max(RF_STRIDES * stride, MIN_CROP), height, width))

    def start(index: int, extent: int) -> int:
        centre = (index + 0.5) * stride
        return int(min(max(round(centre - side / 2), 0), extent - side))

    return start(row, height), start(col, width), side


def crop(images: torch.Tensor, hit: PatchHit, stride: int) -> np.ndarray:
    """Receptive-field crop of `hit` in images (N, C, H, W) as uint8 (side, side, 3)."""
    image = images[hit.image]
    top, left, side = crop_window(hit.row, hit.col, stride, image.shape[-2], image.shape[-1])
    return to_rgb(image[:, top:top + side, left:left + side])


def patch_strip(images: torch.Tensor, hits: list[PatchHit], stride: int, tile: int = 48,
                gap: int = 2) -> np.ndarray:
    """The crops of `hits` side by side, each upscaled to `tile` pixels: one image per prototype."""
    if not hits:
        return np.full((tile, tile, 3), 40, dtype=np.uint8)
    tiles = []
    for hit in hits:
        c = torch.from_numpy(crop(images, hit, stride)).permute(2, 0, 1)[None].float()
        tiles.append(F.interpolate(c, size=(tile, tile), mode="nearest")[0].permute(1, 2, 0))
    out = np.full((tile, len(tiles) * (tile + gap) - gap, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        out[:, i * (tile + gap):i * (tile + gap) + tile] = t.byte().numpy()
    return out


def near_duplicates(prototypes: torch.Tensor, threshold: float = DUPLICATE_COSINE
                    ) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of prototypes (N, D) whose cosine similarity exceeds `threshold`."""
    p = F.normalize(prototypes.detach().float(), dim=1)
    cos = (p @ p.T).cpu().numpy()
    i, j = np.nonzero(np.triu(cos > threshold, k=1))
    return [(int(a), int(b), float(cos[a, b])) for a, b in zip(i, j, strict=True)]


@torch.no_grad()
def top_patches(model: AnoMem, images: torch.Tensor, scale: str, per_prototype: int = 5,
                batch_size: int = 256, one_per_image: bool = True) -> PrototypePatches:
    """For each prototype of `scale`, the `per_prototype` positions with the highest attention.

    images: uint8 (N, C, H, W). With `one_per_image` each image contributes at most its best
    position to a prototype, so a gallery shows k different images rather than k neighbouring
    positions of one. Usage counts every position once, for its strongest prototype.
    """
    if scale not in model.scales:
        raise ValueError(f"scale {scale!r}: expected one of {', '.join(model.scales)}")
    model.eval()
    n = model.memories[scale].size
    best_w = torch.empty(n, 0)
    best_idx = torch.empty(n, 0, dtype=torch.long)
    usage = torch.zeros(n, dtype=torch.long)
    h = w = 0
    for start in range(0, len(images), batch_size):
        att = model(_batch(images[start:start + batch_size]))[scale].attention.cpu()  # (b,N,h,w)
        b, _, h, w = att.shape
        usage += torch.bincount(att.argmax(1).flatten(), minlength=n)
        flat = att.permute(1, 0, 2, 3).reshape(n, b, h * w)  # (N, b, hw)
        if one_per_image:
            weight, pos = flat.max(dim=2)  # (N, b)
            index = (start + torch.arange(b))[None] * (h * w) + pos  # global flat position
        else:
            weight = flat.reshape(n, b * h * w)
            index = (start * h * w + torch.arange(b * h * w))[None].expand(n, -1)
        cand_w = torch.cat([best_w, weight], dim=1)
        cand_i = torch.cat([best_idx, index], dim=1)
        top = cand_w.topk(min(per_prototype, cand_w.shape[1]), dim=1)
        best_w, best_idx = top.values, cand_i.gather(1, top.indices)
    hits = [
        [PatchHit(int(i) // (h * w), int(i) % (h * w) // w, int(i) % w, float(v))
         for v, i in zip(best_w[p].tolist(), best_idx[p].tolist(), strict=True)]
        for p in range(n)
    ]
    return PrototypePatches(
        scale=scale,
        stride=model.stride(scale),
        map_size=(h, w),
        hits=hits,
        usage=usage.numpy(),
        duplicates=near_duplicates(model.memories[scale].normalized_prototypes()),
    )


# ---------------------------------------------------------------------------------------------
# embeddings


@torch.no_grad()
def embed_images(model: AnoMem, images: torch.Tensor, batch_size: int = 256
                 ) -> dict[str, np.ndarray]:
    """{scale: (N, D)} pooled unit queries of uint8 images (N, C, H, W), batch by batch."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {s: [] for s in model.scales}
    for start in range(0, len(images), batch_size):
        for s, v in model.embed(_batch(images[start:start + batch_size])).items():
            parts[s].append(v.cpu().numpy())
    return {s: np.concatenate(v) for s, v in parts.items()}


def _pca2(x: np.ndarray) -> np.ndarray:
    """First two principal components (zeros where the data has fewer dimensions)."""
    out = np.zeros((len(x), 2), dtype=np.float32)
    if len(x) < 2:
        return out
    centred = x - x.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    out[:, :k] = u[:, :k] * s[:k]
    return out


def exact_knn(x: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Indices and euclidean distances (M, k) of each row's k nearest rows, itself included."""
    sq = (x * x).sum(1)
    idx = np.empty((len(x), k), dtype=np.int64)
    dist = np.empty((len(x), k), dtype=np.float32)
    for start in range(0, len(x), chunk):
        rows = x[start:start + chunk]
        d2 = np.maximum(sq[start:start + chunk, None] + sq[None] - 2 * rows @ x.T, 0)
        d2[np.arange(len(rows)), start + np.arange(len(rows))] = -1  # itself comes first
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        pd2 = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(pd2, axis=1, kind="stable")
        idx[start:start + chunk] = np.take_along_axis(part, order, axis=1)
        dist[start:start + chunk] = np.sqrt(np.maximum(np.take_along_axis(pd2, order, 1), 0))
    return idx, dist


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


# ---------------------------------------------------------------------------------------------
# maps and overlays


def heat_range(model: AnoMem) -> tuple[float, float]:
    """(vmin, vmax) of the shared colour scale: 0 to twice the pixel threshold."""
    thr = float(model.detector.pixel_threshold)
    return 0.0, 2 * thr if thr > 0 else 3.0


@functools.lru_cache(maxsize=8)
def colour_table(cmap: str = DEFAULT_CMAP, n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours of a plotly colour scale, so the app's colour bars match."""
    import plotly.colors as pc

    colours = pc.sample_colorscale(cmap, list(np.linspace(0, 1, n)))
    table = np.array([[int(float(v)) for v in c[c.index("(") + 1:-1].split(",")]
                      for c in colours], dtype=np.uint8)
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def colourise(heat: np.ndarray, vmin: float, vmax: float, cmap: str = DEFAULT_CMAP
              ) -> np.ndarray:
    """(H, W) values -> (H, W, 3) colours, values clipped to [vmin, vmax]."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=vmin)
    t = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    table = colour_table(cmap)
    return table[np.rint(t * (len(table) - 1)).astype(np.int64)]


def overlay(image: np.ndarray | torch.Tensor, heat: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Blend a heat map over an image: uint8 (H, W, 3); heat of any size is resized bilinearly.

    The colour of a value depends only on vmin and vmax, never on the image's own range.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: expected 0..1")
    rgb = to_rgb(image)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        t = torch.from_numpy(heat)[None, None]
        heat = F.interpolate(t, size=rgb.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    colours = colourise(heat, vmin, vmax, cmap).astype(np.float32)
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def colour_bar(vmin: float, vmax: float, width: int = 256, height: int = 12,
               cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """A horizontal legend strip of the colour scale."""
    row = colourise(np.linspace(vmin, vmax, width)[None], vmin, vmax, cmap)
    return np.repeat(row, height, axis=0)


@torch.no_grad()
def deviation_maps(model: AnoMem, image: torch.Tensor) -> dict[str, np.ndarray]:
    """{scale: (h, w) standardised distance map, "combined": (H, W) pixel map} of one image."""
    model.eval()
    out = model.score(_batch(image))
    maps = {s: m[0].cpu().numpy() for s, m in out.maps.items()}
    maps["combined"] = out.pixel_map[0].cpu().numpy()
    return maps


class Match(NamedTuple):
    prototype: int
    weight: float  # attention weight of that prototype at the position


@torch.no_grad()
def match_position(model: AnoMem, image: torch.Tensor, scale: str, row: int, col: int
                   ) -> Match:
    """The prototype a position of `scale` reads most strongly, and its attention weight."""
    model.eval()
    att = model(_batch(image))[scale].attention[0]  # (N, h, w)
    h, w = att.shape[1:]
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"position ({row}, {col}) is outside the {h}x{w} map of {scale}")
    weights = att[:, row, col]
    best = int(weights.argmax())
    return Match(best, float(weights[best]))


class Nearest(NamedTuple):
    row: int
    col: int  # the scale's most deviant position
    prototypes: list[int]  # nearest prototypes to its query, closest first
    cosine: list[float]


@dataclass
class ImageReport:
    """Everything the app shows for one image."""

    score: float
    threshold: float
    per_scale: dict[str, float]
    maps: dict[str, np.ndarray]  # as `deviation_maps`
    nearest: dict[str, Nearest]

    @property
    def anomalous(self) -> bool:
        return self.score > self.threshold


@torch.no_grad()
def inspect_image(model: AnoMem, image: torch.Tensor, k: int = 3) -> ImageReport:
    """Score, maps, and per scale the prototypes nearest to the most deviant position."""
    model.eval()
    x = _batch(image)
    scores = model.score(x)
    reads = model(x)
    maps = {s: m[0].cpu().numpy() for s, m in scores.maps.items()}
    nearest = {}
    for s in model.scales:
        row, col = np.unravel_index(int(np.argmax(maps[s])), maps[s].shape)
        q = reads[s].query[0, :, row, col]
        cos = model.memories[s].normalized_prototypes() @ q
        top = cos.topk(min(k, len(cos)))
        nearest[s] = Nearest(int(row), int(col), top.indices.tolist(),
                             [float(v) for v in top.values])
    maps["combined"] = scores.pixel_map[0].cpu().numpy()
    return ImageReport(
        score=float(scores.image[0]),
        threshold=float(model.detector.threshold),
        per_scale={s: float(v[0]) for s, v in scores.per_scale.items()},
        maps=maps,
        nearest=nearest,
    )


# ---------------------------------------------------------------------------------------------
# scores by sample and by anomaly type


def edge_cases(scores: np.ndarray, labels: np.ndarray, threshold: float, k: int = 8
               ) -> dict[str, list[int]]:
    """Indices worth a look: the highest-scoring normals, the lowest-scoring anomalies, and
    the samples of either kind closest to the threshold (each list in that order)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    normal, anomaly = np.flatnonzero(~labels), np.flatnonzero(labels)
    return {
        "normal_highest": normal[np.argsort(-scores[normal], kind="stable")][:k].tolist(),
        "anomaly_lowest": anomaly[np.argsort(scores[anomaly], kind="stable")][:k].tolist(),
        "near_threshold": np.argsort(np.abs(scores - threshold), kind="stable")[:k].tolist(),
    }


class TypeStats(NamedTuple):
    table: pd.DataFrame  # type, n, auroc, detection_rate: one row per anomaly type
    false_positive_rate: float | None  # share of normals above the threshold
    n_normal: int


def type_stats(scores: np.ndarray, labels: np.ndarray, types: list[str], threshold: float
               ) -> TypeStats:
    """Per anomaly type: AUROC against the normal samples and detection rate at `threshold`."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    types_arr = np.asarray(types)
    normal = types_arr == NORMAL
    flagged = scores > threshold
    rows = []
    for t in sorted(set(types) - {NORMAL}):
        of_type = types_arr == t
        keep = normal | of_type
        rows.append({
            "type": t,
            "n": int(of_type.sum()),
            "auroc": auroc(labels[keep], scores[keep]) if normal.any() else None,
            "detection_rate": float(flagged[of_type].mean()),
        })
    table = pd.DataFrame(rows, columns=["type", "n", "auroc", "detection_rate"])
    fpr = float(flagged[normal].mean()) if normal.any() else None
    return TypeStats(table, fpr, int(normal.sum()))


@dataclass
class TypeRoc:
    """One anomaly type against the normal images: its ROC curve and where a threshold sits."""

    kind: str
    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float | None
    at_threshold: tuple[float, float]  # (false-positive rate, detection rate) at the threshold


def roc_by_type(scores: np.ndarray, labels: np.ndarray, types: list[str], threshold: float
                ) -> list[TypeRoc]:
    """Per anomaly type, its ROC curve against every normal test image, and the point the
    threshold picks on it (the same false-positive rate on every curve)."""
    from sklearn.metrics import roc_curve

    scores, labels, kinds = np.asarray(scores), np.asarray(labels), np.asarray(types)
    normal = labels == 0
    out = []
    if not normal.any():
        return out
    fpr_at = float((scores[normal] > threshold).mean())
    for kind in type_order(types):
        keep = normal | (kinds == kind)
        if kind == NORMAL or not (kinds == kind).any():
            continue
        fpr, tpr, _ = roc_curve(labels[keep], scores[keep])
        tpr_at = float((scores[kinds == kind] > threshold).mean())
        out.append(TypeRoc(kind, fpr, tpr, auroc(labels[keep], scores[keep]), (fpr_at, tpr_at)))
    return out


def combined_maps(model: AnoMem, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(N, H, W) combined deviation maps of uint8 images: what the overlays show."""
    model.eval()
    maps = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            maps.append(model.score(to_float(images[i:i + batch])).pixel_map.cpu().numpy())
    return np.concatenate(maps) if maps else np.zeros((0, *images.shape[-2:]))


def type_order(types: list[str]) -> list[str]:
    """Normal first, then the anomaly types alphabetically."""
    present = set(types)
    return ([NORMAL] if NORMAL in present else []) + sorted(present - {NORMAL})


def mean_scale_profile(per_scale: dict[str, np.ndarray], types: list[str]) -> pd.DataFrame:
    """Mean standardised score of every scale (columns) for every type (rows, normal first)."""
    types_arr = np.asarray(types)
    order = type_order(types)
    data = {s: [float(np.mean(np.asarray(v)[types_arr == t])) for t in order]
            for s, v in per_scale.items()}
    return pd.DataFrame(data, index=pd.Index(order, name="type"))


def spread_examples(scores: np.ndarray, index: np.ndarray, k: int) -> list[int]:
    """k of `index`, evenly spread from the lowest to the highest score: a fair sample."""
    index = np.asarray(index)
    if len(index) <= k:
        return index[np.argsort(np.asarray(scores)[index], kind="stable")].tolist()
    ordered = index[np.argsort(np.asarray(scores)[index], kind="stable")]
    return ordered[np.unique(np.linspace(0, len(ordered) - 1, k).round().astype(int))].tolist()


# ---------------------------------------------------------------------------------------------
# uploads


def validate_upload(data: bytes, name: str, max_bytes: int = MAX_UPLOAD_BYTES,
                    max_pixels: int = MAX_UPLOAD_PIXELS, size: int | None = None,
                    channels: int = 3) -> np.ndarray:
    """Check an uploaded file (type, bytes, pixels) and decode it to uint8 (size, size, C).

    Raises DataError with a message naming the file; `size` and `channels` should be the
    run's `config.model.image_size` and `in_channels`.
    """
    from core.data.imageio import IMAGE_SUFFIXES, decode_bytes

    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(
            f"cannot read image {name!r}: file type {suffix or '(none)'!r} is not supported "
            f"(expected one of {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if len(data) > max_bytes:
        raise DataError(
            f"cannot read image {name!r}: {len(data) / 1e6:.1f} MB is over the limit of "
            f"{max_bytes / 1e6:.1f} MB"
        )
    return decode_bytes(data, name, size, channels, max_pixels)

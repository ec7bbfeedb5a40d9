"""Stage 1 on a frozen encoder: features computed once, memories initialised from them.

A frozen pretrained encoder gives the same features for the same pixels at every epoch, so
`FeatureCache` runs it once over `views` augmented views of every training image (and of a
shifted copy of each, the pseudo-anomalies of CSI) and keeps the maps in float16. A training
step then costs only the memories' pass, on at most STEP_POSITIONS positions of each map.

`init_memories` starts each scale from the cached features rather than from noise: the 1x1
projection is the PCA of the scale's normal features (what varies most among normals is kept),
and the prototypes are picked by k-means++ seeding (Arthur & Vassilvitskii 2007) among the
projected normal positions, which spreads them over the data, rare regions included: the
edge-case normals the memory is meant to hold. The contrastive loss then refines both.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from core.config import TrainConfig
from core.model.anomem import AnoMem
from core.train.augment import augment, to_float
from core.train.progress import Progress, ProgressFn
from core.train.shifts import shift

# Positions of each map a training step reads, drawn for each image: the pooled query of a
# random subset estimates the whole map's without bias, and the stride-8 stage's 16 x 16 maps
# then cost a quarter (the Hopfield read is most of a step's time)
STEP_POSITIONS = 64
INIT_ROWS = 20_000  # feature vectors per scale sampled for the PCA and the k-means++ seeding
BATCH = 32  # images per encoder pass while caching (smaller batches run faster per image)


def subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """At most n of `images`, a seeded random choice kept in order: the images stage 1 caches
    and stage 2 fits its Gaussians on (the same ones, for the same seed)."""
    if len(images) <= n:
        return images
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[keep.sort().values.to(images.device)]


class FeatureCache:
    """Encoder features of V views of each instance: normals, labelled anomalies, then one
    shifted copy of each normal (when the config asks for shifted negatives).

    `features[scale]` is (V, M, C, h, w) float16 on `device`, M = normals + anomalies + shifted.
    """

    def __init__(self, model: AnoMem, normals: torch.Tensor, anomalies: torch.Tensor,
                 tc: TrainConfig, device: torch.device, g: torch.Generator,
                 progress: ProgressFn | None = None) -> None:
        self.n_normal, self.n_anomaly = len(normals), len(anomalies)
        parts = [normals, anomalies]
        if tc.shift_negatives:
            parts.append(torch.cat([shift(normals[i:i + BATCH].to(device), tc.shift_negatives,
                                          g).cpu() for i in range(0, len(normals), BATCH)]))
        instances = torch.cat(parts)
        self.n_shifted = len(instances) - self.n_normal - self.n_anomaly
        self.features: dict[str, torch.Tensor] = {}
        total, done, last = tc.views * len(instances), 0, time.monotonic()
        for v in range(tc.views):
            chunks: dict[str, list[torch.Tensor]] = {s: [] for s in model.scales}
            for i in range(0, len(instances), BATCH):
                x = instances[i:i + BATCH].to(device)
                x = augment(x, tc.augment, g) if v > 0 else to_float(x)  # view 0: the image
                with torch.inference_mode():
                    out = model.backbone(x.contiguous(memory_format=torch.channels_last))
                for s in model.scales:
                    chunks[s].append(out[s].half().contiguous())
                done += len(x)
                if progress and time.monotonic() - last > 2:
                    last = time.monotonic()
                    progress(Progress("stage1", 0.0, f"encoding the training images: "
                                                     f"{done}/{total} views"))
            for s in model.scales:
                self.features.setdefault(s, torch.empty(0))
                stacked = torch.cat(chunks[s])[None]
                self.features[s] = stacked if v == 0 else torch.cat([self.features[s], stacked])

    @property
    def views(self) -> int:
        return next(iter(self.features.values())).shape[0]

    def shifted_index(self, normal_index: torch.Tensor) -> torch.Tensor:
        """Instances holding the shifted copies of these normals."""
        return normal_index + self.n_normal + self.n_anomaly

    def take(self, view: int, index: torch.Tensor, positions: int | None = None,
             g: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{scale: (B, C, h, w) float32} features of instances `index` in view `view`; with
        `positions`, at most that many positions of each map, drawn for each image, as a
        (B, C, 1, positions) map."""
        out = {}
        for s, f in self.features.items():
            x = f[view, index]
            if positions is not None and x.shape[2] * x.shape[3] > positions:
                b, c = x.shape[:2]
                pick = torch.rand(b, x.shape[2] * x.shape[3], generator=g).argsort(1)
                pick = pick[:, :positions].to(x.device)
                x = x.flatten(2).gather(2, pick[:, None, :].expand(-1, c, -1))[:, :, None]
            out[s] = x.float()
        return out


@torch.no_grad()
def init_memories(model: AnoMem, cache: FeatureCache, g: torch.Generator) -> None:
    """Each scale's projection from the PCA of its normal features, its prototypes by
    k-means++ seeding among the projected normal positions."""
    for s, memory in model.memories.items():
        maps = cache.features[s][0, :cache.n_normal]  # (N, C, h, w), the un-augmented view
        rows = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
        pick = torch.randperm(len(rows), generator=g)[:INIT_ROWS].to(rows.device)
        x = rows[pick].float()
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)  # (min(n, C), C)
        weight = memory.proj.weight  # (D, C, 1, 1)
        k = min(len(vh), weight.shape[0])
        weight[:k, :, 0, 0] = vh[:k]
        weight[k:] *= 0.01  # dimensions beyond the features' rank: left for training to use
        memory.proj.bias.copy_(-(weight[:, :, 0, 0] @ mean))
        queries = F.normalize(F.conv2d(x[:, :, None, None], weight, memory.proj.bias)[:, :, 0, 0],
                              dim=1)
        memory.prototypes.copy_(kmeans_pp(queries, memory.size, g))


def kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k rows of x (M, D) by k-means++ seeding: each next one drawn with probability
    proportional to its squared distance to those already chosen."""
    first = int(torch.randint(len(x), (1,), generator=g))
    chosen = [first]
    nearest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, min(k, len(x))):
        p = nearest.clamp_min(0).cpu().double()
        if p.sum() <= 0:  # fewer distinct rows than k: any row will do
            p = torch.ones_like(p)
        nxt = int(torch.multinomial(p, 1, generator=g))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (x - x[nxt]).pow(2).sum(1))
    out = x[chosen]
    if len(out) < k:  # fewer rows than prototypes: repeat them
        out = out[torch.arange(k) % len(out)]
    return out

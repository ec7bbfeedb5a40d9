"""What the explorer's pages show, computed once and saved in the run folder.

Scoring a large test set, a UMAP per scale and the prototype galleries take seconds to minutes
on a CPU; a page that recomputed them at every first visit would keep its user waiting. At the
end of training (and by `anomem evaluate`) they are computed and written next to the weights as
`explore.safetensors`: the test set's image, per-scale and per-term scores (and the image
scores before any lesson, with each image's look-alike descriptor), each scale's UMAP
coordinates, and each prototype's top gallery patches with its usage. The file records the
SHA-256 of the weights it was computed from and its format version; a file that does not match
is ignored and computed again. Older runs (and refits) get theirs on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from core import explore
from core.data import Split
from core.model.anomem import AnoMem
from core.runs import WEIGHTS, RunError, run_lock, save_tensors
from core.train.scoring import ScoredSet, score_images, taught

LOG = logging.getLogger(__name__)

ARTEFACTS = "explore.safetensors"
FORMAT = 3  # bump when the layout below changes: older files are then recomputed
MAX_GALLERY_IMAGES = 2000  # normal training images searched for prototype patches
MAX_UMAP_POINTS = 5000  # test images placed in each UMAP
PATCHES_PER_PROTOTYPE = 8  # the most the Prototypes page shows

Say = Callable[[str, float], None]  # (what, fraction done) for a progress bar


@dataclass
class Artefacts:
    scored: ScoredSet  # the test set, in its order (no pixel maps)
    umap: dict[str, explore.UmapPoints]
    patches: dict[str, explore.PrototypePatches]  # hits index `gallery_index`'s images


def gallery_index(split: Split, seed: int) -> np.ndarray:
    """Indices into `split.train` of the normal images prototype galleries are drawn from."""
    normal = torch.nonzero(split.train.labels == 0).flatten().numpy()
    return normal[explore.subsample(len(normal), MAX_GALLERY_IMAGES, seed)]


def weights_digest(run_dir: Path) -> str:
    h = hashlib.sha256()
    with open(Path(run_dir) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compute(model: AnoMem, split: Split, seed: int, say: Say | None = None) -> Artefacts:
    """Everything the pages need, for `model` on `split` (uint8 images, CPU)."""
    say = say or (lambda what, done: None)
    steps = 1 + 2 * len(model.scales)
    say("scoring the test set", 0.0)
    scored = score_images(model, split.test.images, with_maps=False)
    gallery = split.train.images[torch.as_tensor(gallery_index(split, seed))]
    umap, patches = {}, {}
    for i, scale in enumerate(model.scales):
        say(f"prototype galleries of {scale}", (1 + 2 * i) / steps)
        patches[scale] = explore.top_patches(model, gallery, scale,
                                             per_prototype=PATCHES_PER_PROTOTYPE)
        say(f"UMAP of {scale}", (2 + 2 * i) / steps)
        umap[scale] = explore.umap_points(model, split.test.images, scale, seed=seed,
                                          max_points=MAX_UMAP_POINTS)
    say("done", 1.0)
    return Artefacts(scored, umap, patches)


def save(run_dir: Path, art: Artefacts) -> None:
    """Write `explore.safetensors` (atomically) under the run's lock."""
    run_dir = Path(run_dir)
    tensors: dict[str, torch.Tensor] = {"scores/image": torch.as_tensor(art.scored.image)}
    tensors |= {f"scores/scale/{s}": torch.as_tensor(v) for s, v in art.scored.per_scale.items()}
    tensors |= {f"scores/term/{k}": torch.as_tensor(v) for k, v in art.scored.terms.items()}
    if art.scored.untaught is not None and art.scored.descriptors is not None:
        tensors["scores/untaught"] = torch.as_tensor(art.scored.untaught)
        tensors["descriptors"] = torch.as_tensor(art.scored.descriptors)
    shapes = {}
    for s, pts in art.umap.items():
        tensors[f"umap/{s}/samples"] = torch.as_tensor(pts.samples, dtype=torch.float32)
        tensors[f"umap/{s}/prototypes"] = torch.as_tensor(pts.prototypes, dtype=torch.float32)
        tensors[f"umap/{s}/index"] = torch.as_tensor(pts.index, dtype=torch.int64)
    for s, p in art.patches.items():
        k = max((len(h) for h in p.hits), default=0)
        hits = np.full((p.size, k, 3), -1, dtype=np.int64)
        weights = np.zeros((p.size, k), dtype=np.float32)
        for j, row in enumerate(p.hits):
            for m, hit in enumerate(row):
                hits[j, m] = (hit.image, hit.row, hit.col)
                weights[j, m] = hit.weight
        tensors[f"patches/{s}/hits"] = torch.from_numpy(hits)
        tensors[f"patches/{s}/weights"] = torch.from_numpy(weights)
        tensors[f"patches/{s}/usage"] = torch.as_tensor(p.usage, dtype=torch.int64)
        tensors[f"patches/{s}/duplicates"] = torch.tensor(
            [[a, b, c] for a, b, c in p.duplicates], dtype=torch.float64).reshape(-1, 3)
        shapes[s] = {"stride": p.stride, "map_size": list(p.map_size)}
    metadata = {"format": str(FORMAT), "weights_sha256": weights_digest(run_dir),
                "scales": json.dumps(list(art.umap)), "patches": json.dumps(shapes),
                "terms": json.dumps(list(art.scored.terms))}
    with run_lock(run_dir, create=False):
        save_tensors(run_dir / ARTEFACTS, {k: v.contiguous() for k, v in tensors.items()},
                     metadata)


def load(run_dir: Path) -> Artefacts | None:
    """The saved artefacts; None when absent, unreadable, of another format, or computed from
    other weights (the reason is logged)."""
    path = Path(run_dir) / ARTEFACTS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != str(FORMAT):
            LOG.info("%s: format %s, not %s: computed again", path, meta.get("format"), FORMAT)
            return None
        if meta.get("weights_sha256") != weights_digest(run_dir):
            LOG.info("%s: computed from other weights: computed again", path)
            return None
        t = load_file(str(path))
        scales = json.loads(meta["scales"])
        shapes = json.loads(meta["patches"])
        terms = json.loads(meta["terms"])
        scored = ScoredSet(
            image=t["scores/image"].numpy(),
            per_scale={s: t[f"scores/scale/{s}"].numpy() for s in scales},
            terms={k: t[f"scores/term/{k}"].numpy() for k in terms},
            pixel_maps=None,
            untaught=t["scores/untaught"].numpy() if "scores/untaught" in t else None,
            descriptors=t["descriptors"].numpy() if "descriptors" in t else None)
        umap = {s: explore.UmapPoints(t[f"umap/{s}/samples"].numpy(),
                                      t[f"umap/{s}/prototypes"].numpy(),
                                      t[f"umap/{s}/index"].numpy()) for s in scales}
        patches = {}
        for s in scales:
            hits, weights = t[f"patches/{s}/hits"].numpy(), t[f"patches/{s}/weights"].numpy()
            patches[s] = explore.PrototypePatches(
                scale=s, stride=float(shapes[s]["stride"]), map_size=tuple(shapes[s]["map_size"]),
                hits=[[explore.PatchHit(int(a), int(r), int(c), float(w))
                       for (a, r, c), w in zip(hits[j], weights[j], strict=True) if a >= 0]
                      for j in range(len(hits))],
                usage=t[f"patches/{s}/usage"].numpy(),
                duplicates=[(int(a), int(b), float(c))
                            for a, b, c in t[f"patches/{s}/duplicates"].tolist()])
        return Artefacts(scored, umap, patches)
    except (OSError, KeyError, ValueError, SafetensorError, json.JSONDecodeError) as err:
        LOG.warning("%s cannot be read (%s): computed again", path, err)
        return None


def ensure(run_dir: Path, model: AnoMem, split: Split, seed: int, say: Say | None = None
           ) -> Artefacts:
    """The run's artefacts: read, or computed and saved (kept in memory only when another
    process holds the run). A taught run's image scores are its lessons applied again to the
    saved scores before any lesson, so that they follow the lessons' rule of this version."""
    art = load(run_dir)
    if art is not None:
        scored = art.scored
        if model.lessons is not None and scored.untaught is not None \
                and scored.descriptors is not None:
            art = dataclasses.replace(art, scored=taught(scored, model))
        return art
    art = compute(model, split, seed, say)
    try:
        save(run_dir, art)
    except RunError as err:  # another process holds the run: use them, save them next time
        LOG.info("artefacts of %s not saved: %s", run_dir, err)
    return art

"""The peer detectors the benchmark runs beside AnoMem, on the same images.

Every peer takes the uint8 (N, C, H, W) images the data loaders produce, fits on normal
images (optionally also on labelled anomalies) and gives each scored image one number, higher
meaning more anomalous, so the benchmark computes the same metrics for every detector:

- `PixelKNN`: cosine k-nearest-neighbour distance on raw pixels, the simplest memory of
  normality there is.
- `IForestPeer`, `OCSVMPeer`: PyOD's isolation forest and one-class SVM on small thumbnails,
  the classical shallow baselines.
- `DeepSVDD`: one-class Deep SVDD (Ruff et al., ICML 2018), which becomes Deep SAD (Ruff et
  al., ICLR 2020) when it is given labelled anomalies: the deep one-class baseline.

The shallow peers ignore labelled anomalies: they are unsupervised. core/bench/feature_peers.py
adds three peers on AnoMem's own pretrained features; a `MapPeer` also gives anomaly maps.
"""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.data.imageio import resize_batch


@runtime_checkable
class Peer(Protocol):
    """What the benchmark needs of a detector."""

    name: str  # short label for tables, e.g. "kNN (pixels, k=2)"

    def fit(self, normals: torch.Tensor, anomalies: torch.Tensor | None = None) -> None: ...

    def score(self, images: torch.Tensor) -> np.ndarray: ...  # (N,), higher = more anomalous


@runtime_checkable
class MapPeer(Peer, Protocol):
    """A peer that also says where an image is anomalous, for pixel AUROC."""

    def maps(self, images: torch.Tensor) -> np.ndarray: ...  # (N, H, W) at the images' size


def make_peers(minutes: float, seed: int, device: str) -> list[Peer]:
    """The benchmark's peers in a fixed order; `minutes` bounds Deep SVDD's training."""
    return [
        PixelKNN(k=2, device=device),
        IForestPeer(size=16, seed=seed),
        OCSVMPeer(size=16, nu=0.1, seed=seed),
        DeepSVDD(minutes=minutes, seed=seed, device=device),
    ]


# ---------------------------------------------------------------------------------------------
# input checks shared by every peer


def check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    """A non-empty uint8 (N, C, H, W) tensor, or a ValueError saying what is wrong."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.dtype != torch.uint8:
        got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
               if isinstance(images, torch.Tensor) else type(images).__name__)
        raise ValueError(f"{what}: expected a uint8 (N, C, H, W) tensor, got a {got}")
    if len(images) == 0:
        raise ValueError(f"{what}: no images")
    if min(images.shape[1:]) == 0:
        raise ValueError(f"{what}: images of shape {tuple(images.shape[1:])} hold no pixels")
    return images


class _PeerBase:
    """Remembers the channel count seen by `fit`, so `score` can refuse other images."""

    name: str
    _channels: int | None = None

    def _check_fit(self, normals: torch.Tensor, anomalies: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checked normals, and checked anomalies (None when absent or empty)."""
        self._channels = None  # a failed fit leaves the peer unfitted
        normals = check_images(normals, "normal images")
        if anomalies is not None and len(anomalies) == 0:
            anomalies = None
        if anomalies is not None:
            anomalies = check_images(anomalies, "labelled anomalies")
            if anomalies.shape[1] != normals.shape[1]:
                raise ValueError(
                    f"labelled anomalies are {anomalies.shape[1]}-channel images but the normal "
                    f"images are {normals.shape[1]}-channel"
                )
        return normals, anomalies

    def _fitted(self, normals: torch.Tensor) -> None:
        self._channels = normals.shape[1]

    def _check_score(self, images: torch.Tensor) -> torch.Tensor:
        if self._channels is None:
            raise ValueError(f"{self.name}: score called before fit")
        images = check_images(images, "images to score")
        if images.shape[1] != self._channels:
            raise ValueError(
                f"{self.name}: fitted on {self._channels}-channel images, got "
                f"{images.shape[1]}-channel images to score"
            )
        return images


def flat_pixels(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C * size * size) in [0, 1], area-resized."""
    out = []
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float().div_(255)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        out.append(x.flatten(1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# shallow peers


class PixelKNN(_PeerBase):
    """Mean cosine distance to the k nearest training images, on raw pixels.

    Each image is flattened and L2-normalised as it is (no mean subtracted); distances come from
    batched matrix products, so 5,000 training and 10,000 test images of 32x32x3 take about 5 s
    on one CPU core. An all-black image has no direction and scores 1, the largest distance
    between non-negative images. Scored images must have the training images' size.
    """

    def __init__(self, k: int = 2, device: str = "cpu", batch: int = 1024) -> None:
        if k < 1:
            raise ValueError(f"k={k}: expected at least 1 neighbour")
        if batch < 1:
            raise ValueError(f"batch={batch}: expected at least 1 image per batch")
        self.k, self.device, self.batch = k, torch.device(device), batch
        self.name = f"kNN (pixels, k={k})"
        self._bank: torch.Tensor | None = None  # (M, D) unit rows

    def fit(self, normals: torch.Tensor, anomalies: torch.Tensor | None = None) -> None:
        normals, _ = self._check_fit(normals, anomalies)
        if len(normals) < self.k:
            raise ValueError(
                f"{self.name}: needs at least {self.k} normal images, got {len(normals)}"
            )
        self._bank = torch.cat([
            F.normalize(normals[i:i + self.batch].flatten(1).float(), dim=1).to(self.device)
            for i in range(0, len(normals), self.batch)
        ])
        self._size = tuple(normals.shape[-2:])
        self._fitted(normals)

    def score(self, images: torch.Tensor) -> np.ndarray:
        images = self._check_score(images)
        if tuple(images.shape[-2:]) != self._size:
            raise ValueError(
                f"{self.name}: images are {images.shape[-2]}x{images.shape[-1]} but the peer "
                f"was fitted on {self._size[0]}x{self._size[1]}"
            )
        assert self._bank is not None
        step = max(1, min(self.batch, 2**25 // len(self._bank)))  # (step, M) similarities
        out = []
        for start in range(0, len(images), step):
            query = F.normalize(images[start:start + step].flatten(1).float().to(self.device),
                                dim=1)
            sims = query @ self._bank.T  # (B, D) @ (D, M) -> (B, M)
            out.append((1 - sims.topk(self.k, dim=1).values).mean(dim=1).cpu())
        return torch.cat(out).double().numpy()


class IForestPeer(_PeerBase):
    """PyOD's isolation forest on size x size thumbnails (area-resized, pixels in [0, 1])."""

    def __init__(self, size: int = 16, seed: int = 0, n_estimators: int = 100) -> None:
        if size < 1:
            raise ValueError(f"size={size}: expected at least 1 pixel")
        self.size, self.seed, self.n_estimators = size, seed, n_estimators
        self.name = f"IForest ({size}x{size} px)"

    def fit(self, normals: torch.Tensor, anomalies: torch.Tensor | None = None) -> None:
        from pyod.models.iforest import IForest

        normals, _ = self._check_fit(normals, anomalies)
        self._model = IForest(n_estimators=self.n_estimators, random_state=self.seed)
        self._model.fit(flat_pixels(normals, self.size).numpy())
        self._fitted(normals)

    def score(self, images: torch.Tensor) -> np.ndarray:
        images = self._check_score(images)
        scores = self._model.decision_function(flat_pixels(images, self.size).numpy())
        return np.asarray(scores, dtype=np.float64)


class OCSVMPeer(_PeerBase):
    """PyOD's one-class SVM (RBF kernel, gamma = 1 / features) on size x size thumbnails.

    Kernel SVM training grows about quadratically with the training set, so at most `max_train`
    normal images (a seeded random subset) are used, which keeps the fit to seconds on any data
    set (measured on CIFAR-10 thumbnails, one core: 0.4 s for 2,000 images, 2.3 s for 5,000).
    """

    def __init__(self, size: int = 16, nu: float = 0.1, seed: int = 0,
                 max_train: int = 2_000) -> None:
        if size < 1:
            raise ValueError(f"size={size}: expected at least 1 pixel")
        if not 0 < nu <= 1:
            raise ValueError(f"nu={nu}: expected 0 < nu <= 1")
        if max_train < 1:
            raise ValueError(f"max_train={max_train}: expected at least 1 image")
        self.size, self.nu, self.seed, self.max_train = size, nu, seed, max_train
        self.name = f"OCSVM ({size}x{size} px, nu={nu})"

    def fit(self, normals: torch.Tensor, anomalies: torch.Tensor | None = None) -> None:
        from pyod.models.ocsvm import OCSVM

        normals, _ = self._check_fit(normals, anomalies)
        train = normals
        if len(normals) > self.max_train:
            rng = np.random.default_rng(self.seed)
            pick = np.sort(rng.choice(len(normals), size=self.max_train, replace=False))
            train = normals[torch.from_numpy(pick)]
        self._model = OCSVM(kernel="rbf", gamma="auto", nu=self.nu)
        self._model.fit(flat_pixels(train, self.size).numpy())
        self._fitted(normals)

    def score(self, images: torch.Tensor) -> np.ndarray:
        images = self._check_score(images)
        scores = self._model.decision_function(flat_pixels(images, self.size).numpy())
        return np.asarray(scores, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Deep SVDD / Deep SAD


class SVDDLeNet(nn.Module):
    """The Deep SVDD paper's CIFAR-10 network: 32x32 input, 128-d output, no bias anywhere.

    Three 5x5 convolutions (32, 64, 128 channels), each followed by batch norm without affine
    parameters, leaky ReLU and 2x2 max-pooling, then a bias-free linear map. Bias terms (and
    BN's shift) would let the network reach a constant output, the trivial zero-loss solution
    the paper calls hypersphere collapse.
    """

    rep_dim = 128

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(cin, cout, 5, padding=2, bias=False)
            for cin, cout in ((in_channels, 32), (32, 64), (64, 128))
        ])
        self.norms = nn.ModuleList([
            nn.BatchNorm2d(c, eps=1e-4, affine=False) for c in (32, 64, 128)
        ])
        self.fc = nn.Linear(128 * 4 * 4, self.rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, 32, 32) -> (B, 128, 4, 4) -> (B, 128)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.max_pool2d(F.leaky_relu(norm(conv(x))), 2)
        return self.fc(x.flatten(1))


def global_contrast_normalise(x: torch.Tensor) -> torch.Tensor:
    """Per image: subtract the mean pixel, divide by the mean absolute deviation (l1 scale).

    The Deep SVDD paper's preprocessing; (N, C, H, W) float -> same shape.
    """
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    return x / x.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)


def svdd_centre(outputs: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Mean of the initial outputs (N, D) -> (D,), coordinates near zero pushed to +-eps.

    A coordinate of c at zero could be matched by zero weights into that output unit; the
    paper's fix keeps every coordinate at least eps away from it.
    """
    c = outputs.mean(dim=0)
    small = c.abs() < eps
    c[small & (c < 0)] = -eps
    c[small & (c >= 0)] = eps
    return c


def svdd_loss(dist: torch.Tensor, anomalous: torch.Tensor | None = None, eta: float = 1.0,
              eps: float = 1e-6) -> torch.Tensor:
    """One-class Deep SVDD objective, or Deep SAD's when some samples are labelled anomalies.

    dist: (B,) squared distances to the centre; anomalous: (B,) bool. Normal samples cost their
    distance, labelled anomalies eta / (distance + eps), so they are pushed away from c.
    """
    if anomalous is None:
        return dist.mean()
    return torch.where(anomalous, eta / (dist + eps), dist).mean()


class DeepSVDD(_PeerBase):
    """One-class Deep SVDD (Ruff et al., ICML 2018); Deep SAD (ICLR 2020) with labels.

    Inputs are resized to 32x32, globally contrast-normalised (l1) and min-max scaled by the
    training normals' range, as in the paper. The centre c is the mean output of the freshly
    initialised network on the normal images (batch-norm statistics first estimated by one
    pass over them, as pre-training would have left them); the network is then trained with
    Adam (lr 1e-4, weight decay 1e-6, batches of 200 by default) to pull normal images towards
    c. Score: squared distance to c.

    Unlike the paper, there is no autoencoder pre-training and no learning-rate milestone:
    this baseline is weaker than the published one (64.8 mean AUROC on CIFAR-10 one-class uses
    pre-training). Training stops after `epochs` passes or `minutes` of wall-clock time,
    whichever comes first; with a time bound the number of steps depends on the machine, so
    fix `epochs` (and `minutes=None`) for reproducible scores.

    When `fit` gets labelled anomalies, they are shuffled into the batches with Deep SAD's
    loss eta / (||phi(x) - c||^2 + eps), eta = 1, and the peer is named "Deep SAD"
    (`labelled=True` gives it that name before `fit`, for a plan that will pass them).
    Seeded and deterministic on the CPU.
    """

    size = 32
    weight_decay = 1e-6
    eta = 1.0

    def __init__(self, minutes: float | None = 1.0, epochs: int | None = None, seed: int = 0,
                 device: str = "cpu", *, batch: int = 200, lr: float = 1e-4,
                 labelled: bool = False) -> None:
        if minutes is None and epochs is None:
            raise ValueError("DeepSVDD needs a bound on training: minutes, epochs or both")
        if minutes is not None and not minutes > 0:
            raise ValueError(f"minutes={minutes}: expected a positive training time")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs}: expected at least one epoch")
        if batch < 1 or not lr > 0:
            raise ValueError(f"batch={batch}, lr={lr}: expected a positive batch and rate")
        self.minutes, self.epochs, self.seed = minutes, epochs, seed
        self.batch, self.lr = batch, lr
        self.device = torch.device(device)
        self.name = "Deep SAD" if labelled else "Deep SVDD"  # the name it will fit under
        self.steps = 0  # optimiser steps taken by the last fit
        self.epochs_run = 0.0  # passes over the training set, fractional when time ran out

    def fit(self, normals: torch.Tensor, anomalies: torch.Tensor | None = None) -> None:
        normals, anomalies = self._check_fit(normals, anomalies)
        self.name = "Deep SVDD" if anomalies is None else "Deep SAD"
        deadline = math.inf if self.minutes is None else time.monotonic() + self.minutes * 60

        x = global_contrast_normalise(resize_batch(normals, self.size).float())
        self._low, self._high = x.min().item(), x.max().item()
        x = self._scale(x)
        labels = torch.zeros(len(x), dtype=torch.bool)
        if anomalies is not None:
            x = torch.cat([x, self._scale(global_contrast_normalise(
                resize_batch(anomalies, self.size).float()))])
            labels = torch.cat([labels, torch.ones(len(anomalies), dtype=torch.bool)])

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = SVDDLeNet(normals.shape[1]).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        self._net = net
        self.c = svdd_centre(self._initial_outputs(net, x[~labels]))

        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        net.train()
        n, self.steps, epoch = len(x), 0, 0
        done = False
        while not done:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, self.batch):
                idx = order[start:start + self.batch]
                dist = self._dist(net(x[idx].to(self.device)))
                loss = svdd_loss(dist, labels[idx].to(self.device), self.eta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.steps += 1
                if time.monotonic() >= deadline:
                    self.epochs_run = epoch + (start + len(idx)) / n
                    done = True
                    break
            else:
                epoch += 1
                self.epochs_run = float(epoch)
                done = self.epochs is not None and epoch >= self.epochs
        net.eval()
        self._fitted(normals)

    def score(self, images: torch.Tensor) -> np.ndarray:
        images = self._check_score(images)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), 1024):
                x = resize_batch(images[start:start + 1024], self.size).float()
                x = self._scale(global_contrast_normalise(x)).to(self.device)
                out.append(self._dist(self._net(x)).cpu())
        return torch.cat(out).double().numpy()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._low) / max(self._high - self._low, 1e-8)

    def _dist(self, outputs: torch.Tensor) -> torch.Tensor:
        return ((outputs - self.c) ** 2).sum(dim=1)  # (B, D) -> (B,)

    def _initial_outputs(self, net: SVDDLeNet, x: torch.Tensor) -> torch.Tensor:
        """Outputs (N, D) of the untrained network on the normal images, in evaluation mode.

        Batch-norm running statistics are first set by one pass in training mode (cumulative
        averages), so c is computed as the network will later score.
        """
        norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        with torch.no_grad():
            net.train()
            for start in range(0, len(x), self.batch):
                net(x[start:start + self.batch].to(self.device))
            net.eval()
            outputs = torch.cat([net(x[start:start + 1024].to(self.device))
                                 for start in range(0, len(x), 1024)])
        for m in norms:
            m.momentum = 0.1
        return outputs

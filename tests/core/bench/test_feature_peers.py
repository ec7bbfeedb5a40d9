"""core/bench/feature_peers.py: DN2, PaDiM and PatchCore on the frozen EfficientNet-Lite0.

Generated images: a smooth horizontal ramp with mild noise is normal; an anomaly has a bright
6x6 square pasted at a random place. Peers read them at 64 px (32 px where only the contract
is checked) with the ImageNet weights, which load in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from core.bench import feature_peers
from core.bench.feature_peers import (
    DN2,
    PaDiM,
    PatchCore,
    gaussian_blur,
    greedy_coreset,
    make_feature_peers,
    nearest,
)
from core.bench.peers import MapPeer, Peer
from core.metrics import auroc

PEERS: dict[str, Callable[..., Peer]] = {"dn2": DN2, "padim": PaDiM, "patchcore": PatchCore}
SIZE = 32  # image side
SQUARE = 6  # side of the pasted square


class Toy(NamedTuple):
    normals: torch.Tensor  # (24, 3, 32, 32) uint8
    test: torch.Tensor  # 8 normal, then 8 anomalous images
    labels: np.ndarray
    masks: torch.Tensor  # (16, 32, 32) uint8, 1 on the pasted square


def ramp_images(n: int, seed: int, square: bool = False, channels: int = 3,
                size: tuple[int, int] = (SIZE, SIZE)) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy ramps, each with a bright square pasted when `square`; images and masks."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    x = torch.linspace(0.3, 0.6, width).expand(n, channels, height, width).clone()
    x += 0.03 * torch.randn(n, channels, height, width, generator=g)
    masks = torch.zeros(n, height, width, dtype=torch.uint8)
    if square:
        for i in range(n):
            r = int(torch.randint(3, height - SQUARE - 3, (), generator=g))
            c = int(torch.randint(3, width - SQUARE - 3, (), generator=g))
            x[i, :, r:r + SQUARE, c:c + SQUARE] = 1.0
            masks[i, r:r + SQUARE, c:c + SQUARE] = 1
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), masks


@pytest.fixture(scope="module")
def toy() -> Toy:
    normals, _ = ramp_images(24, seed=0)
    good, good_masks = ramp_images(8, seed=1)
    bad, bad_masks = ramp_images(8, seed=2, square=True)
    return Toy(normals, torch.cat([good, bad]), np.r_[np.zeros(8), np.ones(8)],
               torch.cat([good_masks, bad_masks]))


@pytest.fixture(scope="module")
def fitted(toy: Toy) -> dict[str, Peer]:
    peers = {key: make(input_size=64) for key, make in PEERS.items()}
    for peer in peers.values():
        peer.fit(toy.normals)
    return peers


# ---------------------------------------------------------------------------------------------
# the contract


def test_make_feature_peers_gives_the_three_in_order() -> None:
    peers = make_feature_peers(input_size=96, seed=3, device="cpu")
    assert [type(p) for p in peers] == [DN2, PaDiM, PatchCore]
    assert all(isinstance(p, Peer) for p in peers)
    assert [isinstance(p, MapPeer) for p in peers] == [False, True, True]
    assert [p.name for p in peers] == ["DN2 kNN (EfficientNet-Lite0)",
                                       "PaDiM (EfficientNet-Lite0)",
                                       "PatchCore (EfficientNet-Lite0)"]
    assert all(p.input_size == 96 and p.seed == 3 for p in peers)


def test_the_three_peers_pass_each_image_set_through_one_frozen_encoder_once(
        toy: Toy, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    forward = feature_peers.EfficientNetLite0.forward

    def counted(net, x):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        calls.append(len(x))
        return forward(net, x)

    monkeypatch.setattr(feature_peers.EfficientNetLite0, "forward", counted)
    monkeypatch.setattr(feature_peers, "_SHARED", {})
    peers = [make(input_size=64) for make in PEERS.values()]
    for peer in peers:
        peer.fit(toy.normals.clone())  # an equal copy, as each benchmark peer gets
        peer.score(toy.test)
    assert sum(calls) == len(toy.normals) + len(toy.test)  # once per image for all three
    assert max(feature_peers.STAGES[s][0] for s in feature_peers.SHARED_STAGES) == 7


@pytest.mark.parametrize("key", PEERS)
def test_score_before_fit_is_refused(key: str) -> None:
    images, _ = ramp_images(2, seed=0)
    with pytest.raises(ValueError, match="before fit"):
        PEERS[key](input_size=32).score(images)


@pytest.mark.parametrize("key", PEERS)
def test_bad_settings_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="input_size=16"):
        PEERS[key](input_size=16)
    with pytest.raises(ValueError, match="batch=0"):
        PEERS[key](batch=0)


@pytest.mark.parametrize("key", PEERS)
def test_grey_images_and_ignored_labels(key: str) -> None:
    """Greyscale works at any size; labelled anomalies change nothing: the peers are
    unsupervised."""
    normals, _ = ramp_images(6, seed=0, channels=1, size=(28, 20))
    anomalies, _ = ramp_images(2, seed=1, square=True, channels=1, size=(28, 20))
    test, _ = ramp_images(3, seed=2, channels=1, size=(28, 20))
    scores = []
    for labelled in (None, anomalies):
        peer = PEERS[key](input_size=32)
        peer.fit(normals, labelled)
        scores.append(peer.score(test))
    assert scores[0].shape == (3,) and scores[0].dtype == np.float64
    assert np.isfinite(scores[0]).all()
    np.testing.assert_array_equal(scores[0], scores[1])
    if isinstance(peer, MapPeer):
        maps = peer.maps(test)
        assert maps.shape == (3, 28, 20) and maps.dtype == np.float32
    with pytest.raises(ValueError, match="fitted on 1-channel images, got 3-channel"):
        peer.score(ramp_images(1, seed=3)[0])


# ---------------------------------------------------------------------------------------------
# detection on the pasted squares


@pytest.mark.parametrize("key", PEERS)
def test_peers_find_the_pasted_squares(toy: Toy, fitted: dict[str, Peer], key: str) -> None:
    scores = fitted[key].score(toy.test)
    assert scores.shape == (16,) and np.isfinite(scores).all()
    assert auroc(toy.labels, scores) > 0.95


@pytest.mark.parametrize("key", ["padim", "patchcore"])
def test_maps_peak_on_the_pasted_squares(toy: Toy, fitted: dict[str, Peer], key: str) -> None:
    maps = fitted[key].maps(toy.test)
    assert maps.shape == (16, SIZE, SIZE) and maps.dtype == np.float32
    masks = toy.masks.numpy().astype(bool)
    for m, mask in zip(maps[8:], masks[8:], strict=True):
        r, c = np.unravel_index(m.argmax(), m.shape)
        assert mask[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3].any()  # within 2 px of it
        assert m[mask].mean() > 1.5 * m[~mask].mean()
    # the square's pixels outrank the rest, across the anomalous images
    assert auroc(masks[8:].ravel(), maps[8:].ravel()) > 0.9


def test_padim_score_is_the_maximum_of_its_map(toy: Toy, fitted: dict[str, Peer]) -> None:
    peer = fitted["padim"]
    np.testing.assert_allclose(peer.score(toy.test), peer.maps(toy.test).max(axis=(1, 2)),
                               rtol=1e-6)


def test_padim_gaussians_match_numpy(toy: Toy, fitted: dict[str, Peer]) -> None:
    """Per position: the mean of the embeddings, and L^-1 whitening the covariance + 0.01 I."""
    peer = fitted["padim"]
    with torch.inference_mode():
        e = torch.cat([peer._embed(f) for f in peer._read(toy.normals)]).double().numpy()
    assert e.shape[1] == 100  # (N, d, P)
    np.testing.assert_allclose(peer._mean.numpy(), e.mean(0).T, rtol=1e-4, atol=1e-4)
    for p in (0, e.shape[2] // 2, e.shape[2] - 1):
        cov = np.cov(e[:, :, p], rowvar=False) + 0.01 * np.eye(100)
        w = peer._whiten[p].double().numpy()
        np.testing.assert_allclose(w @ cov @ w.T, np.eye(100), atol=1e-3)


def test_padim_keeps_a_seeded_channel_subset() -> None:
    a, b, c = PaDiM(seed=0), PaDiM(seed=0), PaDiM(seed=1)
    assert len(a._keep) == 100 and len(set(a._keep.tolist())) == 100
    assert int(a._keep.max()) < 24 + 40 + 112
    assert torch.equal(a._keep, b._keep) and not torch.equal(a._keep, c._keep)
    with pytest.raises(ValueError, match="d=177"):
        PaDiM(d=177)


def test_patchcore_reweighting_stays_within_its_bounds(toy: Toy, fitted: dict[str, Peer]
                                                       ) -> None:
    """Eq. 7's weight is 1 - softmax of the nearest of b distances: between 1 - 1/b and 1."""
    peer = fitted["patchcore"]
    weighted = peer.score(toy.test)
    peer.reweight = False
    try:
        plain = peer.score(toy.test)
    finally:
        peer.reweight = True
    with torch.inference_mode():  # plain: the largest nearest-neighbour patch distance
        patches = torch.cat([peer._patches(f) for f in peer._read(toy.test)])
        dist, _ = nearest(patches.flatten(0, 2), peer.bank)
    np.testing.assert_allclose(plain, dist.view(16, -1).max(1).values.double().numpy(),
                               rtol=1e-5)
    assert (weighted <= plain + 1e-6).all() and (weighted >= plain * (1 - 1 / 9) - 1e-6).all()


def test_patchcore_bank_is_a_tenth_of_the_sampled_patches(toy: Toy) -> None:
    peer = PatchCore(input_size=64, max_patches=500)
    peer.fit(toy.normals)  # 24 images x 8 x 8 patches = 1536, 500 of them sampled
    assert peer.bank.shape == (50, 40 + 112)
    assert len(torch.unique(peer.bank, dim=0)) == 50


# ---------------------------------------------------------------------------------------------
# the shared pieces


def covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    """The largest distance from any point to its nearest chosen point."""
    return torch.cdist(points, points[chosen]).min(dim=1).values.max().item()


def test_coreset_picks_distinct_points_that_cover_better_than_random() -> None:
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(12, 16, generator=g)  # clusters of very unequal sizes
    sizes = [400, 200, 100, 50, 20, 10, 5, 5, 3, 3, 2, 2]
    points = torch.cat([c + torch.randn(n, 16, generator=g) for c, n in zip(centres, sizes,
                                                                           strict=True)])
    chosen = greedy_coreset(points, 30, proj_dim=8, seed=0)
    assert len(chosen) == 30 and len(set(chosen.tolist())) == 30
    radius = covering_radius(points, chosen)
    rng = np.random.default_rng(0)
    randoms = [covering_radius(points, torch.from_numpy(rng.choice(len(points), 30, False)))
               for _ in range(20)]
    assert radius <= min(randoms)
    assert torch.equal(chosen, greedy_coreset(points, 30, proj_dim=8, seed=0))  # seeded
    assert torch.equal(greedy_coreset(points, 2000), torch.arange(len(points)))


def test_coreset_is_the_greedy_farthest_point_sequence() -> None:
    """Without projection, each point chosen is the one farthest from those before it."""
    points = torch.randn(300, 6, generator=torch.Generator().manual_seed(1)).double()
    chosen = greedy_coreset(points, 25, proj_dim=6).tolist()
    dist = torch.cdist(points, points)
    for i in range(1, 25):
        to_chosen = dist[:, chosen[:i]].min(dim=1).values
        assert chosen[i] == int(to_chosen.argmax())


def test_coreset_never_repeats_duplicates() -> None:
    points = torch.zeros(10, 4)
    points[5:] = 1.0  # two distinct points, five copies each
    chosen = greedy_coreset(points, 6, proj_dim=4)
    assert len(set(chosen.tolist())) == 6


@pytest.mark.parametrize("max_entries", [2**24, 50])
def test_nearest_matches_brute_force(max_entries: int) -> None:
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 5, generator=g), torch.randn(23, 5, generator=g)
    dist, idx = nearest(queries, bank, k=3, max_entries=max_entries)
    full = torch.cdist(queries.double(), bank.double())
    ref = full.sort(dim=1)
    torch.testing.assert_close(dist.double(), ref.values[:, :3], rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, ref.indices[:, :3])


@pytest.mark.parametrize("sigma", [(1.0, 1.0), (2.5, 0.7), (4.0, 4.0)])
def test_blur_matches_scipy(sigma: tuple[float, float]) -> None:
    maps = torch.rand(3, 20, 13, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(maps, sigma).numpy()
    for m, o in zip(maps.numpy(), ours, strict=True):  # scipy's "nearest" repeats the edge
        np.testing.assert_allclose(o, gaussian_filter(m, sigma, mode="nearest"), atol=1e-5)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("key", PEERS)
def test_cuda_peers_agree_with_cpu(toy: Toy, fitted: dict[str, Peer], key: str) -> None:
    """The device path (backbone, Gaussians, coreset and neighbours on the GPU). PatchCore's
    coreset may pick other points after float differences, so only its AUROC is compared."""
    peer = PEERS[key](input_size=64, device="cuda")
    peer.fit(toy.normals)
    scores = peer.score(toy.test)
    assert auroc(toy.labels, scores) > 0.95
    if key != "patchcore":
        np.testing.assert_allclose(scores, fitted[key].score(toy.test), rtol=2e-2)
    if isinstance(peer, MapPeer):
        assert peer.maps(toy.test).shape == (16, SIZE, SIZE)

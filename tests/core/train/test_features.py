"""core/train/features.py: stage 1 on a frozen encoder (cached features, initial memories)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from core.config import ModelConfig, TrainConfig
from core.model.anomem import AnoMem
from core.presets import PRETRAINED_SCALES
from core.train import features, stage1


@pytest.fixture
def pretrained_cfg(make_model_config: Callable[..., ModelConfig]) -> ModelConfig:
    """The pretrained encoder at the smallest input it accepts, with tiny memories."""
    return make_model_config(backbone="efficientnet-lite0", scales=PRETRAINED_SCALES,
                             image_size=16, input_size=32, memory_size=6, memory_dim=8)


def make_cache(cfg: ModelConfig, n: int, n_anomalies: int = 0, tc: TrainConfig | None = None
               ) -> tuple[AnoMem, features.FeatureCache, torch.Generator, torch.Tensor]:
    """A model, the cache of n random normal and n_anomalies random labelled images (no
    shifted copies unless `tc` asks for them), the generator and the normals."""
    model = AnoMem(cfg)
    g = torch.Generator().manual_seed(0)
    normals = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    anomalies = torch.randint(0, 256, (n_anomalies, 3, 16, 16), dtype=torch.uint8, generator=g)
    cache = features.FeatureCache(model, normals, anomalies,
                                  tc or TrainConfig(shift_negatives=()), torch.device("cpu"), g)
    return model, cache, g, normals


def test_kmeans_pp_spreads_its_picks_over_the_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    x = torch.cat([c + 0.01 * torch.randn(50, 4, generator=g) for c in centres])
    picked = features.kmeans_pp(x, 4, g)
    owner = torch.cdist(picked, centres).argmin(1)
    assert sorted(owner.tolist()) == [0, 1, 2, 3]  # one pick per cluster, none twice
    assert features.kmeans_pp(x[:3], 5, g).shape == (5, 4)  # fewer rows than picks: repeated


def test_the_cache_holds_every_view_of_normals_anomalies_and_shifted_copies(
        pretrained_cfg: ModelConfig) -> None:
    model, cache, _, normals = make_cache(
        pretrained_cfg, 5, 2, TrainConfig(views=3, shift_negatives=("rotate",)))
    assert (cache.n_normal, cache.n_anomaly, cache.n_shifted, cache.views) == (5, 2, 5, 3)
    for s in model.scales:
        assert cache.features[s].shape == (3, 12, model.backbone.widths[s], *model.map_size(s))
        assert cache.features[s].dtype == torch.float16
    # view 0 is the image itself: the encoder's features of the un-augmented normals
    with torch.no_grad():
        direct = model.backbone(normals.float() / 255)
    for s in model.scales:
        torch.testing.assert_close(cache.take(0, torch.arange(5))[s], direct[s],
                                   atol=2e-2, rtol=1e-2)
        assert not torch.allclose(cache.features[s][1].float(), cache.features[s][0].float())


def test_a_cached_batch_flags_its_parts_and_pairs_two_different_views(
        pretrained_cfg: ModelConfig) -> None:
    model, cache, g, _ = make_cache(pretrained_cfg, 6, 2, TrainConfig())
    chosen = torch.tensor([4, 1, 3, 0])
    views, is_anom, is_shift = stage1.cached_batch(cache, chosen, 1, g, shift_fraction=0.5)
    assert is_anom.tolist() == [False] * 4 + [True] + [False] * 2
    assert is_shift.tolist() == [False] * 5 + [True] * 2
    s = model.scales[0]
    a, b = views[s][:7], views[s][7:]
    assert not torch.equal(a, b)  # two different cached views of the same instances
    both = {v: cache.take(v, torch.tensor([4]))[s] for v in range(cache.views)}
    assert any(torch.equal(a[:1], x) for x in both.values())


def test_take_draws_positions_of_each_image_from_its_own_map(
        pretrained_cfg: ModelConfig) -> None:
    model, cache, g, _ = make_cache(pretrained_cfg, 4)
    s = "stage3_s8"  # a 4 x 4 map at 32 px
    full = cache.take(1, torch.arange(4))[s]
    sampled = cache.take(1, torch.arange(4), positions=5, g=g)[s]
    assert sampled.shape == (4, full.shape[1], 1, 5)
    for image in range(4):
        columns = full[image].flatten(1).T  # (16, C): the image's positions
        for p in range(5):
            assert (columns == sampled[image, :, 0, p]).all(1).any()
    assert cache.take(1, torch.arange(4), positions=16, g=g)[s].shape == full.shape


def test_init_memories_projects_by_pca_and_seeds_prototypes_on_normal_queries(
        pretrained_cfg: ModelConfig) -> None:
    model, cache, g, _ = make_cache(pretrained_cfg, 8)
    features.init_memories(model, cache, g)
    for s, memory in model.memories.items():
        maps = cache.take(0, torch.arange(8))[s]
        with torch.no_grad():
            q = memory(maps).query.permute(0, 2, 3, 1).reshape(-1, memory.prototypes.shape[1])
            # every prototype is one of the normal queries (k-means++ picks rows)
            nearest = (F.normalize(memory.prototypes, dim=1) @ q.T).max(1).values
        assert torch.allclose(nearest, torch.ones_like(nearest), atol=1e-4)
        # the projection's first rows are orthonormal principal directions
        w = memory.proj.weight[:, :, 0, 0]
        k = min(w.shape)
        torch.testing.assert_close(w[:k] @ w[:k].T, torch.eye(k), atol=1e-4, rtol=0)


def test_stage1_on_a_frozen_encoder_trains_the_memories_only(
        pretrained_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = AnoMem(pretrained_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    normals = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    tc = TrainConfig(epochs=2, batch_size=4)
    history, _ = stage1.train_stage1(model, normals, normals[:0], tc, torch.device("cpu"))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    after = model.state_dict()
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        if k.startswith("backbone."):
            assert not moved, f"{k}: the frozen encoder changed"
        elif k.startswith("memories.") and k.endswith(("prototypes", "proj.weight")):
            assert moved, f"{k}: did not learn"
    assert not model.backbone.training  # a frozen encoder keeps ImageNet's batch statistics

"""core/model/anomem.py: the assembled model, called without the trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.config import ModelConfig
from core.model.anomem import AnoMem, upgrade_state
from core.model.detector import Scores
from core.model.memory import MemoryRead

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("scales", "sizes"), [
    (("layer2", "layer3", "layer4"), {"layer2": 16, "layer3": 8, "layer4": 4}),
    (("layer1", "layer3"), {"layer1": 32, "layer3": 8}),
])
def test_forward_returns_one_read_per_scale(
        make_model_config: Callable[..., ModelConfig], scales: tuple[str, ...],
        sizes: dict[str, int]) -> None:
    torch.manual_seed(0)
    cfg = make_model_config(scales=scales, memory_size=6, memory_dim=5)
    model = AnoMem(cfg)
    reads = model(torch.rand(3, 3, 32, 32))
    assert tuple(reads) == scales
    for s, read in reads.items():
        h = sizes[s]
        assert isinstance(read, MemoryRead)
        assert read.query.shape == (3, 5, h, h)
        assert read.readout.shape == (3, 5, h, h)
        assert read.attention.shape == (3, 6, h, h)
        assert model.stride(s) * h == 32
        torch.testing.assert_close(read.query.norm(dim=1), torch.ones(3, h, h))
    assert set(model.memories) == set(model.heads) == set(scales)


def test_score_has_pixel_map_at_input_resolution(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = AnoMem(tiny_cfg).eval()
    with torch.no_grad():
        scores = model.score(torch.rand(2, 3, 32, 32))
    assert isinstance(scores, Scores)
    assert scores.image.shape == (2,)
    assert scores.pixel_map.shape == (2, 32, 32)
    assert set(scores.per_scale) == set(tiny_cfg.scales)
    assert {s: tuple(m.shape) for s, m in scores.maps.items()} == {
        "layer2": (2, 16, 16), "layer3": (2, 8, 8), "layer4": (2, 4, 4)}
    assert torch.isfinite(scores.image).all() and torch.isfinite(scores.pixel_map).all()


def test_score_is_the_detector_on_the_reads_of_forward(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(1)
    model = AnoMem(tiny_cfg).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model.terms["pixels"].store(torch.rand(10, 3, 32, 32))
        for j, term in enumerate(model.terms.values()):  # held-out normals' location, spread
            term.loc.fill_(0.1 * (j + 1))
            term.scale.fill_(0.5 + j)
        reads = model(images)
        raw = [model.terms["pixels"].distance(images),
               model.terms["pixel_layout"].distance(images)]
        standardised = torch.stack([(raw[0] - 0.1) / 0.5, (raw[1] - 0.2) / 1.5], dim=1)
        expected = model.detector(reads, (32, 32), standardised)
        scores = model.score(images)
    torch.testing.assert_close(scores.image, expected.image)
    torch.testing.assert_close(scores.pixel_map, expected.pixel_map)
    for key, term in expected.terms.items():
        torch.testing.assert_close(scores.terms[key], term)


@pytest.mark.parametrize(("image_size", "scales"), [
    (32, ("layer1", "layer2", "layer3", "layer4")),
    (36, ("layer2", "layer4")),  # not a multiple of the stride: maps round up
    (70, ("layer1", "layer4")),  # the large-image stem (stride-2 conv and max-pool)
])
def test_map_size_is_the_side_of_each_scales_maps(
        make_model_config: Callable[..., ModelConfig], image_size: int,
        scales: tuple[str, ...]) -> None:
    model = AnoMem(make_model_config(image_size=image_size, scales=scales)).eval()
    with torch.no_grad():
        reads = model(torch.rand(1, 3, image_size, image_size))
    for s, read in reads.items():
        assert read.query.shape[-2:] == model.map_size(s), s


@pytest.mark.parametrize(("layout_grid", "expected"), [
    (8, {"layer2": 8, "layer3": 8, "layer4": 4}),  # layer4's 4 x 4 maps cap its grid
    (2, {"layer2": 2, "layer3": 2, "layer4": 2}),
    (16, {"layer2": 16, "layer3": 8, "layer4": 4}),
])
def test_layout_grid_is_capped_by_the_map_size(
        make_model_config: Callable[..., ModelConfig], layout_grid: int,
        expected: dict[str, int]) -> None:
    cfg = make_model_config(layout_grid=layout_grid, layout_rank=7)
    model = AnoMem(cfg)
    for s, grid in expected.items():
        sd = model.detector.per_scale[s]
        assert sd.grid == grid == min(layout_grid, *model.map_size(s))
        assert sd.layout.basis.shape == (cfg.memory_dim * grid * grid, 7)
    with torch.no_grad():
        reads = model.eval()(torch.rand(2, 3, 32, 32))
    for s, read in reads.items():
        layout = model.detector.per_scale[s].pooled(read.query)
        assert layout.shape == (2, cfg.memory_dim * expected[s] ** 2)


def test_detector_options_come_from_the_model_config(
        make_model_config: Callable[..., ModelConfig]) -> None:
    assert (ModelConfig().layout_grid, ModelConfig().layout_rank) == (8, 256)
    model = AnoMem(make_model_config(local_weight=0.25, layout_source="deviation"))
    assert model.detector.layout_source == "deviation"
    n = len(model.scales)  # and the pixel scale's two terms, each weighing as much as a scale
    torch.testing.assert_close(model.detector.weights,
                               torch.cat([torch.tensor([0.25, 0.75]).repeat(n), torch.ones(2)])
                               / (n + 2))
    model = AnoMem(make_model_config(local_weight=0.25, pixel_memory=0, pixel_layout=False))
    assert len(model.terms) == 0 and model.detector.image_terms == []
    torch.testing.assert_close(model.detector.weights,
                               torch.tensor([0.25, 0.75]).repeat(n) / n)


def test_embed_is_unit_norm_and_detached(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(2)
    model = AnoMem(tiny_cfg).eval()
    images = torch.rand(4, 3, 32, 32)
    emb = model.embed(images)
    assert set(emb) == set(tiny_cfg.scales)
    for s, e in emb.items():
        assert e.shape == (4, tiny_cfg.memory_dim)
        assert not e.requires_grad
        torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
        pooled = model(images)[s].query.mean(dim=(2, 3))
        torch.testing.assert_close(e, torch.nn.functional.normalize(pooled, dim=1).detach())


def test_projection_heads_map_memory_dim_to_head_dim(
        make_model_config: Callable[..., ModelConfig]) -> None:
    model = AnoMem(make_model_config(memory_dim=6, head_dim=5))
    out = model.heads["layer3"](torch.randn(7, 6))
    assert out.shape == (7, 5)


def test_model_builds_and_scores_without_the_trainer() -> None:
    code = (
        "import sys, torch\n"
        "from core.config import ModelConfig\n"
        "from core.model.anomem import AnoMem\n"
        "m = AnoMem(ModelConfig(width=0.125, memory_size=4, memory_dim=4, head_dim=4)).eval()\n"
        "m.score(torch.rand(1, 3, 32, 32))\n"
        "m.embed(torch.rand(1, 3, 32, 32))\n"
        "loaded = sorted(k for k in sys.modules if k == 'core.train' "
        "or k.startswith('core.train.'))\n"
        "print('TRAIN_MODULES', loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "TRAIN_MODULES []" in done.stdout


def test_model_sources_do_not_import_the_trainer() -> None:
    for file in (REPO / "core" / "model").glob("*.py"):
        text = file.read_text()
        assert "core.train" not in text and "from core import train" not in text, file.name


def test_the_rotation_term_is_the_heads_loss_over_four_quarter_turns(
        make_model_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(2)
    model = AnoMem(make_model_config(rotation=True, pixel_memory=0, pixel_layout=False)).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        reads, extra = model.read(images, standardised=False)
        expected = torch.zeros(3)
        for k in range(4):
            logits = model.rotation.logits(model.backbone(torch.rot90(images, k, dims=(2, 3))))
            expected -= torch.log_softmax(logits, dim=1)[:, k] / 4
        for s, r in model(images).items():  # the reads are those of forward
            torch.testing.assert_close(reads[s].deviation, r.deviation)
        raw = model.rotation.raw(images, None, model.backbone)
        model.rotation.loc.fill_(0.5)
        model.rotation.scale.fill_(2.0)
        _, standardised = model.read(images)
    assert model.detector.term_names[-1] == "rotation/loss" == model.rotation.name
    head = model.rotation.head
    assert isinstance(head, torch.nn.Linear) and head.out_features == 4
    torch.testing.assert_close(extra, expected[:, None])
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(standardised, (expected[:, None] - 0.5) / 2.0)


def test_image_level_terms_weigh_like_a_scale(
        make_model_config: Callable[..., ModelConfig]) -> None:
    model = AnoMem(make_model_config(rotation=True, pixel_memory=64))
    det = model.detector
    assert det.image_terms == ["pixels/knn", "pixels/layout", "rotation/loss"]
    w = det.fixed_weights()
    assert w.sum().item() == pytest.approx(1.0)
    assert w[-1] == w[-2] == w[-3] == w[1]  # each as much as a scale's layout term
    reads, extra = model.eval().read(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="rotation/loss"):
        det.features(reads, extra[:, :1])  # one column short


@pytest.mark.parametrize("terms", [
    dict(pixel_memory=64, pixel_layout=True, rotation=True),
    dict(pixel_memory=0, pixel_layout=True, rotation=True),
    dict(pixel_memory=64, pixel_layout=False, rotation=False),
    dict(pixel_memory=0, pixel_layout=False, rotation=True),
    dict(pixel_memory=0, pixel_layout=False, rotation=False),
], ids=["all", "layout-rotation", "knn", "rotation", "none"])
def test_the_terms_are_the_detectors_last_columns_in_order(
        make_model_config: Callable[..., ModelConfig], terms: dict) -> None:
    torch.manual_seed(3)
    model = AnoMem(make_model_config(**terms)).eval()
    keys = [k for k, on in (("pixels", terms["pixel_memory"]),
                            ("pixel_layout", terms["pixel_layout"]),
                            ("rotation", terms["rotation"])) if on]
    names = {"pixels": "pixels/knn", "pixel_layout": "pixels/layout",
             "rotation": "rotation/loss"}
    assert list(model.terms) == keys
    assert model.terms.names == [names[k] for k in keys] == model.detector.image_terms
    n = len(keys)
    columns = model.detector.term_names
    assert columns[len(columns) - n:] == model.terms.names
    assert columns[:len(columns) - n] == [f"{s}/{t}" for s in model.scales
                                          for t in ("local", "layout")]
    assert (model.rotation is not None) == terms["rotation"]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        if "pixels" in model.terms:
            model.terms["pixels"].store(torch.rand(6, 3, 32, 32))
        reads, extra = model.read(images, standardised=False)
        scores = model.score(images)
        if not n:
            assert extra is None
            return
        assert extra.shape == (2, n)
        for j, term in enumerate(model.terms.values()):  # each column is its term's value
            torch.testing.assert_close(extra[:, j], term.raw(images, model.backbone(images),
                                                             model.backbone))
            torch.testing.assert_close(scores.terms[term.name], extra[:, j])  # loc 0, scale 1


def test_stage1_state_holds_what_stage1_learns_and_nothing_stage2_fits(
        make_model_config: Callable[..., ModelConfig]) -> None:
    model = AnoMem(make_model_config(rotation=True, pixel_memory=64, lessons=4))
    state = model.state_dict()
    learnt = model.stage1_state()
    fitted = {f"terms.{k}" for k in (
        "pixels.loc", "pixels.scale", "pixels.bank", "pixels.count",
        "pixel_layout.loc", "pixel_layout.scale", "pixel_layout.gaussian.mean",
        "pixel_layout.gaussian.precision", "rotation.loc", "rotation.scale")}
    assert fitted <= set(state)
    left_out = {k for k in state if k.startswith(("detector.", "lessons."))} | fitted
    assert any(k.startswith("lessons.") for k in left_out)
    assert set(learnt) == set(state) - left_out
    assert {"terms.rotation.head.weight", "terms.rotation.head.bias"} <= set(learnt)
    assert {name for name, _ in model.named_parameters()} <= set(learnt)  # all that is learnt
    assert any(k.startswith("backbone.") and "running_mean" in k for k in learnt)  # BN stats
    assert all(learnt[k] is state[k] or torch.equal(learnt[k], state[k]) for k in learnt)
    without = AnoMem(make_model_config(rotation=False, pixel_memory=64, lessons=4))
    assert not any(k.startswith("terms.") for k in without.stage1_state())
    # what another model of the same config takes from it: all but what stage 2 fits
    other = AnoMem(make_model_config(rotation=True, pixel_memory=64, lessons=4))
    missing, unexpected = other.load_state_dict(learnt, strict=False)
    assert set(missing) == left_out and not unexpected


# Where the tensors of weights saved before core/model/gaussians.py and core/model/terms.py
# lived: today's name -> the earlier one (per_scale.S.local.mean was per_scale.S.mean, ...)
EARLIER = {"local.mean": "mean", "local.precision": "precision", "layout.mean": "layout_mean",
           "layout.basis": "layout_basis", "layout.variances": "layout_var",
           "layout.noise": "layout_noise"}
EARLIER_TERMS = {"terms.pixels.bank": "pixels.bank", "terms.pixels.count": "pixels.count",
                 "terms.pixel_layout.gaussian.mean": "pixel_layout.mean",
                 "terms.pixel_layout.gaussian.precision": "pixel_layout.precision",
                 "terms.rotation.head.weight": "rotation.weight",
                 "terms.rotation.head.bias": "rotation.bias",
                 "terms.pixels.loc": "detector.pixel_loc",
                 "terms.pixels.scale": "detector.pixel_scale",
                 "terms.pixel_layout.loc": "detector.pixel_layout_loc",
                 "terms.pixel_layout.scale": "detector.pixel_layout_scale",
                 "terms.rotation.loc": "detector.rotation_loc",
                 "terms.rotation.scale": "detector.rotation_scale"}


def earlier_name(key: str) -> str:
    if key in EARLIER_TERMS:
        return EARLIER_TERMS[key]
    parts = key.split(".")
    if parts[:2] == ["detector", "per_scale"] and ".".join(parts[3:]) in EARLIER:
        return ".".join([*parts[:3], EARLIER[".".join(parts[3:])]])
    return key


def perturbed(model: AnoMem) -> AnoMem:
    """The model with every buffer moved off its initial value (a fitted detector's stand-in)."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand(buf.shape, generator=g).to(buf.dtype) * 0.5)
            elif name.endswith("count"):
                buf.fill_(5)
            elif name.endswith("sight"):
                buf.fill_(True)
    return model.eval()


@pytest.mark.parametrize("local_map", ["shared", "positional"])
def test_weights_saved_under_the_earlier_names_load_and_score_the_same(
        make_model_config: Callable[..., ModelConfig], local_map: str) -> None:
    cfg = make_model_config(rotation=True, pixel_memory=64, local_map=local_map, lessons=4)
    torch.manual_seed(0)
    model = perturbed(AnoMem(cfg))
    state = model.state_dict()
    earlier = {earlier_name(k): v for k, v in state.items()}
    assert len(earlier) == len(state)
    renamed = set(earlier) - set(state)
    assert {"detector.per_scale.layer2.mean", "detector.per_scale.layer4.layout_var",
            "pixels.bank", "pixel_layout.precision", "rotation.weight", "detector.pixel_loc",
            "detector.rotation_scale"} <= renamed
    assert len(renamed) == 6 * len(model.scales) + len(EARLIER_TERMS)
    upgraded = upgrade_state(earlier)
    assert list(upgraded) == list(state)
    assert all(upgraded[k] is state[k] for k in state)  # renamed, the values untouched
    torch.manual_seed(1)
    loaded = AnoMem(cfg).eval()
    loaded.load_state_dict(upgraded)  # strict: every tensor found, none left over
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model.score(images), loaded.score(images)
        fresh = perturbed(AnoMem(cfg)).score(images)
    assert not torch.equal(a.image, fresh.image)  # the weights matter to the scores
    assert torch.equal(a.image, b.image) and torch.equal(a.pixel_map, b.pixel_map)
    for name, term in a.terms.items():
        assert torch.equal(term, b.terms[name]), name


def test_a_current_state_dict_passes_upgrade_state_unchanged(
        make_model_config: Callable[..., ModelConfig]) -> None:
    for cfg in (make_model_config(rotation=True, lessons=4),
                make_model_config(local_map="positional", pixel_memory=0, pixel_layout=False)):
        state = AnoMem(cfg).state_dict()
        upgraded = upgrade_state(state)
        assert list(upgraded) == list(state)
        assert all(upgraded[k] is v for k, v in state.items())

"""core/model/terms.py: image-level terms, their container and the rotation term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.model.terms import ImageTerm, ImageTerms, RotationTerm


class Brightness(ImageTerm):
    """A stand-in term: the mean brightness, plus an offset that `fit` learns."""

    name = "test/brightness"

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("offset", torch.zeros(()))

    def raw(self, images, features, encoder):
        return self.factor * images.mean(dim=(1, 2, 3)) + self.offset

    def fit(self, images, generator):
        self.offset.fill_(float(torch.rand((), generator=generator)))


class Contrast(ImageTerm):
    name = "test/contrast"

    def raw(self, images, features, encoder):
        return images.std(dim=(1, 2, 3))


def test_terms_keep_their_order_and_stack_one_column_each() -> None:
    terms = ImageTerms({"contrast": Contrast(), "brightness": Brightness(2.0)})
    assert list(terms) == ["contrast", "brightness"]
    assert terms.names == ["test/contrast", "test/brightness"]
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    raw = terms.raw(images, {}, lambda x: {})
    assert raw.shape == (5, 2)
    torch.testing.assert_close(raw[:, 0], images.std(dim=(1, 2, 3)))
    torch.testing.assert_close(raw[:, 1], 2 * images.mean(dim=(1, 2, 3)))


def test_no_terms_give_none() -> None:
    terms = ImageTerms()
    assert terms.names == [] and not list(terms.named_buffers())
    assert terms.raw(torch.rand(2, 3, 4, 4), {}, lambda x: {}) is None
    assert terms.standardise(None) is None


def test_calibrate_standardises_held_out_values_to_mean_0_std_1() -> None:
    g = torch.Generator().manual_seed(1)
    terms = ImageTerms({"contrast": Contrast(), "brightness": Brightness()})
    held_out = torch.rand(40, 3, 8, 8, generator=g) * torch.linspace(0.2, 1, 40)[:, None, None,
                                                                                   None]
    raw = terms.raw(held_out, {}, lambda x: {})
    terms.calibrate(raw)
    for j, term in enumerate(terms.values()):
        torch.testing.assert_close(term.loc, raw[:, j].mean())
        torch.testing.assert_close(term.scale, raw[:, j].std())
    z = terms.standardise(raw)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, 1], terms["brightness"].standardise(raw[:, 1]))
    # a term that never varies: a tiny spread, so standardised values stay finite
    constant = Brightness()
    constant.calibrate(torch.full((8,), 0.25))
    assert float(constant.loc) == 0.25
    assert float(constant.scale) == pytest.approx(1e-6, rel=1e-6)
    assert bool(torch.isfinite(constant.standardise(torch.tensor([0.3]))).all())


def test_fit_fits_every_term_in_turn_and_a_term_with_nothing_to_fit_is_left_alone() -> None:
    terms = ImageTerms({"contrast": Contrast(), "brightness": Brightness()})
    before = {k: v.clone() for k, v in terms.state_dict().items()}
    terms.fit(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.Generator().manual_seed(7))
    expected = float(torch.rand((), generator=torch.Generator().manual_seed(7)))
    assert float(terms["brightness"].offset) == pytest.approx(expected)
    after = terms.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["brightness.offset"]
    assert set(after) == {"contrast.loc", "contrast.scale", "brightness.loc",
                          "brightness.scale", "brightness.offset"}
    with pytest.raises(TypeError, match="abstract"):
        ImageTerm()  # a term without `raw` is not a term


def test_rotation_term_is_the_heads_mean_cross_entropy_over_four_quarter_turns() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def encoder(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"deep": conv(x)}

    term = RotationTerm(6, "deep")
    assert term.name == "rotation/loss" and isinstance(term.head, torch.nn.Linear)
    assert (term.head.in_features, term.head.out_features) == (6, 4)
    images = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        logits = term.logits(encoder(images))
        torch.testing.assert_close(logits, term.head(encoder(images)["deep"].mean(dim=(2, 3))))
        expected = -sum(F.log_softmax(term.logits(encoder(torch.rot90(images, k, dims=(2, 3)))),
                                      dim=1)[:, k] for k in range(4)) / 4
        torch.testing.assert_close(term.raw(images, None, encoder), expected)
        # the upright features, when given, save one pass and change nothing
        torch.testing.assert_close(term.raw(images, encoder(images), encoder), expected)
    assert {k for k, _ in term.named_parameters()} == {"head.weight", "head.bias"}
    assert set(dict(term.named_buffers())) == {"loc", "scale"}

"""core/model/memory.py: the Hopfield read-out and the per-scale memory module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.model.memory import HopfieldMemory, MemoryRead, hopfield_read


def reference_read(query: torch.Tensor, prototypes: torch.Tensor, beta: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over queries: softmax of beta * cosine similarity, then the weighted prototype sum."""
    flat = query.reshape(-1, query.shape[-1]).double()
    protos = prototypes.double()
    readouts, attentions = [], []
    for q in flat:
        sims = torch.stack([
            torch.dot(q, p) / (q.norm() * p.norm()) for p in protos
        ])
        weights = torch.exp(beta * sims - (beta * sims).max())
        weights = weights / weights.sum()
        readout = sum(w * p / p.norm() for w, p in zip(weights, protos, strict=True))
        readouts.append(readout)
        attentions.append(weights)
    shape = query.shape[:-1]
    return (torch.stack(readouts).reshape(*shape, -1).float(),
            torch.stack(attentions).reshape(*shape, -1).float())


@pytest.mark.parametrize("beta", [0.5, 4.0, 32.0])
def test_hopfield_read_matches_reference(beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 5, generator=g) * 3  # not unit norm: the read normalises
    prototypes = torch.randn(7, 5, generator=g) * 2
    readout, attention = hopfield_read(query, prototypes, beta)
    ref_readout, ref_attention = reference_read(query, prototypes, beta)
    assert readout.shape == (2, 3, 5) and attention.shape == (2, 3, 7)
    torch.testing.assert_close(attention, ref_attention, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(readout, ref_readout, atol=1e-5, rtol=1e-4)


def test_hopfield_read_accepts_tensor_beta() -> None:
    g = torch.Generator().manual_seed(1)
    query, prototypes = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    a, _ = hopfield_read(query, prototypes, 3.0)
    b, _ = hopfield_read(query, prototypes, torch.tensor(3.0))
    torch.testing.assert_close(a, b)


def test_stored_prototype_is_read_back_at_high_beta() -> None:
    g = torch.Generator().manual_seed(2)
    prototypes = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    query = prototypes[3] * 5.0  # same direction as prototype 3
    readout, attention = hopfield_read(query, prototypes, 1000.0)
    assert attention.argmax().item() == 3
    assert attention[3].item() > 0.999
    torch.testing.assert_close(readout, prototypes[3], atol=1e-4, rtol=0)
    assert (F.normalize(query, dim=-1) - readout).norm().item() < 1e-3


def test_low_beta_reads_the_mean_prototype() -> None:
    g = torch.Generator().manual_seed(3)
    prototypes = torch.randn(5, 4, generator=g)
    query = torch.randn(3, 4, generator=g)
    readout, attention = hopfield_read(query, prototypes, 1e-6)
    torch.testing.assert_close(attention, torch.full((3, 5), 0.2), atol=1e-5, rtol=0)
    mean = F.normalize(prototypes, dim=-1).mean(0)
    torch.testing.assert_close(readout, mean.expand(3, 4), atol=1e-5, rtol=0)


def test_dimension_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="dim"):
        hopfield_read(torch.randn(2, 5), torch.randn(3, 4), 1.0)


def test_memory_outputs_have_documented_shapes() -> None:
    torch.manual_seed(0)
    memory = HopfieldMemory(in_channels=6, size=10, dim=4, beta=8.0)
    read = memory(torch.randn(3, 6, 5, 7))
    assert isinstance(read, MemoryRead)
    assert read.query.shape == (3, 4, 5, 7)
    assert read.readout.shape == (3, 4, 5, 7)
    assert read.attention.shape == (3, 10, 5, 7)
    torch.testing.assert_close(read.query.norm(dim=1), torch.ones(3, 5, 7))
    torch.testing.assert_close(read.attention.sum(dim=1), torch.ones(3, 5, 7))
    assert (read.attention >= 0).all()
    torch.testing.assert_close(read.deviation, read.query - read.readout)
    assert memory.size == 10
    torch.testing.assert_close(memory.beta, torch.tensor(8.0))


def test_memory_read_equals_the_functional_read_per_position() -> None:
    torch.manual_seed(1)
    memory = HopfieldMemory(in_channels=3, size=5, dim=4, beta=6.0)
    features = torch.randn(2, 3, 4, 4)
    read = memory(features)
    query = F.normalize(memory.proj(features), dim=1).permute(0, 2, 3, 1)
    readout, attention = reference_read(query.detach(), memory.prototypes.detach(), 6.0)
    torch.testing.assert_close(read.readout.permute(0, 2, 3, 1).detach(), readout,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(read.attention.permute(0, 2, 3, 1).detach(), attention,
                               atol=1e-5, rtol=1e-4)


def test_memory_reads_back_a_crafted_prototype() -> None:
    """Identity projection: a feature map equal to prototype k everywhere reads back k."""
    torch.manual_seed(2)
    memory = HopfieldMemory(in_channels=8, size=6, dim=8, beta=1000.0)
    with torch.no_grad():
        memory.proj.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        memory.proj.bias.zero_()
    k = 4
    features = (2.0 * memory.normalized_prototypes()[k]).view(1, 8, 1, 1).expand(2, 8, 3, 3)
    read = memory(features)
    assert (read.attention.argmax(dim=1) == k).all()
    assert read.deviation.abs().max().item() < 1e-3


def test_gradients_reach_prototypes_projection_and_beta() -> None:
    torch.manual_seed(3)
    memory = HopfieldMemory(in_channels=4, size=6, dim=5, beta=2.0, learn_beta=True)
    read = memory(torch.randn(2, 4, 3, 3))
    read.deviation.pow(2).sum().backward()
    for name in ("prototypes", "proj.weight", "proj.bias", "log_beta"):
        grad = dict(memory.named_parameters())[name].grad
        assert grad is not None, name
        assert grad.abs().sum().item() > 0, name


def test_fixed_beta_is_a_buffer_not_a_parameter() -> None:
    memory = HopfieldMemory(in_channels=4, size=6, dim=5, beta=2.0, learn_beta=False)
    assert "log_beta" not in dict(memory.named_parameters())
    assert "log_beta" in memory.state_dict()
    assert math.isclose(float(memory.beta), 2.0, rel_tol=1e-6)


def test_associations_are_the_forward_attention_without_grad() -> None:
    torch.manual_seed(4)
    memory = HopfieldMemory(in_channels=4, size=6, dim=5, beta=3.0)
    features = torch.randn(2, 4, 3, 3)
    attention = memory.associations(features)
    assert not attention.requires_grad
    torch.testing.assert_close(attention, memory(features).attention.detach())

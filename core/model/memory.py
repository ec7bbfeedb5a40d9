"""Multi-scale memory: learnable prototypes read like a modern Hopfield layer.

A query q (unit vector) retrieves  r = softmax(beta * q P^T) P  from the unit-norm prototypes P
(Ramsauer et al. 2020, "Hopfield Networks is All You Need", with cosine similarities). At high
beta this is a nearest-prototype lookup; at low beta a blend. `hopfield_read` is the pure
function; `HopfieldMemory` wraps it with the 1x1 projection that turns a feature map into one
query per spatial position.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class MemoryRead(NamedTuple):
    query: torch.Tensor  # (B, D, H, W), unit norm along D
    readout: torch.Tensor  # (B, D, H, W), the memory's answer to each query
    attention: torch.Tensor  # (B, N, H, W), softmax weights over the N prototypes

    @property
    def deviation(self) -> torch.Tensor:
        """(B, D, H, W): what the observation holds that the memory of normality does not."""
        return self.query - self.readout


def hopfield_read(
    query: torch.Tensor, prototypes: torch.Tensor, beta: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieve from memory. query (..., D), prototypes (N, D) -> readout (..., D), attn (..., N).

    Both sides are L2-normalised here, so beta alone sets how sharp the lookup is.
    """
    if query.shape[-1] != prototypes.shape[-1]:
        raise ValueError(
            f"query dim {query.shape[-1]} does not match prototype dim {prototypes.shape[-1]}"
        )
    q = F.normalize(query, dim=-1)
    p = F.normalize(prototypes, dim=-1)
    attention = torch.softmax(beta * (q @ p.T), dim=-1)
    return attention @ p, attention


class HopfieldMemory(nn.Module):
    """One scale's memory: 1x1 projection to queries, N prototypes, Hopfield read-out."""

    def __init__(self, in_channels: int, size: int, dim: int, beta: float,
                 learn_beta: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(size, dim), dim=-1))
        log_beta = torch.tensor(math.log(beta))
        if learn_beta:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    @property
    def size(self) -> int:
        return self.prototypes.shape[0]

    def normalized_prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototypes, dim=-1)

    def forward(self, features: torch.Tensor) -> MemoryRead:
        q = F.normalize(self.proj(features), dim=1)  # (B, C, H, W) -> (B, D, H, W)
        flat = q.permute(0, 2, 3, 1)  # (B, H, W, D)
        readout, attention = hopfield_read(flat, self.prototypes, self.beta)
        return MemoryRead(
            query=q,
            readout=readout.permute(0, 3, 1, 2),
            attention=attention.permute(0, 3, 1, 2),
        )

    @torch.no_grad()
    def associations(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, H, W) attention of every position over the prototypes, for inspection."""
        return self.forward(features).attention

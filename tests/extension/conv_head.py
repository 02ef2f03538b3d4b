"""A head that lives outside the package: two 3x3 convolutions over the patch grid.

It declares no traits, so the pipeline must feed it the whole grid. Every input shape it sees is
recorded, so a test can check what it was trained on.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn


class ConvHead(nn.Module):
    """``[B, D, h, w] -> [B, R, h, w]`` with two 3x3 convolutions (neighbouring tokens mix)."""

    seen_shapes: ClassVar[list[tuple[int, ...]]] = []

    def __init__(self, dim: int, reduced_dim: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.reduced_dim = reduced_dim
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, reduced_dim, kernel_size=3, padding=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        ConvHead.seen_shapes.append(tuple(features.shape))
        return self.net(features)  # B R h w

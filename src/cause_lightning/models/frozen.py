"""The backbone contract: the interface every backbone implements (frozen, always in eval mode,
grids of patch features) and the registry entry that describes one.

Kept apart from the registry in ``backbones.py`` so that backbone implementations (the ViTs there,
``filterbank.py``, ``dinov3.py``) and the registry that builds them do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cause_lightning.core.specs import BACKBONE_FACTORY

__all__ = ["BackboneSpec", "FrozenBackbone"]


class FrozenBackbone(nn.Module):
    """Base class of every backbone: frozen, always in eval mode, forward without gradients.

    Subclasses implement ``extract(images, grid) -> [B, D, h, w]`` and call ``freeze()`` at the end
    of their constructor.

    Args:
        name: Registry name.
        embed_dim: Feature width D.
        patch_size: Patch size p; inputs must be multiples of it.
        num_prefix_tokens: Tokens dropped before the grid (class + registers; 0 for non-ViTs).

    Attributes:
        name: Registry name.
        embed_dim: Feature width D.
        patch_size: Patch size p.
        num_prefix_tokens: Class and register tokens of the token sequence.
        build_kwargs: Keyword overrides given to the factory (without ``weights`` and
            ``device``), so that ``factory(name, weights, **build_kwargs)`` rebuilds it.
        build_target: Import path of that factory (``build_backbone`` for the registry).
    """

    def __init__(self, name: str, embed_dim: int, patch_size: int, num_prefix_tokens: int = 0):
        super().__init__()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.build_kwargs: dict[str, Any] = {}
        self.build_target: str = BACKBONE_FACTORY

    def freeze(self) -> FrozenBackbone:
        """Disable gradients on every parameter and switch to eval mode.

        Returns:
            self.
        """
        for param in self.parameters():
            param.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Stay in eval mode whatever ``mode`` is (the backbone is frozen in every stage).

        Args:
            mode: Ignored.

        Returns:
            self.
        """
        return super().train(False)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input size.

        Args:
            height: Input height in pixels.
            width: Input width in pixels.

        Returns:
            ``(h, w)`` = ``(height // p, width // p)``.

        Raises:
            ValueError: When a side is not a positive multiple of the patch size.
        """
        p = self.patch_size
        if height <= 0 or width <= 0 or height % p or width % p:
            fit_h, fit_w = max(p, height // p * p), max(p, width // p * p)
            weights = getattr(self, "weights", None)
            source = f" (weights {weights})" if weights else ""
            raise ValueError(
                f"{self.name}{source}: input size {height}x{width} (HxW) is not a multiple of "
                f"the patch size {p}; resize or crop it, e.g. to {fit_h}x{fit_w}"
            )
        return height // p, width // p

    def extract(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Compute features; called by ``forward`` after validation, under ``torch.no_grad()``.

        Args:
            images: ``[B, 3, H, W]``, ImageNet-normalised.
            grid: ``(h, w)`` patch grid.

        Returns:
            ``[B, D, h, w]``.
        """
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of a batch.

        Args:
            images: ``[B, 3, H, W]`` float, ImageNet-normalised; H and W multiples of
                ``patch_size``.

        Returns:
            ``[B, D, H/p, W/p]`` features.

        Raises:
            ValueError: When ``images`` is not ``[B, 3, H, W]`` or H/W is not a multiple of the
                patch.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{self.name}: expected images of shape [B, 3, H, W], got {list(images.shape)}"
            )
        grid = self.grid_size(images.shape[2], images.shape[3])
        with torch.no_grad():
            return self.extract(images, grid)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}"


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Attributes:
        name: Registry name.
        family: ``dino``, ``dinov2``, ``dinov3``, ``ibot``, ``msn``, ``mae`` or ``builtin``.
        arch: timm ``VisionTransformer`` architecture: ``embed_dim``, ``depth``, ``num_heads``,
            ``patch_size``, ``mlp_ratio``, ``reg_tokens``, ``init_values`` (LayerScale; ``None`` =
            off). LayerNorm eps 1e-6 and qkv bias are common to all.
        img_size: Pretraining resolution; the position table covers ``(img_size / p)**2`` patches.
        reader: Checkpoint format (key of ``CHECKPOINT_FORMATS``).
        pos_embed: Reference interpolation scheme (see ``interpolate_pos_embed``).
        upstream_file: Name of the upstream release file, for messages.
        hub_tag: A timm hub tag with the same weights (``None`` when timm has none).
        timm_name: DINOv3 only: the bias-free timm model (``vit_*_patch16_dinov3``); ``_qkvb``
            is appended when the weights carry a non-zero q/v bias.
        builder: For non-ViT entries, a factory ``(name, **kw) -> FrozenBackbone``.
        needs_weights: Whether ``weights=None`` deserves a loud warning.
        description: One line for listings.
    """

    name: str
    family: str
    arch: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    reader: str = "dino"
    pos_embed: str = "dino"
    upstream_file: str = ""
    hub_tag: str | None = None
    timm_name: str | None = None
    builder: Callable[..., FrozenBackbone] | None = None
    needs_weights: bool = True
    description: str = ""

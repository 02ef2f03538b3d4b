"""Resizing a ViT's learned position table to another patch grid (docs/method.md §2.4).

Each upstream family interpolates its table in its own way (scale factors, offsets, antialiasing);
the schemes here reproduce them, so that features at a new resolution equal the upstream ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["POS_EMBED_SCHEMES", "interpolate_pos_embed"]

POS_EMBED_SCHEMES = ("dino", "dinov2", "msn", "timm")


def _bicubic(
    table: torch.Tensor, out_hw: tuple[int, int], scale: tuple[float, float]
) -> torch.Tensor:
    """Bicubic resize with the reference's scale factors (align_corners False, no antialias).

    ``F.interpolate(scale_factor=s)`` sizes the output as ``floor(in * s)``, which rounding can
    leave one short of the grid (e.g. MSN's ``sqrt(29**2 / 196)``); the aten op takes the target
    size and the same scales, and equals ``F.interpolate`` whenever the latter's size is right.
    """
    out = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != out_hw:
        out = torch.ops.aten.upsample_bicubic2d(table, list(out_hw), False, scale[0], scale[1])
    return out


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], scheme: str = "dino"
) -> torch.Tensor:
    """Resample a ``[1, 1 + M, D]`` position table (class entry first, square patch part) to a grid.

    Schemes (method.md §2.4):

    * ``dino`` (DINO, iBOT, MAE): table kept when ``h * w == M`` and ``h == w``; else bicubic with
      ``scale_factor = ((h + 0.1) / sqrt(M), (w + 0.1) / sqrt(M))``;
    * ``dinov2``: the same, computed in float32;
    * ``msn``: table kept when ``h * w == M`` (count only, as the reference); else bicubic with the
      scalar ``sqrt(h * w / M)`` for square grids, ``(h / sqrt(M), w / sqrt(M))`` otherwise, no
      offset;
    * ``timm``: ``timm.layers.resample_abs_pos_embed`` (bicubic, antialiased, sized to the grid).

    Non-square grids get one factor per axis (rows from h, columns from w).

    Args:
        pos_embed: ``[1, 1 + M, D]`` table, M a perfect square.
        grid: ``(h, w)`` target patch grid.
        scheme: One of ``dino``, ``dinov2``, ``msn``, ``timm``.

    Returns:
        ``[1, 1 + h * w, D]`` table in the input's dtype.

    Raises:
        ValueError: On an unknown scheme or a non-square table.
    """
    if scheme not in POS_EMBED_SCHEMES:
        raise ValueError(
            f"unknown position-embedding scheme {scheme!r}; use one of {POS_EMBED_SCHEMES}"
        )
    h, w = grid
    num_patches = pos_embed.shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"position table of {num_patches} patch entries is not a square grid")
    dim = pos_embed.shape[2]
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # 1 1 D, 1 M D

    if scheme == "msn":
        if h * w == num_patches:
            return pos_embed
    elif h == side and w == side:
        return pos_embed

    if scheme == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(
            pos_embed, new_size=[h, w], old_size=[side, side], num_prefix_tokens=1
        )

    dtype = pos_embed.dtype
    table = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # 1 D side side
    if scheme == "dinov2":
        table = table.float()
    if scheme == "msn":
        if h == w:
            factor = math.sqrt(h * w / num_patches)
            scale = (factor, factor)
        else:
            scale = (h / math.sqrt(num_patches), w / math.sqrt(num_patches))
    else:
        scale = ((h + 0.1) / math.sqrt(num_patches), (w + 0.1) / math.sqrt(num_patches))
    table = _bicubic(table, (h, w), scale)  # 1 D h w
    patch_pos = table.to(dtype).permute(0, 2, 3, 1).reshape(1, h * w, dim)  # 1 hw D
    return torch.cat([class_pos, patch_pos], dim=1)

"""Image normalisation: ImageNet's per-channel mean and standard deviation, the input every
supported backbone expects, applied on the images' device."""

from __future__ import annotations

import torch

from cause_lightning.core.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["denormalize", "normalize", "normalize_uint8"]


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a [0, 1] image tensor ``[3,H,W]`` or ``[B,3,H,W]``.

    Args:
        tensor: Float tensor with the channel axis at -3.

    Returns:
        ``(tensor - mean) / std`` (new tensor).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor - mean) / std


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``[3,H,W]`` or ``[B,3,H,W]`` -> ImageNet-normalised float32, on their device.

    The data loaders hand uint8 images across the worker boundary (4x less memory than float32)
    and the stage modules normalise them here, on the accelerator. The arithmetic is that of
    :func:`cause_lightning.data.transforms.to_tensor_normalized` (float32 ``x / 255``, then
    :func:`normalize`), so the values are identical on the CPU.

    Args:
        images: uint8 tensor with the channel axis at -3.

    Returns:
        float32 tensor of the same shape.
    """
    return normalize(images.float() / 255.0)


def denormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Invert :func:`normalize` (values back in [0, 1] for a normalised image).

    Args:
        tensor: Normalised float tensor ``[3,H,W]`` or ``[B,3,H,W]``.

    Returns:
        ``tensor * std + mean`` (new tensor, not clamped).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return tensor * std + mean

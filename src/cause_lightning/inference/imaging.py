"""Single-image conversions of :meth:`Segmenter.predict_image` (docs/protocol.md §2).

Any input becomes an RGB PIL image as the datasets load it, then a normalised ``[1, 3, H, W]``
tensor; label maps go back to the original size with nearest resizing; large images are covered by
overlapping windows.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cause_lightning.core.constants import IMAGENET_MEAN, IMAGENET_STD
from cause_lightning.data.transforms import ensure_rgb
from cause_lightning.visualize import to_rgb_uint8

__all__ = [
    "image_tensor",
    "nearest_resize_labels",
    "sliding_logits",
    "to_pil_rgb",
    "window_starts",
    "working_size",
]


def to_pil_rgb(image: Image.Image | np.ndarray | str | os.PathLike[str]) -> Image.Image:
    """Open / convert any supported input to an RGB PIL image, as the datasets load images.

    Transparent areas are composited on black and grayscale is replicated (``ensure_rgb``), so
    an RGBA picture gives the same pixels here, in the predict stage and in evaluation.

    Args:
        image: A PIL image, a ``uint8`` array ``[H, W]`` / ``[H, W, 3|4]`` or an image path.

    Raises:
        TypeError: For any other input.
    """
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return ensure_rgb(im)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 4:
            rgb, alpha = to_rgb_uint8(image), to_rgb_uint8(image[:, :, 3])[:, :, :1]
            return ensure_rgb(Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA"))
        return Image.fromarray(to_rgb_uint8(image))
    if isinstance(image, Image.Image):
        return ensure_rgb(image)
    raise TypeError(
        f"predict_image expects a PIL image, a numpy array [H, W(, 3|4)] or a path, got "
        f"{type(image).__name__}; for a normalised tensor batch call the segmenter directly"
    )


def image_tensor(image: Image.Image) -> Tensor:
    """ImageNet-normalised ``float32 [1, 3, H, W]`` of an RGB PIL image."""
    arr = np.asarray(image, dtype=np.float32) / 255.0  # H W 3
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy((arr - mean) / std).permute(2, 0, 1)[None]  # 1 3 H W


def nearest_resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resize of an integer label map with PIL (the protocol's "nearest", any id range)."""
    if labels.shape == (height, width):
        return labels
    # Mode "I" (int32) keeps ids above 255; PIL's nearest samples pixel centres (protocol.md §2.2).
    img = Image.fromarray(np.ascontiguousarray(labels.astype(np.int32)))  # mode I
    resized = img.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.int32).astype(labels.dtype)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``[0, length)``; the last window is flush with the end."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def working_size(
    width: int, height: int, resolution: int, patch_size: int, square: bool, sliding_window: bool
) -> tuple[int, int]:
    """Size ``(W, H)`` an image of ``width x height`` is resized to before prediction.

    Args:
        width: Original width.
        height: Original height.
        resolution: Working resolution.
        patch_size: Backbone patch size.
        square: The head needs a ``resolution x resolution`` input (TR: fixed query count).
        sliding_window: Size for the sliding-window mode: shorter side -> ``resolution``, no
            snapping (windows are ``resolution x resolution``).

    Returns:
        ``(W, H)``: the square, or the shorter side at ``resolution`` and the longer at
        ``floor(res * L / s)`` (docs/protocol.md §2.2), each rounded to the nearest multiple of
        the patch.
    """
    res, p = resolution, patch_size
    if square and not sliding_window:
        return res, res
    s = min(width, height)
    w, h = (res, res * height // s) if width <= height else (res * width // s, res)
    if sliding_window:
        return max(w, res), max(h, res)
    return max(p, int(w / p + 0.5) * p), max(p, int(h / p + 0.5) * p)


def sliding_logits(
    logits: Callable[[Tensor], Tensor], x: Tensor, resolution: int, batch_size: int
) -> Tensor:
    """Average logits of ``res x res`` windows (stride ``res // 2``) over an image.

    Args:
        logits: Maps a batch of windows ``[n, 3, res, res]`` to logits ``[n, C, res, res]``.
        x: The image ``[1, 3, H, W]`` (both sides at least ``resolution``).
        resolution: Window side.
        batch_size: Windows per call of ``logits``.

    Returns:
        ``[1, C, H, W]``.
    """
    res = resolution
    _, _, h, w = x.shape
    stride = max(1, res // 2)
    boxes = [(y, z) for y in window_starts(h, res, stride) for z in window_starts(w, res, stride)]
    acc: Tensor | None = None
    count = torch.zeros(1, h, w, device=x.device, dtype=x.dtype)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        crops = torch.cat([x[..., y : y + res, z : z + res] for y, z in chunk])  # n 3 r r
        cos = logits(crops)  # n C r r
        if acc is None:
            acc = torch.zeros(cos.shape[1], h, w, device=x.device, dtype=cos.dtype)  # C H W
        for (y, z), c in zip(chunk, cos, strict=True):
            acc[:, y : y + res, z : z + res] += c
            count[:, y : y + res, z : z + res] += 1
    assert acc is not None  # at least one window
    return (acc / count)[None]  # 1 C H W

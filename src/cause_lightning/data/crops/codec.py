"""How a crop's class ids are stored: ``class + 1`` in a uint8 PNG, so that 0 means ignore."""

from __future__ import annotations

import numpy as np

from cause_lightning.core.constants import IGNORE_INDEX

__all__ = ["LABEL_ENCODING", "crop_label_lut", "decode_crop_label", "encode_crop_label"]

LABEL_ENCODING = "class+1 uint8 PNG (0 = ignore)"


def encode_crop_label(label: np.ndarray) -> np.ndarray:
    """Class ids (255 = ignore) -> stored crop values (class + 1, 0 = ignore).

    Args:
        label: integer class ids; 255 marks ignore.

    Returns:
        ``np.uint8`` array of the same shape.

    Raises:
        ValueError: if a class id is 254 or larger but not 255 (it would not fit after the shift).
    """
    arr = np.asarray(label).astype(np.int64)
    bad = (arr < 0) | ((arr >= 254) & (arr != IGNORE_INDEX))
    if bad.any():
        raise ValueError(
            f"class ids must lie in 0..253 (or 255 = ignore), found {np.unique(arr[bad])[:5]}"
        )
    return np.where(arr == IGNORE_INDEX, 0, arr + 1).astype(np.uint8)


def crop_label_lut(num_classes: int) -> np.ndarray:
    """LUT from stored crop values to class ids: ``v -> v - 1`` for ``1 <= v <= C``, else 255.

    Args:
        num_classes: C; stored values above C (never written by the tool) also decode to ignore.

    Returns:
        ``np.uint8 [256]``.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[1 : num_classes + 1] = np.arange(num_classes, dtype=np.uint8)
    return lut


def decode_crop_label(stored: np.ndarray, num_classes: int) -> np.ndarray:
    """Stored crop values (class + 1) -> class ids with 255 = ignore.

    Args:
        stored: ``uint8`` values read from a crop PNG.
        num_classes: C.

    Returns:
        ``np.uint8`` class ids.
    """
    return crop_label_lut(num_classes)[np.asarray(stored, dtype=np.uint8)]

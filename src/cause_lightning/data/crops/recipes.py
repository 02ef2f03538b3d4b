"""Crop recipes: which boxes of an image become training crops (docs/protocol.md §3)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "RECIPES",
    "CropRecipe",
    "cache_folder_name",
    "crop_boxes",
    "crop_size",
    "get_recipe",
    "make_crops",
]


@dataclass(frozen=True)
class CropRecipe:
    """A crop recipe.

    Attributes:
        name: ``five``, ``double`` or ``super``.
        ratios: crop ratios, in the order their crops are numbered.
        flip: whether each ratio is a ten-crop (five crops, then the five crops of the h-flipped
            image).
    """

    name: str
    ratios: tuple[float, ...]
    flip: bool

    @property
    def crops_per_image(self) -> int:
        """Number of crops cut from one image."""
        return len(self.ratios) * (10 if self.flip else 5)

    @property
    def folder_tag(self) -> str:
        """The cache folder suffix: ``five_crop_<r>`` / ``double_crop_0`` / ``super_crop_0``."""
        if self.name == "five":
            return f"five_crop_{self.ratios[0]}"
        return f"{self.name}_crop_0"


RECIPES: dict[str, CropRecipe] = {
    "five": CropRecipe("five", (0.5,), flip=False),
    "double": CropRecipe("double", (0.5, 0.8), flip=True),
    "super": CropRecipe("super", (0.3, 0.4, 0.5, 0.6, 0.7), flip=True),
}


def get_recipe(name: str, ratio: float | None = None) -> CropRecipe:
    """Look up a crop recipe.

    Args:
        name: ``five``, ``double`` or ``super``.
        ratio: crop ratio of the ``five`` recipe (default 0.5); not accepted for the others.

    Returns:
        The recipe.

    Raises:
        ValueError: on an unknown recipe or an invalid ratio.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown crop recipe {name!r}; expected one of {sorted(RECIPES)}")
    if ratio is None:
        return RECIPES[name]
    if name != "five":
        raise ValueError(
            f"the {name!r} recipe has fixed ratios {RECIPES[name].ratios}; only 'five' takes one"
        )
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"crop ratio must lie in (0, 1], got {ratio!r}")
    return CropRecipe("five", (float(ratio),), flip=False)


def cache_folder_name(prefix: str, recipe: CropRecipe) -> str:
    """Folder name of a crop cache, e.g. ``cocostuff_five_crop_0.5`` or ``coco81_double_crop_0``.

    Args:
        prefix: dataset prefix (``cocostuff``, ``coco81``, ``coco171``, ``cityscapes``,
            ``pascalvoc``).
        recipe: the crop recipe.

    Returns:
        The folder name.
    """
    return f"{prefix}_{recipe.folder_tag}"


def crop_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """Crop size ``(int(H * r), int(W * r))`` for a ratio (the reference truncates).

    Args:
        height: image height H.
        width: image width W.
        ratio: crop ratio r.

    Returns:
        ``(crop_height, crop_width)``.

    Raises:
        ValueError: if the crop would be empty.
    """
    ch, cw = int(height * ratio), int(width * ratio)
    if ch < 1 or cw < 1:
        raise ValueError(
            f"a {ratio} crop of a {width}x{height} (WxH) image is empty; the image is too small"
        )
    return ch, cw


def crop_boxes(height: int, width: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """The five crop boxes of torchvision's ``five_crop`` at one ratio.

    Args:
        height: image height H.
        width: image width W.
        ratio: crop ratio r.

    Returns:
        Five ``(top, left, crop_height, crop_width)`` boxes: top-left, top-right, bottom-left,
        bottom-right, centre.
    """
    ch, cw = crop_size(height, width, ratio)
    centre_top = int(round((height - ch) / 2.0))
    centre_left = int(round((width - cw) / 2.0))
    return [
        (0, 0, ch, cw),
        (0, width - cw, ch, cw),
        (height - ch, 0, ch, cw),
        (height - ch, width - cw, ch, cw),
        (centre_top, centre_left, ch, cw),
    ]


def make_crops(
    image: Image.Image, label: np.ndarray, recipe: CropRecipe
) -> Iterator[tuple[Image.Image, np.ndarray]]:
    """Cut one image and its class-id map into the recipe's crops, in numbering order.

    Args:
        image: RGB image at full resolution.
        label: ``[H, W]`` class ids (255 = ignore) of the same size.
        recipe: the crop recipe.

    Yields:
        ``(image crop, label crop)`` pairs, ``recipe.crops_per_image`` of them.

    Raises:
        ValueError: if image and label sizes differ.
    """
    width, height = image.size
    if label.shape != (height, width):
        raise ValueError(
            f"label of shape {label.shape} does not match the image size {height}x{width} (HxW)"
        )
    views: list[tuple[Image.Image, np.ndarray]] = [(image, label)]
    if recipe.flip:
        views.append((image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), label[:, ::-1]))
    for ratio in recipe.ratios:
        boxes = crop_boxes(height, width, ratio)
        for view_image, view_label in views:
            for top, left, ch, cw in boxes:
                yield (
                    view_image.crop((left, top, left + cw, top + ch)),
                    np.ascontiguousarray(view_label[top : top + ch, left : left + cw]),
                )

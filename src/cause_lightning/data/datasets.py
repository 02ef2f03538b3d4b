"""Datasets shared by every data module (docs/architecture.md §2, docs/api.md batch conventions).

* :class:`SegmentationDataset`: a list of ``(image path, label path | None)`` pairs, an optional
  label decoder (raw ids -> contiguous class ids, everything else 255) and a
  :class:`~.transforms.SegTransform`. Items are ``{"image": uint8 [3,H,W], "label": uint8 [H,W],
  "index": int}`` (normalised on the accelerator by the stage modules); with ``load_labels``
  off (stage 1 needs none) the label file is not read and the item has no ``"label"``.
* :class:`ImageFolderDataset`: unlabelled images for ``stage=predict``; images keep their aspect
  ratio (shorter side -> ``res``, both sides snapped to a multiple of the backbone's patch). Items
  are ``{"image": [3,H,W], "path": str, "size": long [2] (original H, W)}``; :func:`collate_predict`
  batches them.
* :func:`open_image` / :func:`open_label`: readers with errors that name the offending file.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from cause_lightning.core.errors import ExpectedError
from cause_lightning.core.logs import get_logger
from cause_lightning.data.transforms import SegTransform, ensure_rgb, to_tensor_normalized

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "ImageFolderDataset",
    "SegmentationDataset",
    "collate_predict",
    "find_images",
    "open_image",
    "open_label",
]

log = get_logger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


class CorruptImageError(ExpectedError, ValueError):
    """An image or mask file exists but cannot be decoded (truncated, not an image, empty)."""


def _read(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"Cannot decode image file {path}: {err}. The file is truncated or not an image; "
            "re-create it or remove it from the dataset."
        ) from err


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB.

    Args:
        path: Image file.

    Returns:
        The decoded RGB image (grey, palette, RGBA and 16-bit images are converted).

    Raises:
        FileNotFoundError: If the file does not exist.
        CorruptImageError: If it cannot be decoded or has an empty side.
    """
    img = _read(path)
    if min(img.size) < 1:
        raise CorruptImageError(f"Image file {path} has an empty side (size {img.size}).")
    return ensure_rgb(img)


def open_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label map (class or raw ids) as a 2-D integer array.

    Palette PNGs yield their indices (VOC), ``L`` images their grey values, 16-bit images ``int32``
    values. An RGB file is accepted only when its three channels are equal.

    Args:
        path: Label file (PNG).

    Returns:
        ``[H,W]`` ``uint8`` (or ``int32`` for wide formats) array.

    Raises:
        FileNotFoundError: If the file does not exist.
        CorruptImageError: If it cannot be decoded.
        ValueError: If it is a colour image (a colour-coded mask is not a class-id map).
    """
    img = _read(path)
    if img.mode in ("L", "P"):
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.int32)
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8).copy()
    arr = np.asarray(img.convert("RGB"))  # H W 3
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise ValueError(
            f"Label file {path} is a colour image (mode {img.mode}); masks must be single-channel "
            "PNGs holding class ids (255 = ignore)."
        )
    return arr[..., 0].copy()


class SegmentationDataset(Dataset):
    """Image/label pairs with the protocol transform.

    Args:
        samples: ``(image path, label path or None)`` pairs; a missing label gives an all-255 map.
        transform: Joint geometry + normalisation (:class:`SegTransform`).
        decode_label: Maps a raw label array to class ids (unmapped -> 255); must be picklable for
            workers.

    Returns from ``__getitem__``:
        ``{"image": uint8 [3,res,res], "label": uint8 [res,res], "index": int}``; without the
        ``"label"`` entry when :attr:`load_labels` is off.
    """

    #: Read and transform the label files (the mediator stage switches this off).
    load_labels: bool = True

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, str | Path | None]],
        transform: SegTransform,
        decode_label: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.samples: list[tuple[str, str | None]] = [
            (str(img), None if lab is None else str(lab)) for img, lab in samples
        ]
        self.transform = transform
        self.decode_label = decode_label

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, transform={self.transform!r})"

    @property
    def has_labels(self) -> bool:
        """Whether every sample carries a label file."""
        return all(lab is not None for _, lab in self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.samples[index]
        image = open_image(image_path)
        if not self.load_labels:
            return {"image": self.transform.image(image), "index": index}
        label = None
        if label_path is not None:
            label = open_label(label_path)
            if self.decode_label is not None:
                try:
                    label = self.decode_label(label)
                except ValueError as err:
                    raise ValueError(f"Bad label file {label_path}: {err}") from err
        img_t, label_t = self.transform(image, label)
        return {"image": img_t, "label": label_t, "index": index}


def find_images(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Resolve a folder (recursive), a glob pattern, a single file, or a list of those to image
    files.

    Args:
        inputs: Folder, glob (``**`` allowed), file, or a list mixing them.

    Returns:
        Image paths (folders and globs sorted; list order kept; duplicates dropped).

    Raises:
        FileNotFoundError: If nothing matches, naming the inputs and the accepted extensions.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    found: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found.extend(
                sorted(
                    f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                )
            )
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            found.extend(
                Path(m)
                for m in matches
                if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_EXTENSIONS
            )
    unique = list(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError(
            f"No images found for {inputs!r}: give a folder, a glob pattern such as "
            f"'dir/**/*.jpg', a file, or a list of those "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    return unique


def _snap(x: int, multiple: int) -> int:
    return max(multiple, (x + multiple // 2) // multiple * multiple)


class ImageFolderDataset(Dataset):
    """Unlabelled images for prediction, kept at their own aspect ratio.

    ``mode="short_side"``: the shorter side becomes ``res`` and the longer ``floor(res * L / s)``,
    then each side is rounded to the nearest multiple of ``patch_size`` (at least one patch), so
    sizes differ between images: use ``batch_size=1`` with :func:`collate_predict`.
    ``mode="squash"``: every image becomes ``r x r`` with ``r`` = ``res`` snapped to the patch.

    Args:
        inputs: A folder (searched recursively), a glob, a single image file, or a list of those.
        res: Target length of the shorter side.
        patch_size: Backbone patch size; both output sides are multiples of it.
        mode: ``"short_side"`` or ``"squash"``.
        resample: ``"nearest"`` (the protocol's choice), ``"bilinear"``, ``"bicubic"`` or
            ``"lanczos"``.

    Raises:
        FileNotFoundError: If no image matches ``inputs``.
        ValueError: On a bad mode, resample name, ``res`` or ``patch_size``.
    """

    def __init__(
        self,
        inputs: str | Path | Iterable[str | Path],
        res: int,
        patch_size: int,
        mode: str = "short_side",
        resample: str = "nearest",
    ) -> None:
        if mode not in ("short_side", "squash"):
            raise ValueError(f"Unknown mode {mode!r}; expected 'short_side' or 'squash'.")
        if resample not in _RESAMPLE:
            raise ValueError(f"Unknown resample {resample!r}; expected one of {sorted(_RESAMPLE)}.")
        if int(res) < 1 or int(patch_size) < 1:
            raise ValueError(f"res and patch_size must be positive, got {res} and {patch_size}.")
        self.paths = find_images(inputs)
        self.res = int(res)
        self.patch_size = int(patch_size)
        self.mode = mode
        self.resample = resample

    def __len__(self) -> int:
        return len(self.paths)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Network input size ``(W, H)`` for an image of ``width x height``.

        Args:
            width: Original width.
            height: Original height.

        Returns:
            ``(W, H)``, both multiples of ``patch_size``.
        """
        p = self.patch_size
        if self.mode == "squash":
            side = _snap(self.res, p)
            return side, side
        if width <= height:
            w, h = self.res, self.res * height // width
        else:
            w, h = self.res * width // height, self.res
        return _snap(w, p), _snap(h, p)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        img = open_image(path)
        width, height = img.size
        size = self.output_size(width, height)
        resized = img.resize(size, resample=_RESAMPLE[self.resample])
        return {
            "image": to_tensor_normalized(resized),  # 3 H W
            "path": str(path),
            "size": torch.tensor([height, width], dtype=torch.long),
        }


def collate_predict(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`ImageFolderDataset` items.

    Args:
        batch: Items of equal network-input size (always true for batch size 1).

    Returns:
        ``{"image": [B,3,H,W], "path": list[str], "size": long [B,2]}``.

    Raises:
        ValueError: On an empty batch or images of different sizes (use ``batch_size=1``).
    """
    if not batch:
        raise ValueError("collate_predict got an empty batch.")
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"Predict images in one batch have different sizes {sorted(shapes)}; use batch_size=1 "
            "(or mode='squash') for images of different aspect ratios."
        )
    return {
        "image": torch.stack([item["image"] for item in batch]),  # B 3 H W
        "path": [item["path"] for item in batch],
        "size": torch.stack([item["size"] for item in batch]),  # B 2
    }

"""Protocol transforms with PIL-exact geometry (docs/protocol.md §2).

Train and test share one recipe: resize the **shorter side** to ``res`` with PIL's *nearest*
    interpolation
(image and label alike), then centre-crop ``res x res`` (COCO, Cityscapes, mosaic); VOC squashes to
``res x res`` instead. :class:`SegTransform` returns uint8 images and labels (what crosses the
DataLoader's worker boundary); the stage modules scale them to [0, 1] and ImageNet-normalise them
on the accelerator (:func:`cause_lightning.ops.pixels.normalize_uint8`).

Exact geometry (torchvision/PIL semantics, needed for pixel parity with the reference evaluation):

* shorter side ``s -> res``, longer side ``L -> floor(res * L / s)`` (integer arithmetic here, which
  equals torchvision's ``int(res * L / s)`` for every realistic size);
* centre-crop offset ``round((size - res) / 2)`` per axis with Python's ``round`` (halves to even);
* resizing is done by PIL itself, never by ``torch.nn.functional.interpolate`` whose "nearest"
  differs.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cause_lightning.core.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from cause_lightning.ops.pixels import normalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IGNORE_INDEX",
    "SegTransform",
    "center_crop",
    "ensure_rgb",
    "label_to_pil",
    "label_to_compact_tensor",
    "label_to_tensor",
    "resize_short_side_nearest",
    "short_side_size",
    "squash_resize",
    "to_tensor_normalized",
    "to_tensor_uint8",
]


_MODES = ("crop", "squash")


def _check_res(res: int) -> int:
    if isinstance(res, bool) or int(res) != res or int(res) < 1:
        raise ValueError(f"Resolution must be a positive integer, got {res!r}.")
    return int(res)


def _check_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    if min(w, h) < 1:
        raise ValueError(
            f"Image of size {w}x{h} (WxH) is too small: its shorter side must be at least 1 pixel."
        )
    return w, h


def short_side_size(width: int, height: int, res: int) -> tuple[int, int]:
    """Output size (W, H) of the protocol's shorter-side resize.

    Args:
        width: Input width.
        height: Input height.
        res: Target length of the shorter side.

    Returns:
        ``(new_width, new_height)``: the shorter side becomes ``res``, the longer ``floor(res * L /
        s)``.

    Raises:
        ValueError: If a side is smaller than 1 or ``res`` is not a positive integer.
    """
    res = _check_res(res)
    if min(width, height) < 1:
        raise ValueError(f"Image of size {width}x{height} (WxH) has a side smaller than 1 pixel.")
    if width <= height:
        return res, res * height // width
    return res * width // height, res


def ensure_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as a 3-channel 8-bit RGB image.

    High bit-depth grey images (modes ``I``, ``I;16``, ``F``) are rescaled by their maximum, because
    PIL's own conversion would clip them to 255.

    Args:
        img: Any PIL image.

    Returns:
        An RGB image of the same size.

    Raises:
        ValueError: If the image has a side smaller than 1 pixel.
    """
    _check_size(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        scaled = arr / top * 255.0 if top > 255.0 else np.clip(arr, 0, 255)
        img = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black so transparent areas do not leak arbitrary colour values.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_short_side_nearest(
    img: Image.Image, res: int, resample: int = Image.NEAREST
) -> Image.Image:
    """Resize the shorter side to ``res`` (protocol.md §2.2), PIL-exact.

    Args:
        img: PIL image (RGB image or a label image in mode ``L``/``P``/``I``).
        res: Target length of the shorter side.
        resample: PIL resampling filter; the protocol uses ``Image.NEAREST`` for images and labels.

    Returns:
        The resized image; the longer side becomes ``floor(res * L / s)``.

    Raises:
        ValueError: On an empty image or a non-positive ``res``.
    """
    w, h = _check_size(img)
    size = short_side_size(w, h, res)
    return img.resize(size, resample=resample)


def center_crop(img: Image.Image, res: int) -> Image.Image:
    """Centre-crop ``res x res`` with torchvision's offsets ``round((size - res) / 2)``.

    Args:
        img: PIL image at least ``res`` pixels on both sides.
        res: Crop size.

    Returns:
        The cropped image.

    Raises:
        ValueError: If the image is smaller than the crop.
    """
    res = _check_res(res)
    w, h = _check_size(img)
    if w < res or h < res:
        raise ValueError(
            f"Cannot centre-crop {res}x{res} from an image of size {w}x{h} (WxH); resize its "
            f"shorter side to {res} first (resize_short_side_nearest)."
        )
    top = int(round((h - res) / 2.0))
    left = int(round((w - res) / 2.0))
    return img.crop((left, top, left + res, top + res))


def squash_resize(img: Image.Image, res: int, resample: int = Image.NEAREST) -> Image.Image:
    """Resize to ``res x res`` ignoring the aspect ratio (the VOC protocol).

    Args:
        img: PIL image.
        res: Output side.
        resample: PIL resampling filter (nearest by protocol).

    Returns:
        The ``res x res`` image.

    Raises:
        ValueError: On an empty image or a non-positive ``res``.
    """
    res = _check_res(res)
    _check_size(img)
    return img.resize((res, res), resample=resample)


def to_tensor_normalized(img: Image.Image) -> torch.Tensor:
    """PIL image -> ImageNet-normalised float32 tensor ``[3,H,W]``.

    Args:
        img: PIL image (converted to RGB if needed).

    Returns:
        Float32 tensor ``[3,H,W]``.
    """
    arr = np.asarray(ensure_rgb(img), dtype=np.float32) / 255.0  # H W 3
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # 3 H W
    return normalize(tensor)


def to_tensor_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor ``[3,H,W]`` (normalise with :func:`normalize_uint8`).

    Args:
        img: PIL image (converted to RGB if needed).

    Returns:
        uint8 tensor ``[3,H,W]``.
    """
    arr = np.asarray(ensure_rgb(img), dtype=np.uint8)  # H W 3
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # 3 H W


def label_to_pil(label: np.ndarray | Image.Image) -> Image.Image:
    """Wrap a 2-D integer label map as a PIL image that nearest resizing keeps exact.

    ``uint8`` maps (and any map with values in [0, 255]) become mode ``L``; wider ranges become mode
    ``I`` (int32), which PIL's nearest resize also copies verbatim.

    Args:
        label: ``[H,W]`` integer array, or a PIL image already (returned unchanged).

    Returns:
        A PIL image holding the same values.

    Raises:
        ValueError: If the array is not 2-D or not integer-valued.
    """
    if isinstance(label, Image.Image):
        return label
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"A label map must be 2-D [H,W], got shape {arr.shape}.")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"A label map must hold integer class ids, got dtype {arr.dtype}.")
    if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 255):
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)), mode="L")
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.int32)), mode="I")


def label_to_tensor(label: np.ndarray | Image.Image) -> torch.Tensor:
    """Label map -> ``torch.long`` tensor ``[H,W]`` (values kept, 255 = ignore).

    Args:
        label: ``[H,W]`` integer array or a label PIL image (``L``/``P``/``I``).

    Returns:
        Long tensor ``[H,W]``.
    """
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"A label map must be 2-D [H,W], got shape {arr.shape}.")
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64)))


def label_to_compact_tensor(label: np.ndarray | Image.Image) -> torch.Tensor:
    """Label map -> uint8 tensor ``[H,W]`` when every id fits (255 = ignore), else ``torch.long``.

    Labels cross the DataLoader's worker boundary in uint8 (8x less than int64); the stage
    modules widen them to long on the accelerator.

    Args:
        label: ``[H,W]`` integer array or a label PIL image (``L``/``P``/``I``).

    Returns:
        uint8 or long tensor ``[H,W]``.
    """
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"A label map must be 2-D [H,W], got shape {arr.shape}.")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        return torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64)))
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.uint8)))


class SegTransform:
    """Joint protocol transform for an image and its label map (protocol.md §2).

    ``mode="crop"``: nearest shorter-side resize to ``res`` then a ``res x res`` centre crop;
    ``mode="squash"``: nearest resize to ``res x res``. Labels always use nearest, so 255 (ignore)
    and every class id survive. The transform is picklable (DataLoader workers, ``ddp_spawn``).

    Args:
        res: Output side length.
        mode: ``"crop"`` (COCO, Cityscapes, mosaic, folder) or ``"squash"`` (VOC).
        image_resample: PIL filter for the image; nearest by protocol.
    """

    def __init__(self, res: int, mode: str = "crop", image_resample: int = Image.NEAREST) -> None:
        if mode not in _MODES:
            raise ValueError(f"Unknown SegTransform mode {mode!r}; expected one of {_MODES}.")
        self.res = _check_res(res)
        self.mode = mode
        self.image_resample = image_resample

    def __repr__(self) -> str:
        return f"SegTransform(res={self.res}, mode={self.mode!r})"

    def geometry(self, img: Image.Image, resample: int) -> Image.Image:
        """Apply the geometric part of the transform to one PIL image.

        Args:
            img: Image or label image.
            resample: PIL filter.

        Returns:
            The ``res x res`` image.
        """
        if self.mode == "squash":
            return squash_resize(img, self.res, resample=resample)
        return center_crop(resize_short_side_nearest(img, self.res, resample=resample), self.res)

    def image(self, image: Image.Image) -> torch.Tensor:
        """Transform an image alone (no label decoded).

        Args:
            image: PIL image (non-RGB images are converted).

        Returns:
            uint8 ``[3,res,res]``.
        """
        return to_tensor_uint8(self.geometry(ensure_rgb(image), self.image_resample))

    def __call__(
        self,
        image: Image.Image,
        label: np.ndarray | Image.Image | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform an image and its label identically.

        Args:
            image: PIL image (non-RGB images are converted).
            label: ``[H,W]`` class-id map of the image's size, or ``None`` (then all 255).

        Returns:
            ``(image [3,res,res] uint8, label [res,res] uint8)`` (labels with ids above 255 come
            as long).

        Raises:
            ValueError: If the label's size differs from the image's, or the image is empty.
        """
        image = ensure_rgb(image)
        img_out = self.geometry(image, self.image_resample)
        if label is None:
            label_t = torch.full((self.res, self.res), IGNORE_INDEX, dtype=torch.uint8)
        else:
            label_img = label_to_pil(label)
            if label_img.size != image.size:
                raise ValueError(
                    f"Label size {label_img.size} (WxH) does not match image size {image.size}; "
                    "masks must have exactly the image's pixel grid."
                )
            label_t = label_to_compact_tensor(self.geometry(label_img, Image.NEAREST))  # res res
        return to_tensor_uint8(img_out), label_t

"""Pre-computed training crops, STEGO style (``docs/protocol.md`` §3).

Recipes (crops are cut from the full-resolution original, after the label has been mapped to class
ids):

=========  ===============  ========================================================================
recipe     crops per image  definition
=========  ===============  ========================================================================
``five``   5                five-crop at ratio r (default 0.5): top-left, top-right, bottom-left,
                            bottom-right, centre
``double`` 20               ten-crop at r = 0.5, then ten-crop at r = 0.8
``super``  50               ten-crop at r = 0.3, 0.4, 0.5, 0.6, 0.7, in that order
=========  ===============  ========================================================================

* Crop size for ratio r on an ``H x W`` image: ``(int(H * r), int(W * r))`` (the reference's
  truncation). The corner boxes are those of torchvision's ``five_crop``; the centre box starts at
  ``int(round((H - h) / 2))`` / ``int(round((W - w) / 2))``, torchvision's ``center_crop`` rounding
  (Python's round: halves to even).
* Ten-crop = the five crops of the image, then the five crops of its horizontal flip (same order).
* Crop ``i`` of a cache is ``i = image_index * crops_per_image + position``, images in source-list
  order.
* Files: ``<cache>/img/train/<i>.jpg`` (RGB, PIL's default JPEG quality) and
  ``<cache>/label/train/<i>.png`` (uint8, **class + 1**, so 0 = ignore). The cache folder is
  ``<prefix>_five_crop_<r>``, ``<prefix>_double_crop_0`` or ``<prefix>_super_crop_0`` under
  ``<dataset dir>/cropped/``.
* ``manifest.json`` (written last) records the source list, its line count and sha256, the recipe
  and the crop count; a cache whose manifest disagrees with the requested one is refused
  (:class:`CropCacheMismatchError`).
* Writing is resumable: every file is written to a temporary name and renamed, crops that exist and
  decode are never rewritten, and an interrupted run simply continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch.utils.data import Dataset

from cause_lightning.constants import IGNORE_INDEX
from cause_lightning.data.datasets import open_image, open_label
from cause_lightning.data.transforms import SegTransform

__all__ = [
    "CROP_TOOL_VERSION",
    "LABEL_ENCODING",
    "RECIPES",
    "CropCacheMismatchError",
    "CropCacheSpec",
    "CropCacheStatus",
    "CropDataset",
    "CropRecipe",
    "build_crop_cache",
    "cache_folder_name",
    "crop_boxes",
    "crop_label_lut",
    "crop_size",
    "decode_crop_label",
    "encode_crop_label",
    "get_recipe",
    "inspect_crop_cache",
    "list_sha256",
    "make_crops",
    "make_progress",
    "read_manifest",
]

log = logging.getLogger(__name__)

#: Bumped when the bytes a recipe writes would change.
CROP_TOOL_VERSION = "1.0"
LABEL_ENCODING = "class+1 uint8 PNG (0 = ignore)"
MANIFEST_NAME = "manifest.json"

# Fields that define a cache's content: a manifest that differs on any of them is refused.
_CONTENT_KEYS: tuple[str, ...] = (
    "dataset",
    "recipe",
    "ratios",
    "flip",
    "crops_per_image",
    "source_list",
    "list_lines",
    "list_sha256",
    "num_classes",
    "num_crops",
    "label_encoding",
)
_CROP_FILE = re.compile(r"^(\d+)\.(jpg|png)$")


# ------------------------------------------------------------------------------------------ recipes
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


# -------------------------------------------------------------------------------------- label codes
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


# --------------------------------------------------------------------------------------- cache spec
def list_sha256(entries: Iterable[str]) -> str:
    """Fingerprint of a source list: sha256 of its entries, one per line, each ``\\n``-terminated.

    This equals ``sha256sum`` of a list file that is in that canonical form (the curated COCO lists
    are).

    Args:
        entries: list entries (ids or relative paths) in order.

    Returns:
        Hex digest.
    """
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.encode("utf-8") + b"\n")
    return digest.hexdigest()


class CropCacheMismatchError(ValueError):
    """A crop cache exists but its manifest describes different crops than the ones requested."""


@dataclass(frozen=True)
class CropCacheSpec:
    """What a crop cache must contain.

    Attributes:
        path: the cache folder (``.../cropped/<prefix>_<recipe tag>``).
        dataset: dataset key (``cocostuff27``, ...).
        recipe: crop recipe.
        source_list: name of the source list (relative to the dataset directory, or a description).
        list_lines: number of images in the source list.
        list_sha256: :func:`list_sha256` of the source list's entries.
        num_classes: number of classes C of the stored labels.
    """

    path: Path
    dataset: str
    recipe: CropRecipe
    source_list: str
    list_lines: int
    list_sha256: str
    num_classes: int

    @property
    def num_crops(self) -> int:
        """Expected number of crops: list lines x crops per image."""
        return self.list_lines * self.recipe.crops_per_image

    def manifest(self) -> dict[str, Any]:
        """The manifest this spec writes (content keys plus provenance)."""
        return {
            "dataset": self.dataset,
            "recipe": self.recipe.name,
            "ratios": list(self.recipe.ratios),
            "flip": self.recipe.flip,
            "crops_per_image": self.recipe.crops_per_image,
            "source_list": self.source_list,
            "list_lines": self.list_lines,
            "list_sha256": self.list_sha256,
            "num_classes": self.num_classes,
            "num_crops": self.num_crops,
            "label_encoding": LABEL_ENCODING,
            "image_format": "JPEG, PIL default quality (75)",
            "numbering": "i = image_index * crops_per_image + position",
            "tool": "cause_lightning.data.crops",
            "tool_version": CROP_TOOL_VERSION,
        }

    def mismatches(self, manifest: dict[str, Any]) -> list[str]:
        """Content fields on which a manifest disagrees with this spec.

        Args:
            manifest: a parsed ``manifest.json``.

        Returns:
            ``"key: cache has X, requested Y"`` lines (empty when the cache matches).
        """
        wanted = self.manifest()
        diffs = []
        for key in _CONTENT_KEYS:
            have = manifest.get(key)
            if key == "ratios" and have is not None:
                have = [float(x) for x in have]
            if have != wanted[key]:
                diffs.append(f"{key}: cache has {have!r}, requested {wanted[key]!r}")
        return diffs

    def mismatch_error(self, diffs: Sequence[str]) -> CropCacheMismatchError:
        """Build the refusal error for a mismatching manifest.

        Args:
            diffs: output of :meth:`mismatches`.

        Returns:
            The error, ready to raise.
        """
        return CropCacheMismatchError(
            f"The crop cache {self.path} was made for a different configuration:\n  - "
            + "\n  - ".join(diffs)
            + "\nEither select the configuration the cache was made with (e.g. "
            "data.module.train_list=...), or move the folder away (e.g. rename it to "
            f"{self.path.name}.old) and rebuild it with "
            f"`python -m cause_lightning stage=prepare data={self.dataset}`."
        )


def read_manifest(cache: Path) -> dict[str, Any] | None:
    """Read ``<cache>/manifest.json``.

    Args:
        cache: the cache folder.

    Returns:
        The parsed manifest, or ``None`` when there is none.

    Raises:
        CropCacheMismatchError: if the manifest exists but is not valid JSON.
    """
    path = Path(cache) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CropCacheMismatchError(
            f"{path} is unreadable ({err}); delete it and re-run stage=prepare to verify the "
            "cache again"
        ) from err


@dataclass
class CropCacheStatus:
    """Result of :func:`inspect_crop_cache`.

    Attributes:
        state: ``missing`` (no folder), ``incomplete`` (crops or manifest missing), ``complete``
            (manifest matches and every crop file is present) or ``unverified`` (every crop file
            present, no manifest: e.g. a cache made by the reference tool).
        found: number of crop indices with both the image and the label file present.
        expected: number of crops the spec asks for.
        manifest: the manifest, if any.
        missing_example: one missing crop index (for messages), if any.
    """

    state: str
    found: int
    expected: int
    manifest: dict[str, Any] | None = None
    missing_example: int | None = None
    extra: int = 0
    notes: list[str] = field(default_factory=list)


def _crop_dirs(cache: Path) -> tuple[Path, Path]:
    return cache / "img" / "train", cache / "label" / "train"


def _indices(folder: Path, ext: str) -> set[int]:
    if not folder.is_dir():
        return set()
    found = set()
    with os.scandir(folder) as it:
        for entry in it:
            match = _CROP_FILE.match(entry.name)
            if match and match.group(2) == ext:
                found.add(int(match.group(1)))
    return found


def inspect_crop_cache(spec: CropCacheSpec) -> CropCacheStatus:
    """Check a crop cache against its spec without decoding files (one directory scan).

    Args:
        spec: what the cache must contain.

    Returns:
        The cache status.

    Raises:
        CropCacheMismatchError: if a manifest exists and disagrees with ``spec``.
    """
    if not spec.path.is_dir():
        return CropCacheStatus("missing", 0, spec.num_crops)
    manifest = read_manifest(spec.path)
    if manifest is not None:
        diffs = spec.mismatches(manifest)
        if diffs:
            raise spec.mismatch_error(diffs)
    img_dir, label_dir = _crop_dirs(spec.path)
    both = _indices(img_dir, "jpg") & _indices(label_dir, "png")
    wanted = range(spec.num_crops)
    found = sum(1 for i in both if i < spec.num_crops)
    extra = len(both) - found
    missing_example = None
    if found < spec.num_crops:
        missing_example = next(i for i in wanted if i not in both)
    if found < spec.num_crops:
        state = "incomplete"
    else:
        state = "complete" if manifest is not None else "unverified"
    status = CropCacheStatus(state, found, spec.num_crops, manifest, missing_example, extra)
    if extra:
        status.notes.append(f"{extra} crop files beyond the expected {spec.num_crops} are ignored")
    return status


class CropDataset(Dataset):
    """The crops of a cache as a dataset, with paths computed from the index.

    A list of two million path pairs (COCO-81/171) would cost gigabytes in every DataLoader worker;
    ``<cache>/img/train/<i>.jpg`` and ``<cache>/label/train/<i>.png`` are formatted on demand.

    Args:
        cache: the cache folder.
        num_crops: number of crops (indices ``0 .. num_crops - 1``).
        num_classes: C, to decode the stored ``class + 1`` labels.
        transform: the protocol transform applied to image and label.

    Returns from ``__getitem__``:
        ``{"image": float32 [3,res,res], "label": long [res,res] (255 = ignore), "index": int}``.
    """

    def __init__(
        self, cache: str | Path, num_crops: int, num_classes: int, transform: SegTransform
    ) -> None:
        self.img_dir = str(Path(cache) / "img" / "train")
        self.label_dir = str(Path(cache) / "label" / "train")
        self.num_crops = int(num_crops)
        self.lut = crop_label_lut(num_classes)
        self.transform = transform

    def __len__(self) -> int:
        return self.num_crops

    def __repr__(self) -> str:
        return f"CropDataset(n={self.num_crops}, cache={Path(self.img_dir).parents[1]})"

    def paths(self, index: int) -> tuple[str, str]:
        """``(image path, label path)`` of crop ``index``."""
        return f"{self.img_dir}/{index}.jpg", f"{self.label_dir}/{index}.png"

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_crops:
            raise IndexError(f"crop index {index} out of range 0..{self.num_crops - 1}")
        image_path, label_path = self.paths(index)
        label = self.lut[open_label(label_path)]  # H W class ids, 255 = ignore
        image_t, label_t = self.transform(open_image(image_path), label)
        return {"image": image_t, "label": label_t, "index": index}


# ------------------------------------------------------------------------------------------ writing
class _RateColumn(ProgressColumn):
    """Throughput in items per second."""

    def __init__(self, unit: str = "images") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            "-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed"
        )


def make_progress(unit: str = "images", enabled: bool = True) -> Progress:
    """A rich progress bar with count, rate (``<unit>/s``), elapsed and remaining time.

    Args:
        unit: name of the counted items.
        enabled: ``False`` returns a disabled (silent) progress object.

    Returns:
        A ``rich.progress.Progress`` (use it as a context manager).
    """
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        redirect_stdout=False,
        redirect_stderr=False,
    )


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _write_atomic(img: Image.Image, path: Path, fmt: str) -> None:
    """Save to a temporary sibling, then rename, so a crop file is either complete or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class _ImageJob:
    index: int
    image_path: str
    label_path: str
    cache: str
    recipe: CropRecipe
    label_lut: np.ndarray
    check_decode: bool


def _crop_one_image(job: _ImageJob) -> tuple[int, int, int]:
    """Write the missing crops of one image; returns ``(index, crops written, crops kept)``."""
    img_dir, label_dir = _crop_dirs(Path(job.cache))
    cpi = job.recipe.crops_per_image
    first = job.index * cpi
    todo = []
    for pos in range(cpi):
        i = first + pos
        pair = (img_dir / f"{i}.jpg", label_dir / f"{i}.png")
        ok = all(p.is_file() for p in pair)
        if ok and job.check_decode:
            ok = all(_decodes(p) for p in pair)
        if not ok:
            todo.append(pos)
    if not todo:
        return job.index, 0, cpi
    image = open_image(job.image_path)
    raw = open_label(job.label_path)
    if raw.shape != (image.size[1], image.size[0]):
        raise ValueError(
            f"annotation {job.label_path} has size {raw.shape[1]}x{raw.shape[0]} but image "
            f"{job.image_path} "
            f"is {image.size[0]}x{image.size[1]} (WxH)"
        )
    if raw.dtype != np.uint8:
        raise ValueError(
            f"annotation {job.label_path} is not an 8-bit label map (dtype {raw.dtype})"
        )
    label = job.label_lut[raw]  # H W class ids, 255 = ignore
    wanted = set(todo)
    for pos, (img_crop, label_crop) in enumerate(make_crops(image, label, job.recipe)):
        if pos not in wanted:
            continue
        i = first + pos
        _write_atomic(img_crop, img_dir / f"{i}.jpg", "JPEG")
        _write_atomic(
            Image.fromarray(encode_crop_label(label_crop), mode="L"), label_dir / f"{i}.png", "PNG"
        )
    return job.index, len(todo), cpi - len(todo)


def _remove_stale_tmp(folder: Path) -> int:
    removed = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)
                removed += 1
    return removed


def build_crop_cache(
    spec: CropCacheSpec,
    samples: Sequence[tuple[str | Path, str | Path]],
    label_lut: np.ndarray,
    *,
    num_workers: int = 0,
    check_decode: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish) a crop cache and its manifest.

    A complete cache whose manifest matches is left untouched (only its file list is checked).
    Otherwise every crop that exists (and decodes, with ``check_decode``) is kept and only the
    missing ones are cut; the manifest is written last, so an interrupted run leaves a cache without
    manifest that the next run completes.

    Args:
        spec: what the cache must contain; ``spec.list_lines`` must equal ``len(samples)``.
        samples: ``(image path, raw annotation path)`` per source image, in source-list order.
        label_lut: ``np.uint8 [256]`` map from raw annotation values to class ids (255 = ignore).
        num_workers: worker processes (0 = in this process).
        check_decode: decode existing crops before keeping them (slower, catches corrupt files).
        progress: show a progress bar with images/s.

    Returns:
        Report: ``{"cache", "state_before", "images", "crops", "written", "kept", "seconds"}``.

    Raises:
        CropCacheMismatchError: if the cache's manifest describes other crops.
        ValueError: if ``samples`` does not match the spec's list length.
        FileNotFoundError: if a source image or annotation is missing.
        CorruptImageError: if one cannot be decoded.
    """
    if len(samples) != spec.list_lines:
        raise ValueError(
            f"{spec.source_list}: {len(samples)} source images given, but the crop spec expects "
            f"{spec.list_lines}"
        )
    lut = np.asarray(label_lut, dtype=np.uint8)
    if lut.shape != (256,):
        raise ValueError(f"label_lut must have shape (256,), got {lut.shape}")
    start = time.perf_counter()
    before = inspect_crop_cache(spec)  # raises on a mismatching manifest before anything is written
    report: dict[str, Any] = {
        "cache": str(spec.path),
        "state_before": before.state,
        "images": spec.list_lines,
        "crops": spec.num_crops,
        "written": 0,
        "kept": before.found if before.state == "complete" else 0,
    }
    if before.state == "complete":
        # A matching manifest is written only after every crop was verified: nothing to redo.
        log.info(
            "crop cache %s is complete (%d crops); manifest matches", spec.path, spec.num_crops
        )
        report["seconds"] = time.perf_counter() - start
        return report

    img_dir, label_dir = _crop_dirs(spec.path)
    img_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    stale = _remove_stale_tmp(img_dir) + _remove_stale_tmp(label_dir)
    if stale:
        log.info("removed %d temporary files of an interrupted run in %s", stale, spec.path)
    log.info(
        "writing %s crops of %d images to %s (%d of %d crops already present)",
        spec.recipe.name,
        spec.list_lines,
        spec.path,
        before.found,
        spec.num_crops,
    )
    jobs = (
        _ImageJob(index, str(img), str(lab), str(spec.path), spec.recipe, lut, check_decode)
        for index, (img, lab) in enumerate(samples)
    )
    written = kept = 0
    with make_progress("images", enabled=progress) as bar:
        task = bar.add_task(f"crops {spec.path.name}", total=spec.list_lines)
        if num_workers > 0:
            # spawn: the workers never inherit threads or locks of this process; an executor
            # (unlike multiprocessing.Pool) fails with BrokenProcessPool when a worker dies.
            ctx = multiprocessing.get_context("spawn")
            try:
                with ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
                    for _, w, k in pool.map(_crop_one_image, jobs, chunksize=16):
                        written, kept = written + w, kept + k
                        bar.advance(task)
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"a crop worker process died while writing {spec.path} (out of memory, or a "
                    "main script that cannot be re-imported, e.g. code piped to python); run again "
                    "with num_workers=0: the crops written so far are kept"
                ) from err
        else:
            for job in jobs:
                _, w, k = _crop_one_image(job)
                written, kept = written + w, kept + k
                bar.advance(task)
    after = inspect_crop_cache(spec)
    if after.found != spec.num_crops:
        raise RuntimeError(
            f"crop cache {spec.path} holds {after.found} of {spec.num_crops} crops after writing "
            f"(first missing: {after.missing_example}); re-run stage=prepare"
        )
    manifest = spec.manifest()
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = spec.path / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, spec.path / MANIFEST_NAME)
    report.update(written=written, kept=kept, seconds=time.perf_counter() - start)
    log.info("crop cache %s complete: %d crops written, %d kept", spec.path, written, kept)
    return report

"""A crop cache on disk: its spec, its ``manifest.json`` and how complete it is."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cause_lightning.core.errors import ExpectedError
from cause_lightning.data.crops.codec import LABEL_ENCODING
from cause_lightning.data.crops.recipes import CropRecipe

__all__ = [
    "CROP_TOOL_VERSION",
    "MANIFEST_NAME",
    "CropCacheMismatchError",
    "CropCacheSpec",
    "CropCacheStatus",
    "crop_dirs",
    "crop_indices",
    "inspect_crop_cache",
    "list_sha256",
    "read_manifest",
]

#: Bumped when the bytes a recipe writes would change.
CROP_TOOL_VERSION = "1.0"
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


class CropCacheMismatchError(ExpectedError, ValueError):
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


def crop_dirs(cache: Path) -> tuple[Path, Path]:
    return cache / "img" / "train", cache / "label" / "train"


def crop_indices(folder: Path, ext: str) -> set[int]:
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
    img_dir, label_dir = crop_dirs(spec.path)
    both = crop_indices(img_dir, "jpg") & crop_indices(label_dir, "png")
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

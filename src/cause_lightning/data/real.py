"""Common base of the real-dataset data modules (``docs/protocol.md`` §1-§3).

:class:`RealSegDataModule` turns a dataset description (directory name, label spec, source lists,
crop recipe) into the protocol's splits:

* ``train``: the pre-computed crop cache ``<dataset dir>/cropped/<prefix>_<recipe>`` (§3), resized
  and centre-cropped (or squashed, VOC) to ``train_res``; labels decoded from the stored
  ``class + 1`` values;
* ``val``: the full validation images with the dataset's own label decoding, at ``test_res`` (§2.2).

``verify()`` checks the layout, the list / split counts against the published ones, that every
listed image and annotation exists, and that the crop cache is complete and was made for this
configuration. Every failure names what was found, what was expected and the command that fixes it
(``python -m cause_lightning stage=prepare data=<name>``). A data root holding another dataset's
layout is recognised and reported as such.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import Dataset

from cause_lightning.core.logs import get_logger
from cause_lightning.data.base import DatasetNotFoundError, SegDataModule
from cause_lightning.data.crops import (
    CropCacheSpec,
    CropDataset,
    cache_folder_name,
    get_recipe,
    inspect_crop_cache,
    list_sha256,
)
from cause_lightning.data.datasets import SegmentationDataset
from cause_lightning.data.labels import LabelSpec, get_label_spec
from cause_lightning.data.transforms import SegTransform

__all__ = [
    "DatasetCountError",
    "LutDecoder",
    "RealSegDataModule",
    "SourceList",
    "detect_layout",
    "missing_files",
]

log = get_logger(__name__)

_LAYOUT_TITLES: dict[str, tuple[str, str]] = {
    # layout key -> (human title, data config to use)
    "cocostuff": ("COCO-Stuff", "cocostuff27 / coco81 / coco171"),
    "cityscapes": ("Cityscapes", "cityscapes27"),
    "pascalvoc": ("Pascal VOC", "pascalvoc21"),
}


class DatasetCountError(DatasetNotFoundError):
    """A dataset is present but holds a different number of items than expected.

    Args:
        what: what was counted (e.g. ``"val images (curated/val2017/...)"``).
        found: the number found.
        expected: the number expected.
        name: dataset key.
        root: data root.
        layout: expected layout text.
        hint: extra advice appended to the detail line.
    """

    def __init__(
        self,
        what: str,
        found: int,
        expected: int,
        name: str | None = None,
        root: str | Path | None = None,
        layout: str | None = None,
        hint: str = "",
    ) -> None:
        self.found = int(found)
        self.expected = int(expected)
        detail = f"{what}: found {self.found:,}, expected {self.expected:,}" + (
            f"; {hint}" if hint else ""
        )
        super().__init__(detail, name=name, root=root, layout=layout)


class LutDecoder:
    """Picklable label decoder: ``lut[raw]`` (raw annotation values -> class ids, 255 = ignore).

    Args:
        lut: ``np.uint8 [256]`` lookup table.
    """

    def __init__(self, lut: np.ndarray) -> None:
        self.lut = np.asarray(lut, dtype=np.uint8)
        if self.lut.shape != (256,):
            raise ValueError(f"a label LUT must have shape (256,), got {self.lut.shape}")

    def __call__(self, label: np.ndarray) -> np.ndarray:
        arr = np.asarray(label)
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(
                    f"annotation values must lie in 0..255, got {arr.min()}..{arr.max()}"
                )
            arr = arr.astype(np.uint8)
        return self.lut[arr]

    def __repr__(self) -> str:
        return f"LutDecoder(mapped={int((self.lut != 255).sum())})"


@dataclass(frozen=True)
class SourceList:
    """The images of one split, in the order the protocol numbers them.

    Attributes:
        name: the list's name relative to the dataset directory (or a description of a directory
            listing).
        entries: one entry per image (COCO / VOC ids, Cityscapes relative frame stems).
        samples: ``(image path, raw annotation path)`` per entry, as strings (a list of 100k
            ``Path`` objects costs seconds to build).
        published: the published count of this list, or ``None`` for a list the protocol does not
            define.
        origin: where the list came from: ``data root``, ``package``, ``file`` or
            ``directory listing``.
    """

    name: str
    entries: tuple[str, ...]
    samples: tuple[tuple[str, str], ...]
    published: int | None
    origin: str

    @property
    def sha256(self) -> str:
        """Fingerprint of the entries (:func:`~cause_lightning.data.crops.list_sha256`)."""
        return list_sha256(self.entries)


def detect_layout(path: Path) -> tuple[str, str] | None:
    """Recognise which dataset layout a directory holds.

    Args:
        path: a directory, e.g. ``<data_dir>/cityscapes`` or a data root.

    Returns:
        ``(layout key, evidence)`` with key ``cocostuff`` / ``cityscapes`` / ``pascalvoc``, or
        ``None``.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "leftImg8bit").is_dir() or (path / "gtFine").is_dir():
        found = [d for d in ("leftImg8bit", "gtFine") if (path / d).is_dir()]
        return "cityscapes", f"found {' and '.join(d + '/' for d in found)}"
    for sub in ("VOCdevkit/VOC2012", "VOC2012", "."):
        if (path / sub / "JPEGImages").is_dir() and (path / sub / "SegmentationClass").is_dir():
            where = "" if sub == "." else f"{sub}/"
            return "pascalvoc", f"found {where}JPEGImages/ and {where}SegmentationClass/"
    if (path / "VOCdevkit").is_dir():
        return "pascalvoc", "found VOCdevkit/"
    coco = [
        d
        for d in ("images/train2017", "images/val2017", "annotations/val2017", "curated")
        if (path / d).is_dir()
    ]
    if coco:
        return "cocostuff", f"found {', '.join(d + '/' for d in coco)}"
    if (path / "train2017").is_dir() or (path / "val2017").is_dir():
        return (
            "cocostuff",
            "found train2017/ or val2017/ (COCO images or stuffthingmaps, unpacked one level up)",
        )
    return None


def missing_files(paths: Sequence[str | Path]) -> list[str]:
    """The paths that are not present, with one directory listing per folder instead of one
    ``stat`` per file (COCO's 118k-image folder is listed in a fraction of a second).

    Args:
        paths: files to look for.

    Returns:
        The missing ones (as strings), in input order.
    """
    listings: dict[str, set[str]] = {}
    missing = []
    for path in map(str, paths):
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or "."))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(path)
    return missing


def read_list_file(path: Path) -> tuple[str, ...]:
    """Read a list file: one entry per non-empty line, surrounding whitespace (and CR) stripped.

    Args:
        path: the list file.

    Returns:
        The entries in file order.
    """
    return tuple(
        line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
    )


class RealSegDataModule(SegDataModule):
    """Base of the COCO-Stuff, Cityscapes and Pascal VOC data modules.

    Subclasses set the class attributes and implement :meth:`source_list` (and
    :meth:`is_own_layout`).

    ``root`` is the data root ``<data_dir>`` that holds ``<dataset dir>/`` (the dataset directory
    itself is accepted too).

    Args:
        crops: crop recipe (``five`` / ``double`` / ``super``); ``None`` = the dataset's protocol
            recipe.
        strict_counts: compare list / split sizes with the published counts (turn off for custom or
            tiny trees).
        expected_counts: explicit expected image counts per split (``{"train": n, "val": m}``); they
            replace the published counts where given.
        **kwargs: the arguments of :class:`~cause_lightning.data.base.SegDataModule` (``root``,
            resolutions, batch sizes, workers, ``limit_train``, ``seed``, ``shuffle``).
    """

    #: folder of the dataset under the data root
    dataset_dir: ClassVar[str] = ""
    #: layout key understood by :func:`detect_layout`
    layout_key: ClassVar[str] = ""
    #: human-readable dataset name for messages
    title: ClassVar[str] = ""
    #: prefix of the crop-cache folder name
    crop_prefix: ClassVar[str] = ""
    #: the protocol's crop recipe
    default_crops: ClassVar[str] = "five"
    #: SegTransform mode (``crop`` or ``squash``)
    transform_mode: ClassVar[str] = "crop"

    def __init__(
        self,
        root: str | Path,
        crops: str | None = None,
        strict_counts: bool = True,
        expected_counts: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.label_spec: LabelSpec = get_label_spec(self.name)
        self.palette = self.label_spec.palette
        self.recipe = get_recipe(crops or self.default_crops)
        self.strict_counts = bool(strict_counts)
        unknown = set(expected_counts or {}) - {"train", "val"}
        if unknown:
            raise ValueError(f"expected_counts keys must be 'train' / 'val', got {sorted(unknown)}")
        self.expected_counts = {k: int(v) for k, v in (expected_counts or {}).items()}
        self._sources: dict[str, SourceList] = {}
        self._verified: set[str] = set()

    # ------------------------------------------------------------------ layout
    def is_own_layout(self, path: Path) -> bool:
        """Whether ``path`` looks like this dataset's directory.

        Args:
            path: candidate dataset directory.

        Returns:
            ``True`` when :func:`detect_layout` recognises this dataset's layout there.
        """
        found = detect_layout(path)
        return found is not None and found[0] == self.layout_key

    def _wrong_layout(self, path: Path, found: tuple[str, str]) -> DatasetNotFoundError:
        title, config = _LAYOUT_TITLES[found[0]]
        return self.not_found(
            f"{path} holds a {title} tree ({found[1]}), not {self.title}. Use data={config} for "
            "that tree, or point data.root (paths.data_dir) at the folder that contains "
            f"{self.dataset_dir}/"
        )

    @property
    def dataset_root(self) -> Path:
        """The dataset directory: ``<root>/<dataset_dir>``, or ``root`` itself when it is one.

        Raises:
            DatasetNotFoundError: when neither exists (a foreign layout at the root is named).
        """
        own = self.root / self.dataset_dir
        if own.is_dir():
            found = detect_layout(own)
            if found is not None and found[0] != self.layout_key:
                raise self._wrong_layout(own, found)
            return own
        if self.is_own_layout(self.root):
            return self.root
        if not self.root.is_dir():
            raise self.not_found(f"the data root {self.root} does not exist")
        found = detect_layout(self.root)
        if found is not None:
            raise self._wrong_layout(self.root, found)
        siblings = [d for d in ("cocostuff", "cityscapes", "pascalvoc") if (self.root / d).is_dir()]
        extra = f" (it holds {', '.join(s + '/' for s in siblings)})" if siblings else ""
        raise self.not_found(f"no {self.dataset_dir}/ folder under {self.root}{extra}")

    def require_dir(self, path: Path, what: str) -> Path:
        """Raise :class:`DatasetNotFoundError` unless ``path`` is a directory.

        Args:
            path: the directory.
            what: what it should hold (for the message).

        Returns:
            ``path``.
        """
        if not path.is_dir():
            inside = detect_layout(self.dataset_root)
            if inside is not None and inside[0] != self.layout_key:
                raise self._wrong_layout(self.dataset_root, inside)
            raise self.not_found(f"missing {path} ({what})")
        return path

    # ------------------------------------------------------------------ hooks
    def source_list(self, split: str) -> SourceList:
        """The images of a split in protocol order (subclasses implement :meth:`_make_source_list`).

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            The (cached) source list.
        """
        self._check_split(split)
        if split not in self._sources:
            self._sources[split] = self._make_source_list(split)
        return self._sources[split]

    def _make_source_list(self, split: str) -> SourceList:
        raise NotImplementedError

    def expected_count(self, split: str, source: SourceList) -> int | None:
        """The image count a split must have.

        Explicit ``expected_counts`` win; otherwise the published count when ``strict_counts``,
        else ``None`` (not checked).

        Args:
            split: ``"train"`` or ``"val"``.
            source: the split's source list.

        Returns:
            The expected count or ``None``.
        """
        if split in self.expected_counts:
            return self.expected_counts[split]
        if self.strict_counts:
            return source.published
        return None

    # ------------------------------------------------------------------ crops
    @property
    def crop_cache_dir(self) -> Path:
        """``<dataset dir>/cropped/<prefix>_<recipe tag>``."""
        return self.dataset_root / "cropped" / cache_folder_name(self.crop_prefix, self.recipe)

    def crop_cache_spec(self) -> CropCacheSpec:
        """What the training crop cache must contain for this configuration.

        Returns:
            The cache spec (source list, its count and hash, recipe).
        """
        source = self.source_list("train")
        return CropCacheSpec(
            path=self.crop_cache_dir,
            dataset=self.name,
            recipe=self.recipe,
            source_list=source.name,
            list_lines=len(source.entries),
            list_sha256=source.sha256,
            num_classes=self.num_classes,
        )

    # ------------------------------------------------------------------ verification
    def _splits_for_trainer(self) -> tuple[str, ...]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return ("train", "val")
        fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
        return {"fit": ("train", "val"), "validate": ("val",), "test": ("val",)}.get(fn, ())

    def check_count(self, split: str, source: SourceList) -> None:
        """Compare a split's image count with :meth:`expected_count`.

        Args:
            split: ``"train"`` or ``"val"``.
            source: the split's source list.

        Raises:
            DatasetCountError: naming the count found and the count expected.
        """
        expected = self.expected_count(split, source)
        if expected is not None and len(source.entries) != expected:
            if source.published is not None and expected == source.published:
                hint = (
                    f"{expected:,} is the published count of {source.name}: the list was altered "
                    "or the download / unpacking is incomplete (strict_counts=false skips this "
                    "check)"
                )
            else:
                hint = "check the list and the unpacked files, or pass the right expected_counts"
            raise DatasetCountError(
                f"{split} images ({source.name}, {source.origin})",
                len(source.entries),
                expected,
                name=self.name,
                root=self.root,
                layout=self.layout,
                hint=hint,
            )

    def _verify_split(self, split: str) -> None:
        source = self.source_list(split)
        self.check_count(split, source)
        if split == "val":
            absent = set(missing_files([p for pair in source.samples for p in pair]))
            missing = [pair for pair in source.samples if pair[0] in absent or pair[1] in absent]
            if missing:
                first = missing[0][0] if missing[0][0] in absent else missing[0][1]
                raise DatasetCountError(
                    f"val images with annotations for the entries of {source.name}",
                    len(source.samples) - len(missing),
                    len(source.samples),
                    name=self.name,
                    root=self.root,
                    layout=self.layout,
                    hint=f"first missing file: {first}",
                )
            return
        spec = self.crop_cache_spec()
        status = inspect_crop_cache(spec)  # raises CropCacheMismatchError on a foreign manifest
        for note in status.notes:
            log.warning("%s: %s", spec.path, note)
        if status.state == "complete":
            return
        if status.state == "unverified":
            log.warning(
                "crop cache %s has all %d crops but no manifest.json (made by another tool?); "
                "using it. Run `python -m cause_lightning stage=prepare data=%s` once to verify "
                "it and write the manifest.",
                spec.path,
                spec.num_crops,
                self.name,
            )
            return
        what = (
            f"training crops in {spec.path} ({self.recipe.name} recipe: "
            f"{self.recipe.crops_per_image} per image x {spec.list_lines:,} images of "
            f"{spec.source_list})"
        )
        if status.state == "missing":
            raise self.not_found(
                f"no training crop cache at {spec.path}; the train split reads pre-computed crops "
                f"({self.recipe.crops_per_image} per image x {spec.list_lines:,} images = "
                f"{spec.num_crops:,} crops, protocol.md §3)"
            )
        raise DatasetCountError(
            what,
            status.found,
            status.expected,
            name=self.name,
            root=self.root,
            layout=self.layout,
            hint="an interrupted run leaves a partial cache; preparing again resumes it",
        )

    def verify(self, splits: Sequence[str] | None = None) -> None:
        """Check the layout, counts and crop cache of the splits a run needs.

        Args:
            splits: splits to check; ``None`` = those the attached trainer's stage needs (fit: train
                + val; validate / test: val; predict: none), or both without a trainer.

        Raises:
            DatasetNotFoundError: a missing directory, list or crop cache, or a foreign layout at
                the root.
            DatasetCountError: a list / split / cache with the wrong number of items (found and
                expected named).
            CropCacheMismatchError: a crop cache made for another list or recipe.
        """
        super().verify()
        _ = self.dataset_root
        for split in self._splits_for_trainer() if splits is None else splits:
            self._check_split(split)
            if split not in self._verified:
                self._verify_split(split)
                self._verified.add(split)

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str, res: int) -> Dataset:
        """Build a split: the crop cache (train) or the full validation images (val).

        Args:
            split: ``"train"`` or ``"val"``.
            res: side of the transformed images.

        Returns:
            A :class:`~cause_lightning.data.crops.CropDataset` (train) or a
            :class:`~cause_lightning.data.datasets.SegmentationDataset` (val).
        """
        self.verify([split])
        transform = SegTransform(res, mode=self.transform_mode)
        if split == "val":
            source = self.source_list("val")
            return SegmentationDataset(
                list(source.samples), transform, LutDecoder(self.label_spec.lut)
            )
        spec = self.crop_cache_spec()
        return CropDataset(spec.path, spec.num_crops, self.num_classes, transform)

    def describe_extra(self) -> dict[str, Any]:
        """Lists, counts and the crop recipe (the protocol's reporting rule).

        Returns:
            Primitives only; lists that cannot be read yet are reported as ``None``.
        """
        info: dict[str, Any] = {
            "crop_recipe": self.recipe.name,
            "crop_ratios": list(self.recipe.ratios),
            "crops_per_image": self.recipe.crops_per_image,
            "strict_counts": self.strict_counts,
        }
        for split in ("train", "val"):
            try:
                source = self.source_list(split)
            except (DatasetNotFoundError, OSError):
                info[f"{split}_list"] = None
                continue
            info[f"{split}_list"] = source.name
            info[f"{split}_list_origin"] = source.origin
            info[f"{split}_images"] = len(source.entries)
            info[f"{split}_list_sha256"] = source.sha256
        try:
            info["crop_cache"] = str(self.crop_cache_dir)
        except DatasetNotFoundError:
            info["crop_cache"] = None
        return info

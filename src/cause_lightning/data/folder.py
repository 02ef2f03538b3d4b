"""``data=folder``: the user's own images, with optional masks (docs/architecture.md §2).

Layout (either flat or with split folders)::

    <root>/images/**/<name>.jpg|png         all images (train = all of them)
    <root>/images/train/**  <root>/images/val/**   optional split folders
    <root>/masks/<name>.png                  optional masks, same stem as the image (or the image's
                                             path relative to images/ with a .png suffix)

Masks are single-channel PNGs of class ids in ``[0, num_classes)`` with 255 = ignore. Without split
folders, train uses every image and val uses the images that have a mask. Images go through the
protocol transform (protocol.md §2: nearest shorter-side resize + centre crop, or squash).

Evaluation (``validate`` / ``test``) needs masks: building the val split without any mask raises a
``ValueError`` that says so. Training (``fit``) works without masks; validation is then skipped with
a warning (``has_labels`` tells which case applies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cause_lightning.core.logs import get_logger
from cause_lightning.data.base import SegDataModule
from cause_lightning.data.datasets import IMAGE_EXTENSIONS, SegmentationDataset
from cause_lightning.data.transforms import IGNORE_INDEX, SegTransform

__all__ = ["FolderDataModule", "ClassIdLabels"]

log = get_logger(__name__)


class ClassIdLabels:
    """Label decoder for masks that already hold class ids: checks the range, keeps 255.

    Args:
        num_classes: Number of classes C; valid values are ``0..C-1`` and 255.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)

    def __call__(self, label: np.ndarray) -> np.ndarray:
        """Validate a mask.

        Args:
            label: ``[H,W]`` integer mask.

        Returns:
            The mask as ``uint8``.

        Raises:
            ValueError: If a value is neither a class id nor 255.
        """
        arr = np.asarray(label)
        bad = (arr != IGNORE_INDEX) & ((arr < 0) | (arr >= self.num_classes))
        if bad.any():
            values = np.unique(arr[bad])[:10].tolist()
            raise ValueError(
                f"mask values {values} are outside [0, {self.num_classes}) and not 255 (ignore); "
                "masks must hold class ids, or set data.num_classes to the right count."
            )
        return arr.astype(np.uint8)


def _images_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


class FolderDataModule(SegDataModule):
    """User images (``root/images``) with optional class-id masks (``root/masks``).

    ``root`` is the folder holding ``images/`` (and optionally ``masks/``).

    Args:
        num_classes: Number of classes in the masks (and of clusters to find).
        class_names: Optional names, ``num_classes`` of them (default ``class_0 ...``).
        mode: ``"crop"`` (shorter-side resize + centre crop) or ``"squash"``.
        **kwargs: The arguments of :class:`SegDataModule` (``root``, resolutions, batch sizes,
            workers, ``limit_train``, ``seed``, ``shuffle``).

    Raises:
        ValueError: On a bad ``num_classes`` / ``class_names`` / ``mode``.
    """

    name = "folder"
    layout = (
        "<root>/images/**/<name>.jpg|png      (or images/train/** and images/val/**)\n"
        "<root>/masks/<name>.png              optional: class ids 0..C-1, 255 = ignore"
    )

    def __init__(
        self,
        root: str | Path,
        num_classes: int,
        class_names: list[str] | None = None,
        mode: str = "crop",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if int(num_classes) < 1 or int(num_classes) > 255:
            raise ValueError(f"folder num_classes must be in [1, 255], got {num_classes}.")
        if mode not in ("crop", "squash"):
            raise ValueError(f"folder mode must be 'crop' or 'squash', got {mode!r}.")
        self.num_classes = int(num_classes)
        if class_names is None:
            class_names = [f"class_{i}" for i in range(self.num_classes)]
        class_names = [str(c) for c in class_names]
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"folder got {len(class_names)} class_names for num_classes={self.num_classes}."
            )
        self.class_names = class_names
        self.mode = mode
        self._splits: dict[str, list[tuple[Path, Path | None]]] | None = None

    # ------------------------------------------------------------------ discovery
    @property
    def images_dir(self) -> Path:
        """``root/images``."""
        return self.root / "images"

    @property
    def masks_dir(self) -> Path:
        """``root/masks``."""
        return self.root / "masks"

    def _mask_for(self, image: Path) -> Path | None:
        rel = image.relative_to(self.images_dir).with_suffix(".png")
        for candidate in (self.masks_dir / rel, self.masks_dir / f"{image.stem}.png"):
            if candidate.is_file():
                return candidate
        return None

    def _discover(self) -> dict[str, list[tuple[Path, Path | None]]]:
        if self._splits is not None:
            return self._splits
        self.verify()
        train_dir, val_dir = self.images_dir / "train", self.images_dir / "val"
        all_pairs = [(p, self._mask_for(p)) for p in _images_under(self.images_dir)]
        train = (
            [(p, self._mask_for(p)) for p in _images_under(train_dir)]
            if train_dir.is_dir()
            else all_pairs
        )
        if val_dir.is_dir():
            val = [(p, self._mask_for(p)) for p in _images_under(val_dir)]
        else:
            val = [(p, m) for p, m in all_pairs if m is not None]
        if not train:
            raise self.not_found(f"no training images under {train_dir}")
        self._splits = {"train": train, "val": val}
        return self._splits

    def verify(self) -> None:
        """Check that ``root/images`` holds at least one image.

        Raises:
            DatasetNotFoundError: If the folder or its images are missing.
        """
        super().verify()
        if not self.images_dir.is_dir():
            raise self.not_found(f"there is no images/ folder in {self.root}")
        if not any(
            p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in self.images_dir.rglob("*")
        ):
            raise self.not_found(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.images_dir}"
            )

    @property
    def has_labels(self) -> bool:
        """Whether the val split has at least one mask (evaluation is possible)."""
        return any(m is not None for _, m in self._discover()["val"])

    def samples(self, split: str) -> list[tuple[Path, Path | None]]:
        """``(image, mask or None)`` pairs of one split.

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            The pairs (sorted by path).
        """
        self._check_split(split)
        return list(self._discover()[split])

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str, res: int) -> Dataset:
        """One split through the protocol transform.

        Args:
            split: ``"train"`` or ``"val"``.
            res: Output side.

        Returns:
            A :class:`SegmentationDataset` (missing masks give all-255 labels).

        Raises:
            ValueError: For ``"val"`` when no image has a mask (evaluation needs masks).
        """
        pairs = self.samples(split)
        if split == "val" and not any(m is not None for _, m in pairs):
            raise ValueError(
                f"Evaluation on data=folder needs masks, but none was found: put class-id PNGs at "
                f"{self.masks_dir}/<image stem>.png (255 = ignore), or only train (stage fit) on "
                "unlabelled images."
            )
        return SegmentationDataset(
            pairs, SegTransform(res, mode=self.mode), decode_label=ClassIdLabels(self.num_classes)
        )

    def setup(self, stage: str | None = None) -> None:
        """Like :meth:`SegDataModule.setup`, but ``fit`` without masks skips validation.

        Args:
            stage: Lightning stage.
        """
        if stage == "fit" and not self.has_labels:
            log.warning(
                "data=folder: no masks under %s, so validation is skipped during fit.",
                self.masks_dir,
            )
            if self.train_dataset is None:
                self.train_dataset = self._limit(self.build_dataset("train", self.train_res))
            return
        super().setup(stage)

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader, or an empty list (no validation) when there are no masks."""
        if self.val_dataset is None and not self.has_labels:
            return []
        return super().val_dataloader()

    def describe_extra(self) -> dict[str, Any]:
        """Image and mask counts per split."""
        splits = self._discover()
        return {
            "images": {k: len(v) for k, v in splits.items()},
            "masks": {k: sum(m is not None for _, m in v) for k, v in splits.items()},
            "split_folders": (self.images_dir / "train").is_dir()
            or (self.images_dir / "val").is_dir(),
            "mode": self.mode,
        }

"""The training split read from a crop cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from cause_lightning.data.crops.codec import crop_label_lut
from cause_lightning.data.datasets import open_image, open_label
from cause_lightning.data.transforms import SegTransform

__all__ = ["CropDataset"]


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
        ``{"image": uint8 [3,res,res], "label": uint8 [res,res] (255 = ignore), "index": int}``;
        without the ``"label"`` entry when :attr:`load_labels` is off.
    """

    #: Read and transform the label files (the mediator stage switches this off).
    load_labels: bool = True

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
        if not self.load_labels:
            return {"image": self.transform.image(open_image(image_path)), "index": index}
        label = self.lut[open_label(label_path)]  # H W class ids, 255 = ignore
        image_t, label_t = self.transform(open_image(image_path), label)
        return {"image": image_t, "label": label_t, "index": index}

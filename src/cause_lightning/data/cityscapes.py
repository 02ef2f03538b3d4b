"""Cityscapes-27 data module (``docs/protocol.md`` §1).

Layout (the official archives ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
unpacked into one folder; STEGO's ``cityscapes.zip`` has the same tree)::

    <data_dir>/cityscapes/
      leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
      cropped/cityscapes_five_crop_0.5/{img,label}/train/<i>.jpg|png

Splits: all fine-annotated frames of ``train`` (2,975) and ``val`` (500). Labels: ``labelIds``
7..33 -> ``labelId - 7`` (27 classes, not the official 19 trainIds); everything else 255. Crops:
``five`` @ 0.5 (14,875).

Frame order is cities sorted by name, then files sorted by name. The reference numbered its crops in
torchvision's unsorted directory order, which depends on the file system; the sorted order makes
this project's crop numbers reproducible (training shuffles, so the order does not change what is
learned).
"""

from __future__ import annotations

from typing import ClassVar

from cause_lightning.data.labels import get_label_spec
from cause_lightning.data.real import RealSegDataModule, SourceList

__all__ = ["CITYSCAPES_COUNTS", "Cityscapes27DataModule"]

#: Published numbers of fine-annotated frames per split.
CITYSCAPES_COUNTS: dict[str, int] = {"train": 2_975, "val": 500}

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes27DataModule(RealSegDataModule):
    """Cityscapes with the 27 classes of labelIds 7..33.

    Train: ``five`` @ 0.5 crops of the 2,975 train frames; val: the 500 val frames, nearest
    shorter-side resize to ``test_res`` then the central ``test_res`` square. Arguments as
    :class:`~cause_lightning.data.real.RealSegDataModule`.
    """

    name = "cityscapes27"
    title = "Cityscapes-27"
    num_classes = get_label_spec("cityscapes27").num_classes
    class_names = list(get_label_spec("cityscapes27").class_names)
    dataset_dir: ClassVar[str] = "cityscapes"
    layout_key: ClassVar[str] = "cityscapes"
    crop_prefix: ClassVar[str] = "cityscapes"
    default_crops: ClassVar[str] = "five"
    transform_mode: ClassVar[str] = "crop"
    layout = """<data_dir>/cityscapes/      (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip)
  leftImg8bit/train/<city>/<city>_<seq>_<frame>_leftImg8bit.png   (2,975 frames)
  leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png     (500 frames)
  gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
  cropped/cityscapes_five_crop_0.5/{img,label}/train/<i>.jpg|png + manifest.json
                                                      (written by stage=prepare)"""

    def _make_source_list(self, split: str) -> SourceList:
        image_root = self.require_dir(
            self.dataset_root / "leftImg8bit" / split, f"Cityscapes {split} images"
        )
        label_root = self.require_dir(
            self.dataset_root / "gtFine" / split, f"Cityscapes {split} fine annotations"
        )
        entries: list[str] = []
        samples: list[tuple[str, str]] = []
        for city in sorted(p for p in image_root.iterdir() if p.is_dir()):
            for image in sorted(city.glob(f"*{_IMAGE_SUFFIX}")):
                stem = image.name[: -len(_IMAGE_SUFFIX)]
                entries.append(f"{city.name}/{stem}")
                label = label_root / city.name / f"{stem}{_LABEL_SUFFIX}"
                samples.append((str(image), str(label)))
        return SourceList(
            name=f"leftImg8bit/{split} (cities and frames sorted by name)",
            entries=tuple(entries),
            samples=tuple(samples),
            published=CITYSCAPES_COUNTS[split],
            origin="directory listing",
        )

"""Pascal VOC 2012 data module, 21 classes (``docs/protocol.md`` §1).

Layout (``VOCtrainval_11-May-2012.tar`` unpacked)::

    <data_dir>/pascalvoc/
      VOCdevkit/VOC2012/JPEGImages/<id>.jpg
      VOCdevkit/VOC2012/SegmentationClass/<id>.png    # palette PNG: 0..20, 255 = boundary/void
      VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
      cropped/pascalvoc_super_crop_0/{img,label}/train/<i>.jpg|png

Splits: ``Segmentation/train.txt`` (1,464 images, cut into ``super`` crops: 50 per image =
73,200) and ``Segmentation/val.txt`` (1,449). Labels: the palette index; values above 20 (the 255
boundaries) are ignored. Transform: both splits are squashed to ``res x res`` (nearest), not
centre-cropped (§2.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from cause_lightning.data.labels import get_label_spec
from cause_lightning.data.real import RealSegDataModule, SourceList, read_list_file

__all__ = ["VOC_COUNTS", "PascalVOC21DataModule"]

#: Published image counts of the VOC 2012 segmentation splits.
VOC_COUNTS: dict[str, int] = {"train": 1_464, "val": 1_449}


class PascalVOC21DataModule(RealSegDataModule):
    """Pascal VOC 2012 segmentation, background + 20 object classes.

    Train: ``super`` crops (ten-crops at r = 0.3 .. 0.7) of ``train.txt``; val: ``val.txt``. Both
        squashed to
    ``res x res``. Arguments as :class:`~cause_lightning.data.real.RealSegDataModule`.
    """

    name = "pascalvoc21"
    title = "Pascal VOC 2012"
    num_classes = get_label_spec("pascalvoc21").num_classes
    class_names = list(get_label_spec("pascalvoc21").class_names)
    dataset_dir: ClassVar[str] = "pascalvoc"
    layout_key: ClassVar[str] = "pascalvoc"
    crop_prefix: ClassVar[str] = "pascalvoc"
    default_crops: ClassVar[str] = "super"
    transform_mode: ClassVar[str] = "squash"
    layout = """<data_dir>/pascalvoc/                    (VOCtrainval_11-May-2012.tar unpacked here)
  VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  VOCdevkit/VOC2012/SegmentationClass/<id>.png          (palette PNG: 0..20, 255 = boundary)
  VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt    (1,464 ids)
  VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt      (1,449 ids)
  cropped/pascalvoc_super_crop_0/{img,label}/train/<i>.jpg|png + manifest.json
                                                      (written by stage=prepare)"""

    @property
    def voc_dir(self) -> Path:
        """The ``VOC2012`` folder (``<dataset dir>/VOCdevkit/VOC2012``; a root pointing at
        ``VOCdevkit`` or ``VOC2012`` itself is accepted)."""
        base = self.dataset_root
        for candidate in (base / "VOCdevkit" / "VOC2012", base / "VOC2012", base):
            if (candidate / "JPEGImages").is_dir() or (candidate / "ImageSets").is_dir():
                return candidate
        return base / "VOCdevkit" / "VOC2012"

    def _make_source_list(self, split: str) -> SourceList:
        voc = self.require_dir(self.voc_dir, "the unpacked VOC 2012 devkit")
        list_path = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_path.is_file():
            raise self.not_found(f"missing the split list {list_path}")
        entries = read_list_file(list_path)
        image_dir = voc / "JPEGImages"
        label_dir = voc / "SegmentationClass"
        if split == "val":
            self.require_dir(image_dir, "VOC images")
            self.require_dir(label_dir, "VOC segmentation annotations")
        img_base, label_base = str(image_dir), str(label_dir)
        samples = tuple((f"{img_base}/{e}.jpg", f"{label_base}/{e}.png") for e in entries)
        try:
            name = str(list_path.relative_to(self.dataset_root))
        except ValueError:
            name = str(list_path)
        return SourceList(name, entries, samples, VOC_COUNTS[split], "data root")

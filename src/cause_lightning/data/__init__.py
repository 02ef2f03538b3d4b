"""Data modules and datasets (docs/architecture.md §2, docs/protocol.md)."""

from __future__ import annotations

from cause_lightning.data.base import DatasetNotFoundError, SegDataModule
from cause_lightning.data.cityscapes import Cityscapes27DataModule
from cause_lightning.data.cocostuff import (
    Coco81DataModule,
    Coco171DataModule,
    CocoStuff27DataModule,
)
from cause_lightning.data.datasets import (
    CorruptImageError,
    ImageFolderDataset,
    SegmentationDataset,
    collate_predict,
)
from cause_lightning.data.folder import FolderDataModule
from cause_lightning.data.mosaic import MosaicDataModule
from cause_lightning.data.pascalvoc import PascalVOC21DataModule
from cause_lightning.data.real import DatasetCountError
from cause_lightning.data.transforms import SegTransform
from cause_lightning.visualize import voc_palette

__all__ = [
    "Cityscapes27DataModule",
    "Coco81DataModule",
    "Coco171DataModule",
    "CocoStuff27DataModule",
    "CorruptImageError",
    "DatasetCountError",
    "DatasetNotFoundError",
    "FolderDataModule",
    "ImageFolderDataset",
    "MosaicDataModule",
    "PascalVOC21DataModule",
    "SegDataModule",
    "SegTransform",
    "SegmentationDataset",
    "collate_predict",
    "voc_palette",
]

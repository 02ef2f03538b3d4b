"""Label maps, class names and palettes of the real datasets (``docs/protocol.md`` §1.3).

Every map is a 256-entry ``np.uint8`` lookup table (LUT) from the value stored in a dataset's
annotation PNG to the contiguous class id of the protocol; everything the protocol does not map
becomes 255 (ignore). Decoding an annotation is then one fancy-indexing operation:
``spec.lut[np.asarray(png)]``.

* COCO-Stuff-27 / COCO-81 / COCO-171: the COCO-Stuff-164k ``stuffthingmaps`` fine ids 0..181 (255 =
  unlabeled), mapped by the tables in the packaged ``resources/label_maps.json`` (-1 there means
  ignore).
* Cityscapes-27: ``*_gtFine_labelIds.png`` labelIds 7..33 -> labelId - 7 (not the official 19
  trainIds).
* Pascal VOC 2012: palette indices 0..20 are the classes; 255 (object boundaries) and anything above
  20 is ignored.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from cause_lightning.core.constants import IGNORE_INDEX
from cause_lightning.visualize import default_palette, voc_palette

__all__ = [
    "COCO_FINE_NAMES",
    "COCO_UNUSED_FINE_IDS",
    "IGNORE_INDEX",
    "LabelSpec",
    "dataset_names",
    "get_label_spec",
    "load_label_maps",
]


#: COCO-Stuff-164k fine label names, index = fine id stored in the stuffthingmaps PNGs (0..181).
COCO_FINE_NAMES: tuple[str, ...] = (
    # things 0..90 (COCO category id - 1)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

#: Thing ids that exist in the COCO category list but never occur in the annotations.
COCO_UNUSED_FINE_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

# The packaged names repeat "food" and "furniture" (a thing and a stuff super-category each);
# per-class metric keys need unique names, so the two halves are told apart here.
_COCOSTUFF27_NAMES: tuple[str, ...] = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff",
    "furniture-stuff", "raw-material", "textile", "wall", "window", "building", "ground", "plant",
    "sky", "solid", "structural", "water",
)  # fmt: skip

# Official Cityscapes colours of labelIds 7..33 (the 27 classes, in class order).
_CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180),
    (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class LabelSpec:
    """Everything needed to decode and display one dataset's labels.

    Attributes:
        name: dataset key (``cocostuff27``, ``coco81``, ``coco171``, ``cityscapes27``,
            ``pascalvoc21``).
        num_classes: number of contiguous classes C.
        class_names: C unique class names, index = class id.
        palette: ``np.uint8 [C, 3]`` display colours.
        lut: ``np.uint8 [256]`` map from the stored annotation value to the class id (255 = ignore).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: np.ndarray
    lut: np.ndarray

    def decode(self, label: np.ndarray) -> np.ndarray:
        """Map a raw annotation array to class ids.

        Args:
            label: integer array of stored annotation values (any shape, values 0..255).

        Returns:
            ``np.uint8`` array of the same shape with class ids and 255 for ignore.

        Raises:
            ValueError: if the array holds values outside 0..255 (e.g. a 16-bit annotation).
        """
        arr = np.asarray(label)
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(
                    f"{self.name}: annotation values must lie in 0..255, got "
                    f"{arr.min()}..{arr.max()}; is this the 8-bit label PNG?"
                )
            arr = arr.astype(np.uint8)
        return self.lut[arr]


def load_label_maps() -> dict[str, Any]:
    """Read the packaged ``resources/label_maps.json``.

    Returns:
        The parsed JSON: fine-id maps (string keys, -1 = ignore) and class-name lists.
    """
    return _load_label_maps_cached()


@functools.lru_cache(maxsize=1)
def _load_label_maps_cached() -> dict[str, Any]:
    path = resources.files("cause_lightning.data").joinpath("resources", "label_maps.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _lut_from_map(mapping: dict[str, int]) -> np.ndarray:
    """Build a 256-entry LUT from a ``{"fine id": class}`` map; -1 and unlisted ids -> 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for key, value in mapping.items():
        fine = int(key)
        if not 0 <= fine <= 255:
            raise ValueError(f"label map key {key!r} is not a stored 8-bit label value")
        lut[fine] = IGNORE_INDEX if value < 0 else value
    return lut


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


@functools.cache
def _build_spec(name: str) -> LabelSpec:
    maps = load_label_maps()
    if name == "cocostuff27":
        lut = _lut_from_map(maps["cocostuff27_fine_to_coarse"])
        names = _COCOSTUFF27_NAMES
        palette = default_palette(27)
    elif name == "coco81":
        lut = _lut_from_map(maps["coco81_fine_to_class"])
        used_things = [i for i in range(91) if i not in COCO_UNUSED_FINE_IDS]
        names = ("background", *(COCO_FINE_NAMES[i] for i in used_things))
        palette = voc_palette(81)
    elif name == "coco171":
        lut = _lut_from_map(maps["coco171_fine_to_class"])
        used = [i for i in range(182) if i not in COCO_UNUSED_FINE_IDS]
        names = tuple(COCO_FINE_NAMES[i] for i in used)
        palette = default_palette(171)
    elif name == "cityscapes27":
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[7:34] = np.arange(27, dtype=np.uint8)
        names = tuple(maps["cityscapes27_class_names"])
        palette = np.asarray(_CITYSCAPES_PALETTE, dtype=np.uint8)
    elif name == "pascalvoc21":
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[:21] = np.arange(21, dtype=np.uint8)
        names = tuple(maps["pascalvoc21_class_names"])
        palette = voc_palette(21)
    else:
        raise ValueError(
            f"unknown dataset {name!r}; known label specs: {', '.join(dataset_names())}"
        )
    num_classes = len(names)
    mapped = lut[lut != IGNORE_INDEX]
    if mapped.size and int(mapped.max()) >= num_classes:
        raise ValueError(
            f"{name}: label map reaches class {int(mapped.max())} but only {num_classes} names"
        )
    if len(set(names)) != num_classes:
        raise ValueError(f"{name}: class names are not unique")
    return LabelSpec(
        name=name,
        num_classes=num_classes,
        class_names=tuple(names),
        palette=_frozen(palette),
        lut=_frozen(lut),
    )


def dataset_names() -> list[str]:
    """Keys accepted by :func:`get_label_spec`.

    Returns:
        The dataset keys of the real datasets.
    """
    return ["cocostuff27", "coco81", "coco171", "cityscapes27", "pascalvoc21"]


def get_label_spec(name: str) -> LabelSpec:
    """Label map, class names and palette of a dataset (``docs/protocol.md`` §1.3).

    Args:
        name: dataset key, one of :func:`dataset_names`.

    Returns:
        The (cached, read-only) :class:`LabelSpec`.

    Raises:
        ValueError: on an unknown name (the message lists the known keys; note the reference's
            ``cityscapes`` / ``pascalvoc`` are ``cityscapes27`` / ``pascalvoc21`` here).
    """
    if name not in dataset_names():
        raise ValueError(
            f"unknown dataset {name!r}; known label specs: {', '.join(dataset_names())} "
            "(the reference's 'cityscapes' / 'pascalvoc' are 'cityscapes27' / 'pascalvoc21' here)"
        )
    return _build_spec(name)

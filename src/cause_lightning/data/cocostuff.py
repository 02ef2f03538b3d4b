"""COCO-Stuff-164k data modules: COCO-Stuff-27, COCO-81, COCO-171 (``docs/protocol.md`` §1).

Layout (STEGO's ``cocostuff.zip``, §1.1)::

    <data_dir>/cocostuff/
      images/{train2017,val2017}/<12-digit id>.jpg
      annotations/{train2017,val2017}/<id>.png   # stuffthingmaps: fine ids 0..181, 255 = unlabeled
      curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse{,_7}.txt
      cropped/<prefix>_<recipe>/{img,label}/train/<i>.jpg|png

Lists (§1.2): training reads the crops of ``train_list`` (default
``Coco164kFull_Stuff_Coarse.txt``, 97,702 ids, what the reference trains on;
``Coco164kFull_Stuff_Coarse_7.txt`` is the 49,629-image variant). COCO-Stuff-27 evaluates on
``val2017/Coco164kFull_Stuff_Coarse_7.txt`` (2,175 images), COCO-81 / COCO-171 on the un-suffixed
val list (4,172). When the data root has no ``curated/`` lists, the copies packaged with
``cause_lightning`` (the protocol's IIC / PiCIE lists) are used and the origin is reported.

Labels (§1.3): fine ids mapped by :mod:`cause_lightning.data.labels` (27 super-categories; 81 =
background + 80 things; 171 used fine ids), everything else 255. Crops: COCO-Stuff-27 ``five`` @
0.5, COCO-81/171 ``double``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from cause_lightning.core.logs import get_logger
from cause_lightning.data.labels import get_label_spec
from cause_lightning.data.real import RealSegDataModule, SourceList, read_list_file

__all__ = [
    "COCO_LIST_COUNTS",
    "Coco81DataModule",
    "Coco171DataModule",
    "CocoStuff27DataModule",
    "packaged_list",
]

log = get_logger(__name__)

TRAIN_LIST = "Coco164kFull_Stuff_Coarse.txt"
TRAIN_LIST_7 = "Coco164kFull_Stuff_Coarse_7.txt"

#: Line counts of the curated lists in the IIC / PiCIE distribution (protocol.md §1.2).
COCO_LIST_COUNTS: dict[tuple[str, str], int] = {
    ("train2017", TRAIN_LIST): 97_702,
    ("train2017", TRAIN_LIST_7): 49_629,
    ("val2017", TRAIN_LIST): 4_172,
    ("val2017", TRAIN_LIST_7): 2_175,
}


def packaged_list(split_dir: str, list_name: str) -> Path | None:
    """Path of a curated list shipped with the package.

    Args:
        split_dir: ``train2017`` or ``val2017``.
        list_name: list file name.

    Returns:
        The file's path, or ``None`` if the package does not ship it.
    """
    ref = resources.files("cause_lightning.data").joinpath(
        "resources", "cocostuff_curated", split_dir, list_name
    )
    if not ref.is_file():
        return None
    return Path(str(ref))


def _layout(crop_folder: str, val_list: str) -> str:
    val_count = COCO_LIST_COUNTS[("val2017", val_list)]
    return f"""<data_dir>/cocostuff/
  images/{{train2017,val2017}}/<12-digit id>.jpg       (COCO 2017 train / val images)
  annotations/{{train2017,val2017}}/<id>.png            (stuffthingmaps_trainval2017.zip, fine ids)
  curated/train2017/{TRAIN_LIST}    (97,702 ids; the _7 list: 49,629)
  curated/val2017/{val_list}    ({val_count:,} ids)
  cropped/{crop_folder}/{{img,label}}/train/<i>.jpg|png + manifest.json
                                                      (written by stage=prepare)"""


class _CocoStuffDataModule(RealSegDataModule):
    """Shared COCO-Stuff-164k logic; the variants differ in label map, val list and crop recipe.

    ``root`` is the data root holding ``cocostuff/`` (or the ``cocostuff`` folder itself).

    Args:
        train_list: training list file name in ``curated/train2017/`` (or a path to a custom list).
        val_list: validation list in ``curated/val2017/``; ``None`` = the variant's protocol list.
        **kwargs: the arguments of :class:`~cause_lightning.data.real.RealSegDataModule` (crop
            recipe, count checks) and of its base (root, resolutions, batch sizes, ...).
    """

    dataset_dir: ClassVar[str] = "cocostuff"
    layout_key: ClassVar[str] = "cocostuff"
    transform_mode: ClassVar[str] = "crop"
    default_val_list: ClassVar[str] = TRAIN_LIST

    def __init__(
        self,
        root: str | Path,
        train_list: str = TRAIN_LIST,
        val_list: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if not train_list:
            raise ValueError(f"{self.name}: train_list must name a list file, e.g. {TRAIN_LIST!r}")
        self.train_list = str(train_list)
        self.val_list = str(val_list or self.default_val_list)

    def _resolve_list(self, split_dir: str, list_name: str) -> tuple[Path, str, str, int | None]:
        """Find a list: ``(path, name for reports, origin, published count or None)``."""
        given = Path(list_name).expanduser()
        if given.is_absolute() or len(given.parts) > 1:
            path = given if given.is_absolute() else self.dataset_root / given
            if not path.is_file():
                raise self.not_found(f"the list file {path} does not exist")
            return path, str(given), "file", None
        name = f"curated/{split_dir}/{list_name}"
        published = COCO_LIST_COUNTS.get((split_dir, list_name))
        path = self.dataset_root / name
        if path.is_file():
            return path, name, "data root", published
        shipped = packaged_list(split_dir, list_name)
        if shipped is not None:
            log.info(
                "%s: %s is not in the data root; using the copy shipped with cause_lightning",
                self.name,
                name,
            )
            return shipped, name, "package", published
        known = ", ".join(sorted({n for _, n in COCO_LIST_COUNTS}))
        raise self.not_found(
            f"the list {path} does not exist (lists shipped with the package: {known})"
        )

    def _make_source_list(self, split: str) -> SourceList:
        split_dir = "train2017" if split == "train" else "val2017"
        list_name = self.train_list if split == "train" else self.val_list
        path, name, origin, published = self._resolve_list(split_dir, list_name)
        entries = read_list_file(path)
        image_dir = self.dataset_root / "images" / split_dir
        label_dir = self.dataset_root / "annotations" / split_dir
        if split == "val":
            self.require_dir(image_dir, "COCO val2017 images")
            self.require_dir(label_dir, "stuffthingmaps val2017 annotations")
        img_base, label_base = str(image_dir), str(label_dir)
        samples = tuple((f"{img_base}/{e}.jpg", f"{label_base}/{e}.png") for e in entries)
        return SourceList(name, entries, samples, published, origin)

    def describe_extra(self) -> dict:
        """Lists, counts and crop recipe, plus the configured list names.

        Returns:
            Primitives only.
        """
        info = super().describe_extra()
        info.update(train_list_config=self.train_list, val_list_config=self.val_list)
        return info


class CocoStuff27DataModule(_CocoStuffDataModule):
    """COCO-Stuff-27: curated COCO-Stuff-164k, 27 super-categories (12 things + 15 stuff).

    Train: ``five`` @ 0.5 crops of ``train_list``; val:
    ``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt`` (2,175 images).
    See :class:`_CocoStuffDataModule` for the arguments.
    """

    name = "cocostuff27"
    title = "COCO-Stuff-27"
    num_classes = get_label_spec("cocostuff27").num_classes
    class_names = list(get_label_spec("cocostuff27").class_names)
    crop_prefix = "cocostuff"
    default_crops = "five"
    default_val_list = TRAIN_LIST_7
    layout = _layout("cocostuff_five_crop_0.5", TRAIN_LIST_7)


class Coco81DataModule(_CocoStuffDataModule):
    """COCO-81: background (all stuff) + the 80 used thing classes.

    Train: ``double`` crops (20 per image) of ``train_list``; val:
    ``curated/val2017/Coco164kFull_Stuff_Coarse.txt`` (4,172 images).
    See :class:`_CocoStuffDataModule` for the arguments.
    """

    name = "coco81"
    title = "COCO-81"
    num_classes = get_label_spec("coco81").num_classes
    class_names = list(get_label_spec("coco81").class_names)
    crop_prefix = "coco81"
    default_crops = "double"
    default_val_list = TRAIN_LIST
    layout = _layout("coco81_double_crop_0", TRAIN_LIST)


class Coco171DataModule(_CocoStuffDataModule):
    """COCO-171: the 171 used COCO-Stuff fine classes (80 things + 91 stuff).

    Train: ``double`` crops (20 per image) of ``train_list``; val:
    ``curated/val2017/Coco164kFull_Stuff_Coarse.txt`` (4,172 images).
    See :class:`_CocoStuffDataModule` for the arguments.
    """

    name = "coco171"
    title = "COCO-171"
    num_classes = get_label_spec("coco171").num_classes
    class_names = list(get_label_spec("coco171").class_names)
    crop_prefix = "coco171"
    default_crops = "double"
    default_val_list = TRAIN_LIST
    layout = _layout("coco171_double_crop_0", TRAIN_LIST)

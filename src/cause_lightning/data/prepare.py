"""Dataset preparation: fetch or unpack, verify, write the training crops (protocol.md §1.4, §3).

:func:`prepare_module` is what ``python -m cause_lightning stage=prepare data=<name>`` runs on the
configured data module; :func:`prepare_dataset` does the same by dataset name. For each dataset it

1. finds the raw files in the layout of §1.1; missing parts are unpacked from archives placed in
   ``<data_dir>/<dataset>/downloads/`` (or ``<data_dir>/<dataset>/`` or ``<data_dir>/``), and
   archives with a public URL (COCO 2017 images, COCO-Stuff ``stuffthingmaps``, VOC 2012 trainval)
   are downloaded first, with resume, when the machine is online and ``download`` is not ``False``.
   Cityscapes needs a login: its archives are never downloaded. Whatever cannot be obtained ends the
   call with the manual steps (:class:`~cause_lightning.data.base.DatasetNotFoundError`), after a
   short connectivity probe, never a hang;
2. copies the packaged curated COCO lists into ``cocostuff/curated/`` when absent;
3. verifies the list / split counts (§1.2) and that every listed image and annotation exists;
4. writes the training crop cache once (resumable; crops that exist and decode are kept;
   ``manifest.json`` last) and verifies it.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cause_lightning.core.logs import get_logger
from cause_lightning.data.base import DatasetNotFoundError
from cause_lightning.data.cityscapes import Cityscapes27DataModule
from cause_lightning.data.cocostuff import (
    COCO_LIST_COUNTS,
    Coco81DataModule,
    Coco171DataModule,
    CocoStuff27DataModule,
    packaged_list,
)
from cause_lightning.data.crops import build_crop_cache, inspect_crop_cache
from cause_lightning.data.fetch import download_file, extract_archive, probe
from cause_lightning.data.pascalvoc import PascalVOC21DataModule
from cause_lightning.data.real import (
    DatasetCountError,
    RealSegDataModule,
    detect_layout,
    missing_files,
)

__all__ = [
    "ARCHIVES",
    "REAL_DATAMODULES",
    "Archive",
    "download_file",
    "extract_archive",
    "manual_steps",
    "prepare_dataset",
    "prepare_module",
]

log = get_logger(__name__)

REAL_DATAMODULES: dict[str, type[RealSegDataModule]] = {
    "cocostuff27": CocoStuff27DataModule,
    "coco81": Coco81DataModule,
    "coco171": Coco171DataModule,
    "cityscapes27": Cityscapes27DataModule,
    "pascalvoc21": PascalVOC21DataModule,
}


@dataclass(frozen=True)
class Archive:
    """One upstream archive.

    Attributes:
        filename: archive file name.
        url: public download URL, or ``None`` when a login is needed.
        extract_to: folder, relative to the dataset directory, that the archive is unpacked into.
        size: approximate download size (for messages).
        gives: what unpacking yields (for messages).
        skip: member-path fragments that are not unpacked (e.g. the unlabelled test split).
    """

    filename: str
    url: str | None
    extract_to: str
    size: str
    gives: str
    skip: tuple[str, ...] = ()


_STUFFTHINGMAPS_URL = (
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
    "stuffthingmaps_trainval2017.zip"
)

ARCHIVES: dict[str, dict[str, Archive]] = {
    "cocostuff": {
        "train_images": Archive(
            "train2017.zip",
            "http://images.cocodataset.org/zips/train2017.zip",
            "images",
            "18 GB",
            "images/train2017/<id>.jpg",
        ),
        "val_images": Archive(
            "val2017.zip",
            "http://images.cocodataset.org/zips/val2017.zip",
            "images",
            "0.8 GB",
            "images/val2017/<id>.jpg",
        ),
        "annotations": Archive(
            "stuffthingmaps_trainval2017.zip",
            _STUFFTHINGMAPS_URL,
            "annotations",
            "0.7 GB",
            "annotations/{train2017,val2017}/<id>.png",
        ),
    },
    "cityscapes": {
        "images": Archive(
            "leftImg8bit_trainvaltest.zip",
            None,
            ".",
            "11 GB",
            "leftImg8bit/{train,val}/<city>/...",
            skip=("leftImg8bit/test/",),
        ),
        "annotations": Archive(
            "gtFine_trainvaltest.zip",
            None,
            ".",
            "0.25 GB",
            "gtFine/{train,val}/<city>/...",
            skip=("gtFine/test/",),
        ),
    },
    "pascalvoc": {
        "devkit": Archive(
            "VOCtrainval_11-May-2012.tar",
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            ".",
            "2 GB",
            "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets}/...",
        ),
    },
}


def _find_archive(filename: str, dataset_dir: Path, data_dir: Path) -> Path | None:
    for folder in (dataset_dir / "downloads", dataset_dir, data_dir / "downloads", data_dir):
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------------------- messages
def manual_steps(name: str, data_dir: str | Path, missing: list[str] | None = None) -> str:
    """Human instructions for placing a dataset by hand.

    Args:
        name: dataset key.
        data_dir: the data root.
        missing: component keys of :data:`ARCHIVES` to list (default: all of the dataset's).

    Returns:
        Multi-line instructions ending with the command to re-run.
    """
    module = REAL_DATAMODULES[name]
    dataset_dir = Path(data_dir) / module.dataset_dir
    archives = ARCHIVES[module.layout_key]
    keys = missing or list(archives)
    lines = []
    if module.layout_key == "cityscapes":
        lines.append(
            "Cityscapes needs a (free) account: log in at "
            "https://www.cityscapes-dataset.com/downloads/ and download these archives on any "
            "machine:"
        )
    else:
        lines.append("Download these archives on a machine with internet access:")
    for key in keys:
        arc = archives[key]
        source = arc.url or "https://www.cityscapes-dataset.com/downloads/ (login)"
        target = dataset_dir if arc.extract_to == "." else dataset_dir / arc.extract_to
        lines.append(f"  - {arc.filename} ({arc.size}) from {source}")
        lines.append(f"      unpacked into {target}/ it gives {arc.gives}")
    lines.append(
        f"Copy them into {dataset_dir / 'downloads'}/ (prepare unpacks them, resumably) or unpack "
        "them yourself as shown above."
    )
    if module.layout_key == "cocostuff":
        lines.append(
            "STEGO's cocostuff.zip unpacked into the data root gives the same tree (images, "
            "annotations, curated)."
        )
    if module.layout_key == "cityscapes":
        lines.append(
            "Only the train and val parts are needed (prepare skips leftImg8bit/test and "
            "gtFine/test)."
        )
    lines.append(
        f"Then run: python -m cause_lightning stage=prepare data={name} paths.data_dir={data_dir}"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- checks
def _missing_components(module: RealSegDataModule, need_train: bool) -> dict[str, str]:
    """Which archives are needed, with the reason (component key -> what is missing)."""
    missing: dict[str, str] = {}
    splits = ("val", "train") if need_train else ("val",)
    key = module.layout_key
    for split in splits:
        try:
            source = module.source_list(split)
        except DatasetNotFoundError as err:
            if key == "cocostuff":
                missing.setdefault(f"{split}_images", err.detail)
                missing.setdefault("annotations", err.detail)
            else:
                for component in ARCHIVES[key]:
                    missing.setdefault(component, err.detail)
            continue
        images = len(missing_files([img for img, _ in source.samples]))
        labels = len(missing_files([lab for _, lab in source.samples]))
        expected = module.expected_count(split, source)
        short = expected is not None and len(source.entries) < expected
        if key == "cocostuff":
            if images:
                missing[f"{split}_images"] = (
                    f"{images:,} of {len(source.samples):,} {split} images missing"
                )
            if labels:
                missing["annotations"] = (
                    f"{labels:,} of {len(source.samples):,} {split} annotations missing"
                )
        elif key == "cityscapes":
            if short:
                missing["images"] = (
                    f"{len(source.entries):,} of {expected:,} {split} frames present"
                )
            if labels:
                missing["annotations"] = (
                    f"{labels:,} of {len(source.samples):,} {split} annotations missing"
                )
        elif images or labels or short:
            missing["devkit"] = f"{images + labels:,} listed {split} files missing"
    return missing


def _copy_curated_lists(dataset_dir: Path) -> list[str]:
    copied = []
    for split_dir, list_name in COCO_LIST_COUNTS:
        target = dataset_dir / "curated" / split_dir / list_name
        source = packaged_list(split_dir, list_name)
        if target.is_file() or source is None:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied.append(str(target.relative_to(dataset_dir)))
    if copied:
        log.info("copied the curated COCO-Stuff lists into %s", dataset_dir / "curated")
    return copied


# --------------------------------------------------------------------------------------------- main
def prepare_dataset(
    name: str,
    data_dir: str | Path,
    *,
    download: bool | None = None,
    train_list: str | None = None,
    crops: str | None = None,
    make_crops: bool = True,
    num_workers: int = 0,
    strict_counts: bool = True,
    check_decode: bool = True,
    progress: bool = True,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Prepare one dataset under ``data_dir`` so that training and evaluation find everything.

    Nothing that exists and verifies is fetched, unpacked or written again, so the call is cheap to
    repeat and resumes an interrupted one.

    Args:
        name: ``cocostuff27``, ``coco81``, ``coco171``, ``cityscapes27`` or ``pascalvoc21``.
        data_dir: the data root (``paths.data_dir``); the dataset lives in
            ``<data_dir>/<cocostuff|cityscapes|pascalvoc>/``.
        download: ``None`` (default) downloads missing public archives when their host answers a
            quick probe; ``False`` never uses the network; ``True`` requires the download (fails
            when offline). Cityscapes is never downloaded (login).
        train_list: COCO variants only: the training list (default
            ``Coco164kFull_Stuff_Coarse.txt``).
        crops: crop recipe override (default: the dataset's protocol recipe).
        make_crops: write the training crop cache (``False``: only fetch and verify the val split).
        num_workers: processes that cut crops (0 = this process).
        strict_counts: compare counts with the published ones (§1.2).
        check_decode: decode existing crops of an unfinished cache before keeping them.
        progress: show progress bars (downloads, unpacking, crops in images/s).
        timeout: seconds for the connectivity probe and for each network read.

    Returns:
        A report with the keys ``name``, ``data_dir``, ``dataset_dir``, ``downloaded``,
        ``extracted``, ``lists_copied``, ``train_list``, ``train_images``, ``train_list_sha256``,
        ``val_list``, ``val_images``, ``crop_recipe``, ``crop_cache``, ``crops`` (the
        :func:`~cause_lightning.data.crops.build_crop_cache` report, or ``None``) and ``status``.

    Raises:
        ValueError: on an unknown dataset name or an option the dataset does not take.
        DatasetNotFoundError: data that cannot be obtained automatically (the message holds the
            manual steps), or a data root in another dataset's layout.
        DatasetCountError: counts that differ from the published ones (expected and found named).
        CropCacheMismatchError: an existing crop cache made for another list or recipe.
    """
    if name not in REAL_DATAMODULES:
        raise ValueError(
            f"unknown dataset {name!r}; stage=prepare supports {', '.join(REAL_DATAMODULES)}"
        )
    kwargs: dict[str, Any] = {"crops": crops, "strict_counts": strict_counts}
    if train_list is not None:
        if REAL_DATAMODULES[name].layout_key != "cocostuff":
            raise ValueError(f"train_list applies to the COCO-Stuff variants only, not {name!r}")
        kwargs["train_list"] = train_list
    root = Path(data_dir).expanduser()
    return prepare_module(
        functools.partial(REAL_DATAMODULES[name], root=root, **kwargs),
        download=download,
        make_crops=make_crops,
        num_workers=num_workers,
        check_decode=check_decode,
        progress=progress,
        timeout=timeout,
    )


def _obtain_archives(
    module: RealSegDataModule,
    missing: dict[str, str],
    dataset_dir: Path,
    download: bool | None,
    timeout: float,
    progress: bool,
    report: dict[str, Any],
) -> None:
    """Find, download (where allowed and online) and unpack the archives of the ``missing``
    components (component -> why it is needed), recording what was done in ``report``.

    Raises:
        DatasetNotFoundError: When an archive is neither found nor downloadable, with the manual
            steps that obtain it.
    """
    name, data_dir = module.name, module.root
    archives = ARCHIVES[module.layout_key]
    online: bool | None = None
    manual: dict[str, str] = {}
    for component, reason in missing.items():
        arc = archives[component]
        log.info("%s: %s is needed (%s)", name, arc.filename, reason)
        path = _find_archive(arc.filename, dataset_dir, data_dir)
        if path is None and arc.url is not None and download is not False:
            if online is None:
                online = probe(arc.url, timeout)
                if not online:
                    log.warning(
                        "%s does not answer within %.0f s: treating the machine as offline",
                        arc.url,
                        timeout,
                    )
            if online:
                try:
                    path = download_file(
                        arc.url,
                        dataset_dir / "downloads" / arc.filename,
                        timeout=max(timeout, 30.0),
                        progress=progress,
                    )
                    report["downloaded"].append(str(path))
                except OSError as err:  # the partial file stays for the next attempt
                    log.warning("download of %s failed: %s", arc.url, err)
                    reason = f"{reason}; download failed ({err}), run again to resume"
        if path is None:
            manual[component] = reason
            continue
        target = dataset_dir if arc.extract_to == "." else dataset_dir / arc.extract_to
        extract_archive(path, target, skip=arc.skip, progress=progress)
        report["extracted"].append(str(path))
    if manual:
        steps = manual_steps(name, data_dir, list(manual))
        reasons = "; ".join(f"{archives[k].filename}: {v}" for k, v in manual.items())
        if download is True and module.layout_key != "cityscapes":
            reasons += " (download=True, but the archive host did not answer)"
        log.warning("%s cannot be prepared automatically (%s).\n%s", name, reasons, steps)
        raise module.not_found(f"{reasons}.\n{steps}")


def prepare_module(
    build: Callable[[], RealSegDataModule],
    *,
    download: bool | None = None,
    make_crops: bool = True,
    num_workers: int = 0,
    check_decode: bool = True,
    progress: bool = True,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Prepare the dataset of a data module: its root, lists and crop recipe are the module's.

    ``stage=prepare`` builds the configured ``data.module`` through this function, so the data
    root, the training list and the crop recipe are those of the run that will train on it.

    Args:
        build: Builds the data module (called again after unpacking, to re-read the lists).
        download: See :func:`prepare_dataset`.
        make_crops: Write the training crop cache.
        num_workers: Processes that cut crops (0 = this process).
        check_decode: Decode existing crops of an unfinished cache before keeping them.
        progress: Show progress bars.
        timeout: Seconds for the connectivity probe and for each network read.

    Returns:
        The report described in :func:`prepare_dataset`.

    Raises:
        TypeError: When ``build`` does not make a :class:`RealSegDataModule` (the embedded and
            folder datasets need no preparation).
    """
    module = build()
    if not isinstance(module, RealSegDataModule):
        raise TypeError(
            f"stage=prepare prepares the downloadable datasets ({', '.join(REAL_DATAMODULES)}); "
            f"{type(module).__name__} needs no preparation"
        )
    name, data_dir = module.name, module.root

    # Find or create the dataset directory; a foreign layout at the root is an error, not a target.
    dataset_dir = data_dir / module.dataset_dir
    if not dataset_dir.is_dir() and not module.is_own_layout(data_dir):
        found = detect_layout(data_dir)
        if found is not None and found[0] != module.layout_key:
            _ = module.dataset_root  # raises the wrong-layout error
        dataset_dir.mkdir(parents=True, exist_ok=True)
    dataset_dir = module.dataset_root

    report: dict[str, Any] = {
        "name": name,
        "data_dir": str(data_dir),
        "dataset_dir": str(dataset_dir),
        "downloaded": [],
        "extracted": [],
        "lists_copied": [],
        "status": "incomplete",
    }
    if module.layout_key == "cocostuff":
        report["lists_copied"] = _copy_curated_lists(dataset_dir)

    need_train = make_crops
    if make_crops:
        try:
            need_train = inspect_crop_cache(module.crop_cache_spec()).state != "complete"
        except DatasetNotFoundError:
            need_train = True

    missing = _missing_components(module, need_train)
    _obtain_archives(module, missing, dataset_dir, download, timeout, progress, report)

    # Re-read the lists after unpacking, then verify counts and files.
    module = build()
    module.verify(["val"])
    val = module.source_list("val")
    report.update(
        val_list=val.name, val_images=len(val.entries), crop_recipe=module.recipe.name, crops=None
    )

    train = module.source_list("train")
    module.check_count("train", train)
    report.update(
        train_list=train.name, train_images=len(train.entries), train_list_sha256=train.sha256
    )
    spec = module.crop_cache_spec()
    report["crop_cache"] = str(spec.path)
    if make_crops:
        if inspect_crop_cache(spec).state != "complete":
            absent = missing_files([p for pair in train.samples for p in pair])
            if absent:
                raise DatasetCountError(
                    f"train images and annotations for the {len(train.samples):,} entries of "
                    f"{train.name}",
                    2 * len(train.samples) - len(absent),
                    2 * len(train.samples),
                    name=name,
                    root=data_dir,
                    layout=module.layout,
                    hint=f"first missing file: {absent[0]}",
                )
        report["crops"] = build_crop_cache(
            spec,
            train.samples,
            module.label_spec.lut,
            num_workers=num_workers,
            check_decode=check_decode,
            progress=progress,
        )
        module.verify(["train"])
        report["status"] = "ready"
    else:
        report["status"] = "val ready (crops not written)"
    log.info(
        "%s prepared: train list %s (%d images, %s crops), val list %s (%d images)",
        name,
        report["train_list"],
        report["train_images"],
        module.recipe.name,
        report["val_list"],
        report["val_images"],
    )
    return report

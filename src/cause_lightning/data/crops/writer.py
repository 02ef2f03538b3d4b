"""Writing a crop cache: resumable, atomic per file, optionally in a small process pool."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cause_lightning.core.logs import get_logger
from cause_lightning.data.crops.cache import (
    MANIFEST_NAME,
    CropCacheSpec,
    crop_dirs,
    inspect_crop_cache,
)
from cause_lightning.data.crops.codec import encode_crop_label
from cause_lightning.data.crops.recipes import CropRecipe, make_crops
from cause_lightning.data.datasets import open_image, open_label
from cause_lightning.data.progress import make_progress

__all__ = ["build_crop_cache"]

log = get_logger(__name__)


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _write_atomic(img: Image.Image, path: Path, fmt: str) -> None:
    """Save to a temporary sibling, then rename, so a crop file is either complete or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class _ImageJob:
    index: int
    image_path: str
    label_path: str
    cache: str
    recipe: CropRecipe
    label_lut: np.ndarray
    check_decode: bool


def _crop_one_image(job: _ImageJob) -> tuple[int, int, int]:
    """Write the missing crops of one image; returns ``(index, crops written, crops kept)``."""
    img_dir, label_dir = crop_dirs(Path(job.cache))
    cpi = job.recipe.crops_per_image
    first = job.index * cpi
    todo = []
    for pos in range(cpi):
        i = first + pos
        pair = (img_dir / f"{i}.jpg", label_dir / f"{i}.png")
        ok = all(p.is_file() for p in pair)
        if ok and job.check_decode:
            ok = all(_decodes(p) for p in pair)
        if not ok:
            todo.append(pos)
    if not todo:
        return job.index, 0, cpi
    image = open_image(job.image_path)
    raw = open_label(job.label_path)
    if raw.shape != (image.size[1], image.size[0]):
        raise ValueError(
            f"annotation {job.label_path} has size {raw.shape[1]}x{raw.shape[0]} but image "
            f"{job.image_path} "
            f"is {image.size[0]}x{image.size[1]} (WxH)"
        )
    if raw.dtype != np.uint8:
        raise ValueError(
            f"annotation {job.label_path} is not an 8-bit label map (dtype {raw.dtype})"
        )
    label = job.label_lut[raw]  # H W class ids, 255 = ignore
    wanted = set(todo)
    for pos, (img_crop, label_crop) in enumerate(make_crops(image, label, job.recipe)):
        if pos not in wanted:
            continue
        i = first + pos
        _write_atomic(img_crop, img_dir / f"{i}.jpg", "JPEG")
        _write_atomic(
            Image.fromarray(encode_crop_label(label_crop), mode="L"), label_dir / f"{i}.png", "PNG"
        )
    return job.index, len(todo), cpi - len(todo)


def _remove_stale_tmp(folder: Path) -> int:
    removed = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)
                removed += 1
    return removed


def build_crop_cache(
    spec: CropCacheSpec,
    samples: Sequence[tuple[str | Path, str | Path]],
    label_lut: np.ndarray,
    *,
    num_workers: int = 0,
    check_decode: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish) a crop cache and its manifest.

    A complete cache whose manifest matches is left untouched (only its file list is checked).
    Otherwise every crop that exists (and decodes, with ``check_decode``) is kept and only the
    missing ones are cut; the manifest is written last, so an interrupted run leaves a cache without
    manifest that the next run completes.

    Args:
        spec: what the cache must contain; ``spec.list_lines`` must equal ``len(samples)``.
        samples: ``(image path, raw annotation path)`` per source image, in source-list order.
        label_lut: ``np.uint8 [256]`` map from raw annotation values to class ids (255 = ignore).
        num_workers: worker processes (0 = in this process).
        check_decode: decode existing crops before keeping them (slower, catches corrupt files).
        progress: show a progress bar with images/s.

    Returns:
        Report: ``{"cache", "state_before", "images", "crops", "written", "kept", "seconds"}``.

    Raises:
        CropCacheMismatchError: if the cache's manifest describes other crops.
        ValueError: if ``samples`` does not match the spec's list length.
        FileNotFoundError: if a source image or annotation is missing.
        CorruptImageError: if one cannot be decoded.
    """
    if len(samples) != spec.list_lines:
        raise ValueError(
            f"{spec.source_list}: {len(samples)} source images given, but the crop spec expects "
            f"{spec.list_lines}"
        )
    lut = np.asarray(label_lut, dtype=np.uint8)
    if lut.shape != (256,):
        raise ValueError(f"label_lut must have shape (256,), got {lut.shape}")
    start = time.perf_counter()
    before = inspect_crop_cache(spec)  # raises on a mismatching manifest before anything is written
    report: dict[str, Any] = {
        "cache": str(spec.path),
        "state_before": before.state,
        "images": spec.list_lines,
        "crops": spec.num_crops,
        "written": 0,
        "kept": before.found if before.state == "complete" else 0,
    }
    if before.state == "complete":
        # A matching manifest is written only after every crop was verified: nothing to redo.
        log.info(
            "crop cache %s is complete (%d crops); manifest matches", spec.path, spec.num_crops
        )
        report["seconds"] = time.perf_counter() - start
        return report

    img_dir, label_dir = crop_dirs(spec.path)
    img_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    stale = _remove_stale_tmp(img_dir) + _remove_stale_tmp(label_dir)
    if stale:
        log.info("removed %d temporary files of an interrupted run in %s", stale, spec.path)
    log.info(
        "writing %s crops of %d images to %s (%d of %d crops already present)",
        spec.recipe.name,
        spec.list_lines,
        spec.path,
        before.found,
        spec.num_crops,
    )
    jobs = (
        _ImageJob(index, str(img), str(lab), str(spec.path), spec.recipe, lut, check_decode)
        for index, (img, lab) in enumerate(samples)
    )
    written = kept = 0
    with make_progress("images", enabled=progress) as bar:
        task = bar.add_task(f"crops {spec.path.name}", total=spec.list_lines)
        if num_workers > 0:
            # spawn: the workers never inherit threads or locks of this process; an executor
            # (unlike multiprocessing.Pool) fails with BrokenProcessPool when a worker dies.
            ctx = multiprocessing.get_context("spawn")
            try:
                with ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
                    for _, w, k in pool.map(_crop_one_image, jobs, chunksize=16):
                        written, kept = written + w, kept + k
                        bar.advance(task)
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"a crop worker process died while writing {spec.path} (out of memory, or a "
                    "main script that cannot be re-imported, e.g. code piped to python); run again "
                    "with num_workers=0: the crops written so far are kept"
                ) from err
        else:
            for job in jobs:
                _, w, k = _crop_one_image(job)
                written, kept = written + w, kept + k
                bar.advance(task)
    after = inspect_crop_cache(spec)
    if after.found != spec.num_crops:
        raise RuntimeError(
            f"crop cache {spec.path} holds {after.found} of {spec.num_crops} crops after writing "
            f"(first missing: {after.missing_example}); re-run stage=prepare"
        )
    manifest = spec.manifest()
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = spec.path / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, spec.path / MANIFEST_NAME)
    report.update(written=written, kept=kept, seconds=time.perf_counter() - start)
    log.info("crop cache %s complete: %d crops written, %d kept", spec.path, written, kept)
    return report

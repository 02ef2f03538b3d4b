"""Stage ``predict``: segment a folder, a glob or a single image with a trained model.

The model is a ``segmenter.pt`` file (``predict.segmenter=...``), or else the eval stage's
``segmenter.pt`` of the configured data/backbone/head, or else the three stage artifacts. For each
image it writes the label PNG (class ids when the Hungarian assignment of the eval stage is known,
cluster ids otherwise), the colourised mask and an overlay; optionally a contact sheet (PNG) and an
HTML page side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cause_lightning.artifacts import MissingArtifactError
from cause_lightning.data.datasets import find_images, open_image
from cause_lightning.utils import get_logger
from cause_lightning.visualize import (
    contact_sheet,
    contact_sheet_html,
    overlay,
    save_png,
    to_rgb_uint8,
)

if TYPE_CHECKING:
    from cause_lightning.segmenter import Segmenter
    from cause_lightning.steps import Pipeline

__all__ = ["predict_images", "load_segmenter"]

log = get_logger(__name__)

SHEET_ROWS = 32  # images shown on the contact sheet


def load_segmenter(pipeline: Pipeline) -> Segmenter:
    """The model to predict with: an explicit file, the eval stage's export, or the artifacts."""
    from cause_lightning.segmenter import Segmenter

    cfg = pipeline.cfg
    explicit = cfg.predict.segmenter
    weights = cfg.backbone.weights
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"predict.segmenter={explicit} does not exist")
        return Segmenter.load(explicit, weights=weights)
    exported = pipeline.head_root / "segmenter.pt"
    if exported.is_file():
        return Segmenter.load(exported, weights=weights)
    log.info("no %s yet: assembling the model from the stage artifacts", exported)
    try:
        return Segmenter.from_artifacts(pipeline.root, cfg.head.name, weights=weights)
    except MissingArtifactError as err:
        # Name every way to get a model, not only the stage that writes the first missing file.
        raise MissingArtifactError(
            f"stage=predict found no model for data={cfg.data.name} backbone={cfg.backbone.name} "
            f"head={cfg.head.name}: no predict.segmenter=<file> was given, {exported} (written "
            f"by stage=eval) does not exist, and {err}. Train with stage=all, import the "
            "reference release with stage=import, or pass predict.segmenter=<segmenter.pt>"
        ) from err


def predict_images(pipeline: Pipeline) -> dict[str, Any]:
    """Run stage ``predict`` and return the written paths."""
    import torch

    cfg = pipeline.cfg
    if not cfg.predict.input:
        raise ValueError("stage=predict needs predict.input=<folder | 'glob/*.jpg' | image file>")
    paths = find_images(cfg.predict.input)
    segmenter = load_segmenter(pipeline)
    if cfg.predict.crf:
        segmenter.crf = True
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    segmenter.to(device)
    to_classes = segmenter.assignment is not None
    output = Path(cfg.predict.output_dir)
    rows: list[list[np.ndarray]] = []
    entries: list[dict[str, Any]] = []
    columns = (
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]} img/s"),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("predict", total=len(paths), rate="-")
        for i, path in enumerate(paths):
            image = open_image(path)
            labels = segmenter.predict_image(
                image, sliding_window=bool(cfg.predict.sliding_window), to_classes=to_classes
            )
            colour = segmenter.colorize(labels)
            picture = to_rgb_uint8(np.asarray(image))
            stem = f"{i:05d}_{Path(path).stem}"
            save_png(labels.astype(np.uint8), output / "labels" / f"{stem}.png")
            save_png(colour, output / "colour" / f"{stem}.png")
            save_png(overlay(picture, colour, 0.5), output / "overlay" / f"{stem}.png")
            entries.append(
                {
                    "title": Path(path).name,
                    "images": [
                        output / "overlay" / f"{stem}.png",
                        output / "colour" / f"{stem}.png",
                    ],
                }
            )
            if len(rows) < SHEET_ROWS:
                rows.append([picture, colour])
            elapsed = progress.tasks[task].elapsed or 0.0
            progress.update(task, advance=1, rate=f"{(i + 1) / elapsed:.1f}" if elapsed else "-")
    written: dict[str, Any] = {"predict/output_dir": str(output), "predict/count": len(paths)}
    if cfg.predict.contact_sheet and rows:
        titles = [f"{e['title']}: image | segments" for e in entries[: len(rows)]]
        sheet = contact_sheet(rows, titles=titles)
        written["predict/contact_sheet"] = str(save_png(sheet, output / "contact_sheet.png"))
        written["predict/html"] = str(
            contact_sheet_html(entries, output / "index.html", captions=("overlay", "segments"))
        )
    log.info(
        "wrote %d predictions (%s ids) to %s",
        len(paths),
        "class" if to_classes else "cluster",
        output,
    )
    return written

"""Stage ``predict``: segment a folder, a glob or a single image with a trained model.

The model is a ``segmenter.pt`` file (``predict.segmenter=...``), or else the eval stage's
``segmenter.pt`` of the configured data/backbone/head, or else the three stage artifacts. For each
image it writes the label PNG (class ids when the Hungarian assignment of the eval stage is known,
cluster ids otherwise), the colourised mask and an overlay; optionally a contact sheet (PNG) and an
HTML page side by side.

Images are streamed: each one's outputs are written and dropped before the next is read, and the
contact sheet keeps thumbnails only, so memory does not grow with the number of images and scales
with the largest image by a small factor (``benchmarks/bench_predict_memory.py``).

The output folder may not lie inside the input folder (nor hold any input image): a later run on
the same input would segment this run's outputs.

An image that cannot be read (a damaged file, a non-image with an image extension) does not stop
the others: every readable image is segmented, and the unreadable ones are listed with the reason
at the end. The stage fails only when no image could be read, or with ``predict.strict=true`` when
any could not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cause_lightning.artifacts.io import MissingArtifactError
from cause_lightning.artifacts.store import SEGMENTER_FILE
from cause_lightning.core.errors import ExpectedError, SettingsError
from cause_lightning.core.files import ensure_writable
from cause_lightning.core.logs import get_logger
from cause_lightning.data.datasets import find_images, open_image
from cause_lightning.stages.precision import apply_stage_precision
from cause_lightning.visualize import (
    contact_sheet,
    contact_sheet_html,
    overlay,
    save_png,
    thumbnail,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from PIL import Image

    from cause_lightning.segmenter import Segmenter
    from cause_lightning.stages.context import RunContext

__all__ = [
    "predict_images",
    "load_segmenter",
    "check_output_outside_input",
    "UnreadableImagesError",
]

log = get_logger(__name__)

SHEET_ROWS = 32  # images shown on the contact sheet
SHEET_SIDE = 256  # longest side of an image on the contact sheet, in pixels


class UnreadableImagesError(ExpectedError, OSError):
    """No input image could be read, or (``predict.strict=true``) some could not."""


def load_segmenter(run: RunContext) -> Segmenter:
    """The model to predict with: an explicit file, else the ``segmenter.pt`` of an evaluation of
    the probe made with the run's settings (the one of the run's evaluation settings, else the
    newest), else one assembled from that probe."""
    from cause_lightning.segmenter import Segmenter

    cfg = run.cfg
    explicit = cfg.predict.segmenter
    weights = cfg.backbone.weights
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"predict.segmenter={explicit} does not exist")
        return Segmenter.load(explicit, weights=weights)
    try:
        probe = run.require("probe")
        evaluated = run.find("eval") or run.store.newest("eval", probe)
        if evaluated is not None and (evaluated.path / SEGMENTER_FILE).is_file():
            log.info("predicting with %s", evaluated.path / SEGMENTER_FILE)
            return Segmenter.load(evaluated.path / SEGMENTER_FILE, weights=weights)
    except MissingArtifactError as err:
        # Name every way to get a model, not only the stage that writes the first missing file.
        raise MissingArtifactError(
            f"stage=predict found no model for these settings: no predict.segmenter=<file> was "
            f"given, and {err}. Train with stage=all, import the reference release with "
            "stage=import (then predict with its artifact_tag), or pass "
            "predict.segmenter=<segmenter.pt>"
        ) from err
    log.info("no evaluation yet: assembling the model from %s", probe.path)
    return Segmenter.from_artifacts(probe.path, weights=weights)


def predict_images(run: RunContext) -> dict[str, Any]:
    """Run stage ``predict`` and return the written paths."""
    import torch

    cfg = run.cfg
    if not cfg.predict.input:
        raise ValueError("stage=predict needs predict.input=<folder | 'glob/*.jpg' | image file>")
    source = str(cfg.predict.input)
    if not any(ch in source for ch in "*?[") and not Path(source).expanduser().exists():
        raise FileNotFoundError(
            f"predict.input={source} does not exist: give an existing folder, image file or a "
            "glob pattern such as 'photos/**/*.jpg'"
        )
    paths = find_images(cfg.predict.input)
    output = Path(cfg.predict.output_dir)
    check_output_outside_input(output, source, paths)
    # The outputs take at least about as much room as the inputs (PNG is lossless).
    need = sum(Path(p).stat().st_size for p in paths)
    ensure_writable(output, "predict.output_dir", need=need)
    segmenter = load_segmenter(run)
    if cfg.predict.crf:
        segmenter.crf = True
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    apply_stage_precision("predict", on_gpu=device == "cuda")
    segmenter.to(device)
    to_classes = segmenter.assignment is not None
    rows: list[list[np.ndarray]] = []  # thumbnails only
    entries: list[dict[str, Any]] = []
    unreadable: list[tuple[Path, str]] = []
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
            try:
                image = open_image(path)
            except (OSError, ValueError) as err:  # damaged file or not an image
                unreadable.append((Path(path), f"{type(err).__name__}: {err}"))
                progress.update(task, advance=1)
                continue
            stem = f"{i:05d}_{Path(path).stem}"
            sheet_row = _segment_one(
                segmenter, image, output, stem, cfg, to_classes, keep=len(rows) < SHEET_ROWS
            )
            if sheet_row is not None:
                rows.append(sheet_row)
            entries.append(
                {
                    "title": Path(path).name,
                    "images": [
                        output / "overlay" / f"{stem}.png",
                        output / "colour" / f"{stem}.png",
                    ],
                }
            )
            elapsed = progress.tasks[task].elapsed or 0.0
            progress.update(task, advance=1, rate=f"{(i + 1) / elapsed:.1f}" if elapsed else "-")
    written: dict[str, Any] = {
        "predict/output_dir": str(output),
        "predict/count": len(entries),
        "predict/unreadable": [str(p) for p, _ in unreadable],
    }
    if cfg.predict.contact_sheet and rows:
        titles = [f"{e['title']}: image | segments" for e in entries[: len(rows)]]
        sheet = contact_sheet(rows, titles=titles)
        written["predict/contact_sheet"] = str(save_png(sheet, output / "contact_sheet.png"))
        written["predict/html"] = str(
            contact_sheet_html(entries, output / "index.html", captions=("overlay", "segments"))
        )
    log.info(
        "wrote %d predictions (%s ids) to %s",
        len(entries),
        "class" if to_classes else "cluster",
        output,
    )
    if unreadable:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in unreadable)
        summary = f"{len(unreadable)} of {len(paths)} images could not be read:\n{listing}"
        if not entries:
            raise UnreadableImagesError(f"no image could be segmented; {summary}")
        if cfg.predict.get("strict", False):
            raise UnreadableImagesError(
                f"predict.strict=true: {summary}\n(the {len(entries)} readable ones were "
                f"segmented into {output})"
            )
        log.warning("%s", summary)
    return written


def _segment_one(
    segmenter: Segmenter,
    image: Image.Image,
    output: Path,
    stem: str,
    cfg: DictConfig,
    to_classes: bool,
    keep: bool,
) -> list[np.ndarray] | None:
    """Segment one image and write its label map, colour mask and overlay.

    Only what the contact sheet needs survives the call (thumbnails, when ``keep``): at full
    resolution, the picture, the label map (``uint8``) and the colour mask exist once each.
    """
    labels = segmenter.predict_image(
        image, sliding_window=bool(cfg.predict.sliding_window), to_classes=to_classes
    ).astype(np.uint8)  # H W
    save_png(labels, output / "labels" / f"{stem}.png")
    colour = segmenter.colorize(labels)  # H W 3
    del labels
    save_png(colour, output / "colour" / f"{stem}.png")
    picture = np.asarray(image)  # H W 3
    save_png(overlay(picture, colour, 0.5), output / "overlay" / f"{stem}.png")
    if not keep:
        return None
    return [thumbnail(picture, SHEET_SIDE), thumbnail(colour, SHEET_SIDE, nearest=True)]


def check_output_outside_input(output: Path, source: str, paths: list[Path]) -> None:
    """Refuse an output folder inside the input folder, or one that holds input images.

    Raises:
        SettingsError: Naming both settings, before any image is segmented.
    """
    out = output.expanduser().resolve()
    folder = Path(source).expanduser()
    inside = folder.is_dir() and out.is_relative_to(folder.resolve())
    held = [p for p in paths if Path(p).resolve().is_relative_to(out)]
    if inside or held:
        found = f" (it holds {len(held)} of the input images, e.g. {held[0]})" if held else ""
        raise SettingsError(
            f"predict.output_dir={output} lies inside predict.input={source}{found}: the next "
            "run on that input would segment these outputs; nothing was run. Choose an output "
            "folder outside the input, e.g. predict.output_dir=<input>-predictions"
        )

"""Experiment tracking beyond scalar metrics: W&B images, tables and artifacts (docs/scaling.md).

Scalar metrics reach every configured logger through Lightning (slash-named keys such as
``train/loss_front`` and ``test/cluster/flip_crf/mIoU``), and the resolved config is the W&B run
config. After each CAUSE step the pipeline calls :func:`publish_step`, which adds, for every
:class:`~lightning.pytorch.loggers.WandbLogger` of the step's trainer and on global rank 0 only:

* the step's exported files as W&B artifacts of type ``clusterbook`` / ``head`` / ``probe`` /
  ``segmenter`` (named ``<experiment>-<kind>``);
* after ``eval``: the prediction contact sheet and example PNGs as ``wandb.Image``, the per-class
  IoU of every cluster-probe variant as a ``wandb.Table``, and the matched confusion matrix of the
  recorded variant as an image (drawn with PIL, no plotting library needed);

and then finishes the step's W&B run, so that every step is its own run (grouped by experiment,
named by step) and no run bleeds into the next step or multirun job (rule P2). The W&B mode is
the ``WANDB_MODE`` environment variable (``online``, ``offline``, ``disabled``), never a logger
argument (rule P3).
"""

from __future__ import annotations

import json
import netrc
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from omegaconf import DictConfig

from cause_lightning.errors import SettingsError
from cause_lightning.logs import get_logger

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger

__all__ = [
    "require_wandb_login",
    "step_loggers",
    "ARTIFACT_KINDS",
    "confusion_image",
    "instantiate_logger",
    "log_artifact",
    "log_evaluation",
    "publish_step",
    "wandb_loggers",
]

log = get_logger(__name__)

#: result key of an exported file -> W&B artifact type
ARTIFACT_KINDS: dict[str, str] = {
    "artifacts/clusterbook": "clusterbook",
    "artifacts/head": "head",
    "artifacts/probe": "probe",
    "artifacts/segmenter": "segmenter",
}

_MISSING_PACKAGES = {
    "TensorBoardLogger": (
        "logger=tensorboard needs the `tensorboard` (or `tensorboardX`) package, which is not "
        "installed: `pip install tensorboard`, or use logger=csv / logger=wandb instead"
    ),
    "WandbLogger": "logger=wandb needs the `wandb` package: `pip install wandb`",
}


def instantiate_logger(node: DictConfig, **overrides: Any) -> Any:
    """Instantiate one ``logger`` node, naming the missing package when its backend is absent.

    The node is flat (``_target_`` plus constructor arguments); it is built directly rather than
    through ``hydra.utils.instantiate``, whose first parameter is called ``config`` and would
    swallow ``WandbLogger(config=...)``, and which would recurse into the ``_target_`` nodes of
    the resolved run config passed as ``config``.

    Args:
        node: A logger config node with ``_target_``.
        **overrides: Constructor arguments that replace the node's.

    Returns:
        The Lightning logger.

    Raises:
        ValueError: When the node has no ``_target_``.
        ModuleNotFoundError: When the logger's backend package is not installed (with the
            ``pip install`` command and the alternatives).
    """
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    params: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    target = str(params.pop("_target_", "") or "")
    if not target:
        raise ValueError(f"logger node {params} has no _target_")
    params.update(overrides)
    try:
        return get_class(target)(**params)
    except ModuleNotFoundError as err:
        hint = next((text for name, text in _MISSING_PACKAGES.items() if name in target), None)
        if hint is None:
            raise
        raise ModuleNotFoundError(f"{hint} ({err})") from err


def step_loggers(cfg: DictConfig, step: str) -> list[Any]:
    """The loggers of ``cfg.logger`` for one step; a W&B run per step, named after it and
    grouped by experiment, with the config attached."""
    from cause_lightning.config import to_plain

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        overrides: dict[str, Any] = {}
        if "WandbLogger" in str(node.get("_target_", "")):
            overrides = {
                "name": f"{cfg.experiment_name}-{step}",
                "job_type": step,
                "config": to_plain(cfg),
            }
        loggers.append(instantiate_logger(node, **overrides))
    return loggers


def require_wandb_login(cfg: DictConfig) -> None:
    """Refuse a W&B logger in online mode when no API key can be found, before any work.

    W&B would ask for a key at its ``Enter your choice:`` prompt and wait there for ever (or fail
    after training has started where no terminal is attached). A key is found where W&B looks:
    ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``) or the ``.netrc`` entry ``wandb login``
    writes for the W&B host.

    Raises:
        SettingsError: Saying how to log in or to log offline.
    """
    targets = [str(n.get("_target_", "")) for n in (cfg.get("logger") or {}).values()]
    if not any("WandbLogger" in t for t in targets):
        return
    if os.environ.get("WANDB_MODE", "online") not in ("online", "run"):
        return  # offline, disabled (rule P3: the mode is the environment's)
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    import wandb

    host = urlsplit(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url).hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        entry = None
    if entry and entry[2]:
        return
    raise SettingsError(
        f"logger=wandb logs online (WANDB_MODE={os.environ.get('WANDB_MODE', 'unset')}) but no "
        f"W&B API key was found (no WANDB_API_KEY, no .netrc entry for {host}): nothing was run. "
        "Run `wandb login` once, or set WANDB_API_KEY, or log offline with WANDB_MODE=offline "
        "(and `wandb sync` the run folder later)"
    )


def wandb_loggers(trainer: pl.Trainer | None) -> list[WandbLogger]:
    """The trainer's W&B loggers on global rank 0 (empty elsewhere, or without W&B)."""
    if trainer is None or not trainer.is_global_zero:
        return []
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - Lightning always ships the class
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _artifact_name(experiment: str, kind: str) -> str:
    # W&B artifact names allow letters, digits, '-', '_' and '.'.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{experiment}-{kind}")


def log_artifact(logger: WandbLogger, path: str | Path, kind: str, experiment: str) -> None:
    """Upload (or, offline, stage for ``wandb sync``) one exported file as a W&B artifact.

    Args:
        logger: The step's W&B logger.
        path: The file (``clusterbook.pt``, ``head.pt``, ``probe.pt``, ``segmenter.pt``).
        kind: Artifact type (the file's kind).
        experiment: Experiment name; the artifact is ``<experiment>-<kind>``.
    """
    import wandb

    path = Path(path)
    artifact = wandb.Artifact(
        _artifact_name(experiment, kind),
        type=kind,
        metadata={"file": path.name, "bytes": path.stat().st_size},
    )
    artifact.add_file(str(path), name=path.name)
    logger.experiment.log_artifact(artifact)
    log.info("W&B artifact %s (%s) from %s", artifact.name, kind, path)


def confusion_image(
    confusion: np.ndarray | list[list[int]],
    assignment: np.ndarray | list[int] | None,
    class_names: list[str] | None = None,
    cell: int | None = None,
) -> np.ndarray:
    """Draw the matched confusion matrix (rows: true class, columns: predicted class).

    Cluster ``k`` is counted as class ``assignment[k]``; unmatched clusters (``-1``) are dropped
    (they are errors in the metric, protocol.md §5). Rows are normalised to sum to 1 (recall per
    class); a cell's colour goes from white (0) to dark blue (1): ``rgb = 255 - v * (255, 153,
    0)``.

    Args:
        confusion: Long ``[C, K]`` pixel counts, ground-truth class x cluster.
        assignment: ``[K]`` cluster -> class, or ``None`` for the identity (``K == C``).
        class_names: Row labels (drawn when cells are large enough).
        cell: Cell side in pixels (default: fits the matrix in about 720 pixels).

    Returns:
        ``uint8 [H, W, 3]`` image. The matrix fills the bottom-right ``C * cell`` square; above it
        a one-cell header holds the column indices and to its left the row labels.
    """
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(confusion, dtype=np.float64)  # C K
    classes, clusters = matrix.shape
    mapping = np.arange(clusters) if assignment is None else np.asarray(assignment, dtype=np.int64)
    matched = np.zeros((classes, classes), dtype=np.float64)  # C C: true x predicted class
    for k in range(clusters):
        if 0 <= mapping[k] < classes:
            matched[:, mapping[k]] += matrix[:, k]
    totals = matched.sum(axis=1, keepdims=True)  # C 1
    recall = np.divide(matched, totals, out=np.zeros_like(matched), where=totals > 0)  # C C
    size = cell or int(max(4, min(32, 720 // max(classes, 1))))
    names = list(class_names or [str(i) for i in range(classes)])
    labelled = size >= 12
    left = (max(len(n) for n in names) * 6 + 8) if labelled else 0
    top = size
    shade = (recall[..., None] * np.array([255.0, 153.0, 0.0])).round()  # C C 3
    grid = (255 - shade).astype(np.uint8)  # C C 3
    grid = grid.repeat(size, axis=0).repeat(size, axis=1)  # (C s) (C s) 3
    canvas = np.full((top + grid.shape[0], left + grid.shape[1], 3), 255, dtype=np.uint8)
    canvas[top:, left:] = grid
    if not labelled:
        return canvas
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, name in enumerate(names):
        draw.text((2, top + i * size + size // 2 - 5), name, fill=(0, 0, 0), font=font)
        draw.text((left + i * size + 2, 1), str(i), fill=(0, 0, 0), font=font)
    return np.asarray(image, dtype=np.uint8).copy()


def log_evaluation(logger: WandbLogger, report_path: str | Path, predictions: str | None) -> None:
    """Log the evaluation report's images, per-class IoU table and confusion matrix to W&B.

    Args:
        logger: The eval step's W&B logger.
        report_path: ``metrics.json`` written by :func:`cause_lightning.report.write_report`.
        predictions: Directory of the prediction PNGs (contact sheet and examples), or ``None``.
    """
    import wandb

    report = json.loads(Path(report_path).read_text())
    details: dict[str, Any] = report.get("details", {})
    class_names: list[str] = list(report.get("class_names") or [])
    variant = report.get("record_variant")
    payload: dict[str, Any] = {}

    if predictions and Path(predictions).is_dir():
        directory = Path(predictions)
        sheet = directory / "contact_sheet.png"
        if sheet.is_file():
            payload["eval/contact_sheet"] = wandb.Image(str(sheet), caption=sheet.stem)
        examples = sorted(p for p in directory.glob("*.png") if p != sheet)
        if examples:
            payload["eval/examples"] = [wandb.Image(str(p), caption=p.stem) for p in examples]

    prefix, suffix = "details/cluster/", "/per_class_iou"
    variants = sorted(
        k[len(prefix) : -len(suffix)]
        for k in details
        if k.startswith(prefix) and k.endswith(suffix)
    )
    if variants:
        columns = ["class", *(f"cluster/{v} IoU" for v in variants)]
        count = len(details[f"{prefix}{variants[0]}{suffix}"])
        names = class_names if len(class_names) == count else [f"class_{i}" for i in range(count)]
        rows = [
            [name, *(details[f"{prefix}{v}{suffix}"][i] for v in variants)]
            for i, name in enumerate(names)
        ]
        payload["eval/per_class_iou"] = wandb.Table(columns=columns, data=rows)

    confusion = details.get(f"{prefix}{variant}/confusion")
    if confusion is not None:
        picture = confusion_image(
            confusion, details.get(f"{prefix}{variant}/assignment"), class_names or None
        )
        payload["eval/confusion_matrix"] = wandb.Image(
            picture, caption=f"cluster/{variant}: rows true class, columns matched prediction"
        )
    if payload:
        logger.experiment.log(payload)


def publish_step(
    trainer: pl.Trainer | None, step: str, results: dict[str, Any], experiment: str
) -> None:
    """Log a finished step's artifacts (and eval report) to W&B, then finish its W&B run.

    Does nothing unless ``trainer`` has a :class:`WandbLogger` and this is global rank 0.

    Args:
        trainer: The step's trainer (the last one the pipeline built).
        step: ``mediator``, ``head``, ``probe`` or ``eval``.
        results: The step's results (``artifacts/...`` paths, metrics).
        experiment: ``cfg.experiment_name`` (artifact names).
    """
    loggers = wandb_loggers(trainer)
    for logger in loggers:
        for key, kind in ARTIFACT_KINDS.items():
            path = results.get(key)
            if path and Path(path).is_file():
                log_artifact(logger, path, kind, experiment)
        if step == "eval" and results.get("artifacts/metrics"):
            log_evaluation(
                logger, results["artifacts/metrics"], results.get("artifacts/predictions")
            )
    for logger in loggers:
        run = getattr(logger, "_experiment", None)
        if run is not None and hasattr(run, "finish"):
            run.finish()

"""Builders of one training or evaluation step: its data module, trainer and stage module, the new
head of stage 2, and the log of its effective learning rate and batch (rule P13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig

from cause_lightning.config import to_plain
from cause_lightning.core.logs import get_logger, is_global_zero
from cause_lightning.core.specs import HeadSpec
from cause_lightning.models import build_head
from cause_lightning.models.contract import head_arguments, head_class, head_traits
from cause_lightning.reports.tracking import step_loggers
from cause_lightning.stages.callbacks import DestroyProcessGroup, StageCheckpoint
from cause_lightning.stages.context import RunContext
from cause_lightning.stages.precision import apply_stage_precision, float32_warning
from cause_lightning.stages.sharing import ensure_tensor_sharing

__all__ = ["datamodule", "log_scaling", "new_head", "stage_module", "trainer"]

log = get_logger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a config group mapping (e.g. callbacks).

    Args:
        group: A mapping of name -> node, or None.

    Returns:
        The instantiated objects in config order.
    """
    objects: list[Any] = []
    if not group:
        return objects
    for name, node in group.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"config node {name!r} has no _target_")
        objects.append(instantiate(node))
    return objects


def stage_module(run: RunContext, step: str, **runtime: Any) -> pl.LightningModule:
    """The step's module from ``method.<step>.module`` (``_target_``), its hyper-parameters,
    optimiser and schedule read from the config; ``runtime`` holds what exists only now (trained
    weights, effective learning rates, the CRF pool). The training steps' modules also get the
    run's :attr:`~RunContext.debug_checks`, resolved for its device."""
    build = instantiate(run.cfg.method[step].module, _partial_=True)
    if step != "eval":
        runtime.setdefault("debug_checks", run.debug_checks)
    return build(run.backbone, **runtime)


def new_head(run: RunContext, clusterbook: torch.Tensor) -> torch.nn.Module:
    """The student head of stage 2, built from ``head.module`` (its ``_target_`` and arguments)
    plus what its traits ask of the pipeline (docs/architecture.md, a head)."""
    node = run.cfg.head.module
    target = str(node._target_)
    cls = head_class(target)
    arguments = {k: v for k, v in to_plain(node).items() if not k.startswith("_")}
    arguments.update(
        head_arguments(
            cls,
            dim=int(run.backbone.embed_dim),
            num_queries=int(run.derived.num_queries),
            num_concepts=int(clusterbook.shape[0]),
        )
    )
    book = clusterbook if head_traits(cls).needs_clusterbook else None
    return build_head(HeadSpec(target, arguments), book)


def datamodule(run: RunContext, step: str, batch_size: int) -> pl.LightningDataModule:
    """The data module of a step at its resolutions and batch size."""
    resolution = run.derived.resolution
    data = instantiate(
        run.cfg.data.module,
        train_res=int(resolution["mediator" if step == "mediator" else "head"]),
        test_res=int(resolution["test"]),
        batch_size=int(batch_size),
        seed=int(run.cfg.seed),
    )
    if step == "mediator" and hasattr(data, "train_labels"):
        data.train_labels = False  # stage 1 is label-free: do not decode them
    if step != "eval" and run.cfg.method.reference_schedule:
        data.reference_world_size = int(run.cfg.method.reference_world_size)
    return data


def trainer(
    run: RunContext,
    step: str,
    checkpoints: Path | None = None,
    max_epochs: int | None = None,
    clip: float | None = None,
) -> pl.Trainer:
    """The trainer of a step, with the config's callbacks and loggers.

    Args:
        run: The run.
        step: ``mediator``, ``head``, ``probe`` or ``eval``.
        checkpoints: The folder of the step's resume checkpoints (training steps).
        max_epochs: The step's epochs.
        clip: Gradient-norm clip (``None``: none).
    """
    callbacks = _instantiate_group(run.cfg.get("callbacks"))
    if run.cfg.trainer.get("enable_progress_bar") is False:
        # Lightning refuses a progress-bar callback on a trainer without one.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    for callback in callbacks:
        if isinstance(callback, (ModelCheckpoint, StageCheckpoint)) and callback.dirpath is None:
            callback.dirpath = None if checkpoints is None else str(checkpoints)
    if "spawn" in str(run.cfg.trainer.get("strategy") or ""):
        ensure_tensor_sharing()
    if step != "eval" and run.cfg.trainer.get("strategy") == "ddp_spawn":
        callbacks.append(DestroyProcessGroup())
    if checkpoints is None:  # a step without resume checkpoints (the evaluation)
        callbacks = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, StageCheckpoint))]
    loggers = step_loggers(run.cfg, step)
    kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    if any(isinstance(c, StageCheckpoint) for c in callbacks) or checkpoints is None:
        # The stage's own checkpoint replaces Lightning's default one in the run folder.
        kwargs["enable_checkpointing"] = False
    if max_epochs is not None:
        kwargs["max_epochs"] = int(max_epochs)
    if clip is not None:
        kwargs["gradient_clip_val"] = float(clip)
        kwargs["gradient_clip_algorithm"] = "norm"
    built = instantiate(run.cfg.trainer, **kwargs)
    on_gpu = isinstance(built.accelerator, CUDAAccelerator)
    apply_stage_precision(step, on_gpu)
    advice = float32_warning(on_gpu, built.precision)
    if advice is not None and not run.warned_float32:
        run.warned_float32 = True
        log.warning(advice)
    return built


def log_scaling(run: RunContext, step: str, built: pl.Trainer) -> None:
    """Log world size, batch sizes and the effective lr of a training step (rank 0, rule P13).

    Raises:
        ValueError: When ``method.scale_lr_with_world_size`` is on and the trainer's process
            count differs from the one the learning rate was derived for.
    """
    derived = run.derived
    if int(built.world_size) != derived.world_size:
        message = (
            f"the trainer runs {built.world_size} processes but the config derived "
            f"{derived.world_size} from trainer.devices/num_nodes: set trainer.devices "
            "and trainer.num_nodes explicitly (e.g. under torchrun or srun)"
        )
        if run.cfg.method.scale_lr_with_world_size:
            raise ValueError(message)
        log.warning("%s; the logged global batch is wrong", message)
    if not is_global_zero():
        return
    lrs = f"lr {derived.lr[step]:g}" + (
        f", cluster lr {derived.lr['probe_cluster']:g}" if step == "probe" else ""
    )
    log.info(
        "%s: world size %d, batch %d per device, global batch %d, effective %s "
        "(method.scale_lr_with_world_size=%s)",
        step,
        derived.world_size,
        derived.batch_size[step],
        derived.global_batch(step),
        lrs,
        bool(run.cfg.method.scale_lr_with_world_size),
    )

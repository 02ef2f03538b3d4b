"""Typed configuration schemas and the values derived from a composed config.

The schemas are registered in Hydra's ConfigStore and merged under the YAML files of their group
(``defaults: [_schema, _self_]``), so a badly typed override such as ``method.num_concepts=abc``
is rejected when the config is composed, before anything runs. Values that depend on the
backbone or on the number of processes (resolutions snapped to the patch size, effective learning
rates, global batch) are computed by :func:`derive` and stored in the config under ``derived``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

__all__ = [
    "MethodConfig",
    "DataConfig",
    "BackboneConfig",
    "HeadConfig",
    "register_configs",
    "snap_resolution",
    "check_overcluster",
    "derive",
    "to_plain",
]

log = logging.getLogger(__name__)


@dataclass
class MediatorConfig:
    epochs: int = 1
    lr: float = 4e-3
    batch_size: int = 16
    temperature: float = 0.1
    step_size: int = 1
    gamma: float = 0.2
    chunk_size: int | None = None


@dataclass
class HeadStageConfig:
    epochs: int = 2
    lr: float = 4e-3
    weight_decay: float = 1e-4
    clip: float | None = None
    batch_size: int = 16
    ema_decay: float = 0.99
    projection_dim: int = 2048
    temperature: float = 0.07
    pos_thresh: float = 0.3
    neg_thresh: float = 0.1
    bank_capacity: int = 100
    bank_keep: float = 0.5
    sync_bank: bool = False


@dataclass
class ProbeStageConfig:
    epochs: int = 5
    lr: float = 4e-3
    cluster_lr: float = 4e-3
    weight_decay: float = 1e-4
    clip: float | None = None
    batch_size: int = 16
    temperature: float = 0.1
    step_size: int = 2
    gamma: float = 0.5
    head_dropout: bool = True
    reference_leak: bool = False


@dataclass
class EvalStageConfig:
    batch_size: int = 8
    alpha: float = 3.0
    variants: list[str] = field(default_factory=lambda: ["raw", "flip", "crf", "flip_crf"])
    crf_iterations: int = 10
    crf_workers: int = 0
    crf_timeout: float = 600.0
    baselines: bool = True
    kmeans_iters: int = 30
    kmeans_restarts: int = 10
    kmeans_max_tokens: int = 200_000
    save_images: int = 16
    overcluster: list[int] = field(default_factory=list)


@dataclass
class MethodConfig:
    num_concepts: int = 2048
    window: int = 4
    scale_lr_with_world_size: bool = False
    mediator: MediatorConfig = field(default_factory=MediatorConfig)
    head: HeadStageConfig = field(default_factory=HeadStageConfig)
    probe: ProbeStageConfig = field(default_factory=ProbeStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)


@dataclass
class ClipConfig:
    head: dict[str, float | None] = field(default_factory=dict)
    probe: dict[str, float | None] = field(default_factory=dict)


@dataclass
class ResolutionConfig:
    train: dict[str, int] = field(default_factory=dict)
    test: int = 320


@dataclass
class RecipeConfig:
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    weight_decay: float = 1e-4
    clip: ClipConfig = field(default_factory=ClipConfig)
    crops: str = "none"


@dataclass
class DataConfig:
    name: str = MISSING
    num_classes: int = MISSING
    module: Any = MISSING
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


@dataclass
class BackboneConfig:
    _target_: str = "cause_lightning.models.build_backbone"
    name: str = MISSING
    weights: str | None = None


@dataclass
class HeadConfig:
    name: str = MISSING
    probe_epochs: int = 5
    module: Any = MISSING


def register_configs() -> None:
    """Register the schemas as ``_schema`` in their config groups (idempotent)."""
    store = ConfigStore.instance()
    store.store(group="method", name="_schema", node=MethodConfig)
    store.store(group="data", name="_schema", node=DataConfig)
    store.store(group="backbone", name="_schema", node=BackboneConfig)
    store.store(group="head", name="_schema", node=HeadConfig)


def snap_resolution(resolution: int, patch_size: int) -> int:
    """Round a nominal resolution up to a multiple of the patch size (320 -> 322 for patch 14)."""
    return int(math.ceil(resolution / patch_size) * patch_size)


def check_overcluster(counts: Any, num_classes: int) -> list[int]:
    """Validate ``method.eval.overcluster``: distinct cluster counts, each above the class count.

    Args:
        counts: The configured list (empty = over-clustering off).
        num_classes: ``data.num_classes``.

    Returns:
        The counts as a sorted list of ints.

    Raises:
        ValueError: When a count is not an integer greater than ``num_classes`` or repeats.
    """
    values = list(counts or [])
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or k <= num_classes]
    if bad:
        raise ValueError(
            f"method.eval.overcluster={values}: every entry must be an integer cluster count "
            f"greater than data.num_classes={num_classes} (over-clustering scores k > C clusters "
            f"with many-to-one matching); offending: {bad}. Use e.g. "
            f"method.eval.overcluster=[{2 * num_classes},{4 * num_classes}], or [] to turn it off."
        )
    if len(set(values)) != len(values):
        raise ValueError(f"method.eval.overcluster={values} repeats a cluster count")
    return sorted(values)


def derive(cfg: DictConfig, patch_size: int, world_size: int = 1) -> dict[str, Any]:
    """Compute the values that follow from the config, the backbone and the process count.

    Args:
        cfg: The composed config.
        patch_size: Patch size of the backbone.
        world_size: Number of training processes (devices x nodes).

    Returns:
        A plain dict stored as ``cfg.derived``: resolutions per step, the TR query count,
        effective learning rates and global batch sizes.

    Raises:
        ValueError: On a bad ``method.eval.overcluster`` or a TR resolution mismatch.
    """
    overcluster = check_overcluster(cfg.method.eval.get("overcluster"), int(cfg.data.num_classes))
    if overcluster:
        log.warning(
            "method.eval.overcluster=%s: the counts are valid, but the eval stage does not fit "
            "k-cluster probes yet, so no over-clustering rows will be reported",
            overcluster,
        )
    resolution = cfg.data.recipe.resolution
    head_name = cfg.head.name
    if head_name not in resolution.train:
        raise ValueError(
            f"data.recipe.resolution.train has no entry for head {head_name!r} "
            f"(has {list(resolution.train)})"
        )
    train_res = snap_resolution(int(resolution.train[head_name]), patch_size)
    test_res = snap_resolution(int(resolution.test), patch_size)
    scale = world_size if cfg.method.scale_lr_with_world_size else 1
    derived: dict[str, Any] = {
        "patch_size": patch_size,
        "world_size": world_size,
        "lr_scale": scale,
        "resolution": {
            # stage 1 runs at the test resolution for every head (method.md §2.6)
            "mediator": test_res,
            "head": train_res,
            "probe": train_res,
            "test": test_res,
        },
        "num_queries": (train_res // patch_size) ** 2,
    }
    for step in ("mediator", "head", "probe"):
        step_cfg = cfg.method[step]
        derived[step] = {
            "lr": float(step_cfg.lr) * scale,
            "batch_size_per_device": int(step_cfg.batch_size),
            "global_batch_size": int(step_cfg.batch_size) * world_size,
        }
    derived["probe"]["cluster_lr"] = float(cfg.method.probe.cluster_lr) * scale
    if head_name == "tr" and train_res != test_res:
        raise ValueError(
            f"the TR head needs the train resolution ({train_res}) to equal the test resolution "
            f"({test_res}): its query table has one entry per token (method.md §2.6)"
        )
    with open_dict(cfg):
        cfg.derived = derived
    return derived


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict (safe inside checkpoints and artifacts)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
